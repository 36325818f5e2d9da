def pytest_addoption(parser):
    parser.addoption("--soak-kills", type=int, default=0,
                     help="SIGKILLs in tests/distributed/test_crash_soak.py (default: its CI-sized count)")
