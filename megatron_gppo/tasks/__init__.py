"""Small, self-contained tasks and models for the CPU demo and the tests."""
