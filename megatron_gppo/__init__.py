"""megatron-gppo: CE-GPPO reinforcement learning on a Megatron-Core policy."""

__version__ = "0.1.0"
