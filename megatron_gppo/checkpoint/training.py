"""Atomic, resumable training checkpoints under `<run_dir>/checkpoints/`.

Layout:

    checkpoints/
      latest                      "step_00000050\\n", replaced atomically, updated last
      step_00000050/              one megatron torch_dist checkpoint (any layout can read it):
        metadata.json, .metadata, *.distcp, common.pt
                                  model (canonical keys, as converted checkpoints),
                                  optimizer (distributed optimizer: "dp_reshardable"),
                                  scheduler, RNG states
        trainer_state.json        step, the trainer's `extra` dict (data-sampler position, ...),
                                  the resolved config, the layout it was saved at
        hf/                       HF config + tokenizer, for tools/convert_megatron_to_hf.py
      .tmp-step_00000060/         a save in progress (deleted by the next save)

A save writes everything into `.tmp-step_N/`, renames it to `step_N/` (atomic
on one filesystem), then replaces `latest`, then deletes old checkpoints
beyond `keep_last`. A crash at any moment therefore leaves the previous
checkpoint complete and `latest` naming it (or naming an older complete one,
which `find_latest` then skips past: any `step_*` directory is complete).
A save that fails (disk full, read-only directory) is agreed on by every
rank, its temporary directory removed, and reported as one
`CheckpointWriteError` line naming the directory, the reason and the
checkpoint that is still the latest.

RNG states (python, numpy, torch CPU / CUDA, megatron's model-parallel RNG
tracker) are stored per (pipeline, tensor) rank and shared by data-parallel
replicas (as megatron-LM does), so resuming at a different DP size restores
them too; at a different TP / PP they are left as seeded, with a warning.
The optimizer state reshards across DP sizes ("dp_reshardable").
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint import CheckpointException

from megatron_gppo.atomic import fsync_dir, publish_directory, write_text_atomic
from megatron_gppo.errors import RunAborted

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
STATE_FILE = "trainer_state.json"
HF_SUBDIR = "hf"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}
# A failed save with less free space than this is reported as a full disk.
_LOW_DISK_BYTES = 64 * 2**20


class CheckpointWriteError(RunAborted):
    """A checkpoint could not be written; the previous complete one is still the latest."""


@dataclass(frozen=True, kw_only=True)
class TrainingState:
    """What `load_training_checkpoint` returns besides the restored model / optimizer / scheduler."""

    step: int
    """The number of completed training steps when the checkpoint was saved."""

    extra: dict[str, Any]
    """The trainer's own JSON-able state (data-sampler position, metric state, ...)."""

    config: dict[str, Any]
    """The resolved run config at save time."""

    path: Path


def load_module_state(module: torch.nn.Module, state: Mapping[str, Any]) -> None:
    """`module.load_state_dict(state, strict=True)`, except that missing `*._extra_state` entries are allowed.

    Transformer Engine's modules report an `_extra_state` key (FP8 metadata)
    that a checkpoint saved without FP8 may not hold; megatron-LM retries such
    loads without those keys. Any other missing or unexpected key still fails.
    """
    expected = set(module.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing and not unexpected and all(key.rpartition(".")[2] == "_extra_state" for key in missing):
        module.load_state_dict(state, strict=False)
        return
    module.load_state_dict(state, strict=True)  # raises, naming every missing and unexpected key


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoints_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def _is_complete(path: Path) -> bool:
    return bool(_STEP_DIR.match(path.name)) and (path / STATE_FILE).is_file() and (path / "metadata.json").is_file()


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _is_complete(p)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def find_latest(run_dir: str | os.PathLike) -> Path | None:
    """The latest complete checkpoint of a run (`latest` marker, else the highest complete step), or None."""
    root = checkpoints_root(run_dir)
    marker = root / LATEST_FILE
    if marker.is_file():
        named = root / marker.read_text().strip()
        complete = list_checkpoints(run_dir)
        # A marker older than the newest complete step can only come from a crash between rename and update.
        if _is_complete(named) and (not complete or complete[-1] == named):
            return named
    complete = list_checkpoints(run_dir)
    return complete[-1] if complete else None


def latest_step(run_dir: str | os.PathLike) -> int | None:
    """The step of the latest complete checkpoint of a run, or None when it has none."""
    latest = find_latest(run_dir)
    return None if latest is None else int(_STEP_DIR.match(latest.name).group(1))


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """A megatron checkpoint directory from itself, a run directory or its `checkpoints/` directory."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory")
    if (path / "metadata.json").is_file():
        return path
    latest = find_latest(path.parent if path.name == CHECKPOINTS_DIR else path)
    if latest is None:
        raise ValueError(f"{path} is neither a megatron checkpoint (no metadata.json) nor a run with complete"
                         " checkpoints")
    return latest


# ----------------------------------------------------------------------------
# Process helpers
# ----------------------------------------------------------------------------


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _config_dict(config: Any) -> dict[str, Any]:
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return dict(config)
    from megatron_gppo.config import to_dict

    return to_dict(config)


# ----------------------------------------------------------------------------
# State pieces
# ----------------------------------------------------------------------------


def _rng_object(data: Any):
    """This rank's RNG states as a ShardedObject over (PP, TP), replicated over DP."""
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(
        "rng_state",
        data,
        (parallel_state.get_pipeline_model_parallel_world_size(),
         parallel_state.get_tensor_model_parallel_world_size()),
        (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()),
        replica_id=parallel_state.get_data_parallel_rank(with_context_parallel=True),
    )


def _rng_states() -> dict[str, Any]:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }


