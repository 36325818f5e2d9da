"""`megatron-gppo train | sft CONFIG.yaml [dotted.key=value ...]`: validate a run's config, then run it.

`train` is CE-GPPO (or another registered loss) RL training
(`megatron_gppo.trainer`); `sft` is the supervised warm-up exported to
`train.output_dir/hf` (`megatron_gppo.sft`). Under torchrun or srun every
process runs the job. Started by hand with a layout that needs several
processes (e.g. `parallel.tensor_parallel=2` on a laptop), the command starts
them itself through torchrun on this machine.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from megatron_gppo.logs import process_rank, route_library_warnings

logger = logging.getLogger(__name__)

# Each run command's job: a module whose `run(config)` every process calls.
JOBS = {"train": "megatron_gppo.trainer", "sft": "megatron_gppo.sft"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file, e.g. examples/configs/demo_cpu.yaml")
    parser.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="dotted overrides, e.g. train.max_steps=10")


def launched_by_launcher() -> bool:
    """True when torchrun or srun started this process as one rank of a job."""
    return "RANK" in os.environ or "SLURM_PROCID" in os.environ


def check_paths(config) -> None:
    """Every configured input exists (one line naming the key otherwise)."""
    for key, path in (("model.hf_path", config.model.hf_path), ("data.train_path", config.data.train_path)):
        if not path:
            raise ValueError(f"config key '{key}' is empty")
    for key, path in (("model.hf_path", config.model.hf_path), ("data.train_path", config.data.train_path),
                      ("data.eval_path", config.data.eval_path),
                      ("model.megatron_checkpoint", config.model.megatron_checkpoint)):
        if path and not Path(path).exists():
            raise FileNotFoundError(f"config key '{key}': {path} does not exist")


def finished_step(config) -> int | None:
    """The last step of a `train` run that has nothing left to do (its checkpoint is at max_steps), else None."""
    from megatron_gppo.checkpoint.training import latest_step

    step = latest_step(config.train.output_dir) if config.checkpoint.resume else None
    return step if step is not None and step >= config.train.max_steps else None


def run(args: argparse.Namespace) -> int:
    """Load and check the config, validate the layout, then run the command's job in every process."""
    from megatron_gppo.config import load_config, redact_secrets
    from megatron_gppo.model.arch import ModelArch
    from megatron_gppo.model.parallel import ParallelDims, validate_layout

    config = load_config(args.config, args.overrides)
    check_paths(config)
    output_dir = Path(config.train.output_dir)
    rank = process_rank()
    route_library_warnings(verbose=args.verbose,
                           log_file=output_dir / "logs" / (f"warnings-rank{rank}.log" if rank else "warnings.log"))
    if args.command == "train" and (step := finished_step(config)) is not None:
        logger.info("%s is complete (its checkpoint is at step %d, train.max_steps=%d): nothing to train; raise "
                    "train.max_steps to go on", output_dir, step, config.train.max_steps)
        return 0
    arch = ModelArch.from_hf_config(config.model.hf_path)
    if not launched_by_launcher():
        parallel = config.parallel
        num_processes = parallel.tensor_parallel * parallel.pipeline_parallel * max(parallel.data_parallel, 1)
        # Fails here, before any process or model exists, if the layout cannot work.
        validate_layout(ParallelDims.from_config(parallel, world_size=num_processes), arch)
        if num_processes > 1:
            torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc-per-node={num_processes}", "-m", "megatron_gppo.cli",
                        *(["--verbose"] if args.verbose else []), args.command, args.config, *args.overrides]
            logger.info("starting %d local processes: %s", num_processes, " ".join(redact_secrets(torchrun[1:])))
            return subprocess.call(torchrun)
    # SIGTERM (scancel, torchrun stopping its workers, kill) unwinds like Ctrl-C does, so
    # the run's `finally` blocks stop the rollout servers and reward workers it started.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    importlib.import_module(JOBS[args.command]).run(config)
    return 0


def _exit_on_sigterm(signum: int, frame) -> None:
    raise SystemExit(128 + signum)
