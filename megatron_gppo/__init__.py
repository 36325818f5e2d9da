"""megatron-gppo: CE-GPPO reinforcement learning on a Megatron-Core policy."""

__version__ = "0.1.0"

from megatron_gppo import logs as _logs

_logs.setup()