def _set_rng_states(states: dict[str, Any]) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    get_cuda_rng_tracker().set_states(states["tracker"])


def _init_optimizer_states(optimizer) -> None:
    """Give a fresh optimizer (no step taken) zero Adam states, which a checkpoint load then overwrites.

    megatron's distributed optimizer builds its sharded state dict from the
    existing states (and their `step`), so they must exist before loading.
    """
    from megatron_gppo.model.optimizer import torch_optimizers

    for sub, inner in torch_optimizers(optimizer):
        if all(inner.state.get(p) for g in inner.param_groups for p in g["params"]):
            continue
        if getattr(sub, "init_state_fn", None) is not None:
            sub.init_state_fn(inner, sub.config)
        for group in inner.param_groups:
            for param in group["params"]:
                inner.state[param].setdefault("step", torch.tensor(0.0))


def _restore_adam_steps(optimizer) -> None:
    """Give every parameter its own Adam `step`, equal to its param group's, after a load.

    Without apex / TE, megatron's distributed optimizer restores `step` from
    the param groups into one tensor shared by all parameters, then copies
    the template's per-parameter `step` over it; torch's Adam would then also
    increment the shared tensor once per parameter.
    """
    from megatron_gppo.model.optimizer import torch_optimizers

    for _, inner in torch_optimizers(optimizer):
        for group in inner.param_groups:
            if "step" not in group:
                continue
            for param in group["params"]:
                if "step" in inner.state.get(param, {}):
                    inner.state[param]["step"] = torch.tensor(float(group["step"]))


def _state_pieces(model: list[torch.nn.Module], optimizer, *, is_loading: bool) -> dict[str, Any]:
    from megatron_gppo.checkpoint.live import model_sharded_state_dict

    pieces = model_sharded_state_dict(model)
    if optimizer is not None:
        # Before any step (a save at step 0, or a load) the states do not exist yet.
        _init_optimizer_states(optimizer)
        # The optimizer maps its states to the model's sharded tensors by parameter identity.
        pieces["optimizer"] = optimizer.sharded_state_dict(pieces, is_loading=is_loading, metadata=_OPTIMIZER_METADATA)
    return pieces


# ----------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------


def save_training_checkpoint(
    run_dir: str | os.PathLike,
    *,
    step: int,
    model: list[torch.nn.Module],
    optimizer=None,
    scheduler=None,
    extra: dict[str, Any] | None = None,
    config: Any = None,
    hf_dir: str | os.PathLike | None = None,
    keep_last: int = 2,
) -> Path:
    """Save a complete training checkpoint of step `step`; every rank calls it. Returns its directory.

    Args:
        run_dir: the run directory (train.output_dir); checkpoints go to `<run_dir>/checkpoints/`.
        step: completed training steps.
        model: this rank's model chunks (DDP-wrapped or bare).
        optimizer: megatron optimizer (its states must exist, i.e. after one step), or None.
        scheduler: megatron OptimizerParamScheduler, or None.
        extra: JSON-able trainer state (data-sampler position, ...), returned as-is on load.
        config: the resolved RunConfig (or a dict), stored for reference.
        hf_dir: HF model directory whose config / tokenizer files are stored beside the weights.
        keep_last: complete checkpoints to keep (>= 1); older ones are deleted after the save.
    """
    from megatron.core import dist_checkpointing

    from megatron_gppo.checkpoint.hf_io import copy_side_files
    from megatron_gppo.checkpoint.live import enable_checkpoint_cpu_compat

    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    root = checkpoints_root(run_dir)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}"
    state_json = json.dumps({
        "step": step,
        "extra": extra or {},
        "config": _config_dict(config),
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }, indent=2) + "\n"  # fails here, before any file is touched, if `extra` is not JSON-able
    enable_checkpoint_cpu_compat()

    def start() -> None:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step_*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()

    def write_shards() -> None:
        state = _state_pieces(model, optimizer, is_loading=False)
        state["rng_state"] = _rng_object(_rng_states())
        if scheduler is not None:
            state["scheduler"] = scheduler.state_dict()
        dist_checkpointing.save(state, str(tmp))

    def publish() -> None:
        if hf_dir is not None:
            copy_side_files(hf_dir, tmp / HF_SUBDIR)
        write_text_atomic(tmp / STATE_FILE, state_json, durable=True)
        publish_directory(tmp, final)  # replaces the same step saved again (e.g. after resuming from it)
        fsync_dir(root)
        write_text_atomic(root / LATEST_FILE, final.name + "\n", durable=True)
        for old in list_checkpoints(run_dir)[:-keep_last]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)

    for phase, on_every_rank in ((start, False), (write_shards, True), (publish, False)):
        failure = None
        try:
            if on_every_rank or _rank() == 0:
                phase()
        except (OSError, CheckpointException) as err:
            failure = err
        if _failed_anywhere(failure):
            reason = _write_failure_reason(root, failure)
            if _rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            latest = find_latest(run_dir)
            raise CheckpointWriteError(
                f"could not write checkpoint {final.name} in {root}: {reason}; the latest complete checkpoint is "
                f"{latest.name if latest else 'none'} (free space or fix the permissions, then rerun to resume)"
            ) from failure
    return final


