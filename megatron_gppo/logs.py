"""Status lines and warnings of the package: one logger tree (`megatron_gppo.*`), one format, rank-aware.

In a job of several processes, global rank 0 says everything; the other
ranks say only warnings and errors, prefixed with their rank. Lines go to
the process's current stdout (looked up at each line, so a redirect or a
test's capture sees them): status as the bare message, warnings as
`warning: ...`. The live progress line and the final summary are not log
lines; `metrics.py` writes those itself.

Modules log with `logging.getLogger(__name__)`; `setup()` runs once, when
the package is imported.

Warnings that other packages raise with `warnings.warn` (megatron-core on a
CPU install: no Transformer Engine, no apex; deprecations in torch and
transformers) are expected and say nothing about the run: the commands send
them to a log file in the run directory (`route_library_warnings`), or to
stderr with `megatron-gppo --verbose`.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

ROOT = "megatron_gppo"


def process_rank() -> int:
    """This process's global rank: torch.distributed's once initialised, else the launcher's, else 0."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


class _CurrentStdout(logging.StreamHandler):
    """A handler writing to whatever `sys.stdout` is when a line is emitted."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stdout

    @stream.setter
    def stream(self, _value) -> None:
        pass

    def handleError(self, record: logging.LogRecord) -> None:
        if isinstance(sys.exc_info()[1], BrokenPipeError):  # the reader went away (`| head`): not an error
            return
        super().handleError(record)


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.levelno >= logging.WARNING:
            message = f"{record.levelname.lower()}: {message}"
        rank = process_rank()
        return f"[rank {rank}] {message}" if rank else message


class _RankFilter(logging.Filter):
    """Rank 0 says everything; other ranks only warnings and errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or process_rank() == 0


def route_library_warnings(*, verbose: bool, log_file: str | os.PathLike | None = None) -> None:
    """Where Python warnings go from now on: stderr when `verbose`, else `log_file` (appended), else nowhere.

    transformers logs its deprecations through a logger of its own, configured from this variable when
    it is first imported (here or in a process this one starts).
    """
    os.environ["TRANSFORMERS_VERBOSITY"] = "warning" if verbose else "error"
    logging.captureWarnings(True)
    logger = logging.getLogger("py.warnings")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.propagate = False
    if verbose:
        logger.addHandler(logging.StreamHandler(sys.stderr))
    elif log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        logger.addHandler(handler)
    else:
        logger.addHandler(logging.NullHandler())


def setup() -> None:
    logger = logging.getLogger(ROOT)
    if any(isinstance(handler, _CurrentStdout) for handler in logger.handlers):
        return
    handler = _CurrentStdout()
    handler.setFormatter(_Format())
    handler.addFilter(_RankFilter())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


__all__ = ["ROOT", "process_rank", "route_library_warnings", "setup"]