def _failed_anywhere(failure: BaseException | None) -> bool:
    """Whether any rank's save phase failed (collective: every rank learns of every failure)."""
    if not dist.is_initialized():
        return failure is not None
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([float(failure is not None)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _write_failure_reason(root: Path, failure: BaseException | None) -> str:
    """A write failure in a user's words: torch's checkpoint writers report a full disk as a short write."""
    if failure is None:
        return "another rank's write failed (see its log)"
    if isinstance(failure, OSError) and failure.strerror:
        return failure.strerror.lower() + (f" ({failure.filename})" if failure.filename else "")
    existing = next(p for p in (root, *root.parents) if p.exists())
    if not os.access(existing, os.W_OK):
        return f"{existing} is not writable"
    free = shutil.disk_usage(existing).free
    if free < _LOW_DISK_BYTES:
        return f"the disk is full ({free / 2**20:.1f} MiB free)"
    return str(failure).strip().splitlines()[-1]


def load_training_checkpoint(
    path: str | os.PathLike,
    *,
    model: list[torch.nn.Module],
    optimizer=None,
    scheduler=None,
    load_rng: bool = True,
) -> TrainingState:
    """Restore model (and optimizer, scheduler, RNG) from a checkpoint directory; every rank calls it.

    The layout may differ from the one it was saved at: any TP / PP / DP for
    the model, any DP for the (distributed) optimizer. After loading into a
    model whose optimizer keeps fp32 main weights nothing else is needed: the
    optimizer state holds them.
    """
    from megatron.core import dist_checkpointing

    from megatron_gppo.checkpoint.live import enable_checkpoint_cpu_compat, stored_keys

    path = Path(path)
    if not _is_complete(path):
        raise ValueError(f"{path} is not a complete training checkpoint (no {STATE_FILE} / metadata.json)")
    meta = json.loads((path / STATE_FILE).read_text())
    enable_checkpoint_cpu_compat()
    state = _state_pieces(model, optimizer, is_loading=True)
    rng = _rng_object(None)
    restore_rng = load_rng and rng.unique_key in stored_keys(path)
    if restore_rng:
        state["rng_state"] = rng
    with torch.no_grad():
        loaded = dist_checkpointing.load(state, str(path))
        for index, chunk in enumerate(model):
            while hasattr(chunk, "module"):
                chunk = chunk.module
            load_module_state(chunk, loaded[f"model{index}"])
        if optimizer is not None:
            optimizer.load_state_dict(loaded["optimizer"])
            _restore_adam_steps(optimizer)
    if scheduler is not None:
        if "scheduler" not in loaded:
            raise ValueError(f"{path} has no scheduler state")
        scheduler.load_state_dict(loaded["scheduler"])
    if restore_rng:
        _set_rng_states(loaded["rng_state"])
    elif load_rng and _rank() == 0:
        logger.warning("%s was saved at another tensor/pipeline layout; RNG states stay as seeded", path.name)
    return TrainingState(step=int(meta["step"]), extra=meta.get("extra", {}), config=meta.get("config", {}), path=path)


def resume(
    run_dir: str | os.PathLike,
    *,
    model: list[torch.nn.Module],
    optimizer=None,
    scheduler=None,
) -> TrainingState | None:
    """Load the latest complete checkpoint of the run, if any, and say so (`Resuming from step N`)."""
    latest = find_latest(run_dir)
    if latest is None:
        return None
    state = load_training_checkpoint(latest, model=model, optimizer=optimizer, scheduler=scheduler)
    logger.info("Resuming from step %d (%s)", state.step, latest)
    return state


__all__ = [
    "CHECKPOINTS_DIR", "LATEST_FILE", "STATE_FILE", "TrainingState", "checkpoints_root", "find_latest", "latest_step",
    "list_checkpoints", "load_module_state", "load_training_checkpoint", "resolve_checkpoint_dir", "resume",
    "save_training_checkpoint", "step_dir_name",
]
