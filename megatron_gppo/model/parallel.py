"""Parallel layout (TP x PP x DP, virtual pipeline, sequence parallel) and process-group setup.

`ParallelDims` is the one validated description of the layout. Everything a
user can get wrong about it is checked from the Hugging Face config and the
world size alone (`build_parallel_dims`), before torch.distributed or any
model exists, and reported as a one-line `ValueError` that says how to fix it.

`init_distributed` then brings up torch.distributed from the launcher's
environment (torchrun or Slurm), megatron's parallel_state and its
model-parallel RNG.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Mapping

from megatron_gppo.config import ParallelConfig
from megatron_gppo.model.arch import ModelArch
from megatron_gppo.ports import free_port


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


@dataclass(frozen=True, kw_only=True)
class ParallelDims:
    """world_size = tp x pp x dp; each of the pp ranks holds vpp model chunks."""

    tp: int = 1
    pp: int = 1
    vpp: int = 1
    dp: int = 1
    sequence_parallel: bool = False
    world_size: int = 1
    num_layers_in_first_stage: int = 0
    """0 splits the layers evenly."""

    num_layers_in_last_stage: int = 0
    """0 splits the layers evenly."""

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "vpp", "dp", "world_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.tp * self.pp * self.dp != self.world_size:
            raise ValueError(
                f"world size {self.world_size} != tensor_parallel={self.tp} x pipeline_parallel={self.pp}"
                f" x data_parallel={self.dp} = {self.tp * self.pp * self.dp}; launch that many processes"
                " or change the layout")
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("sequence_parallel needs tensor_parallel > 1; disable it or raise tensor_parallel")
        if self.vpp > 1 and self.pp == 1:
            raise ValueError(f"virtual_pipeline={self.vpp} needs pipeline_parallel > 1; set virtual_pipeline=1")
        if (self.num_layers_in_first_stage or self.num_layers_in_last_stage) and self.pp == 1:
            raise ValueError("num_layers_in_first_stage / num_layers_in_last_stage need pipeline_parallel > 1")

    @classmethod
    def from_config(cls, parallel: ParallelConfig, *, world_size: int) -> "ParallelDims":
        """The layout of `parallel` on `world_size` processes (data_parallel=0 infers DP)."""
        model_parallel = parallel.tensor_parallel * parallel.pipeline_parallel
        if world_size % model_parallel:
            raise ValueError(
                f"world size {world_size} is not divisible by tensor_parallel={parallel.tensor_parallel}"
                f" x pipeline_parallel={parallel.pipeline_parallel} = {model_parallel};"
                f" launch a multiple of {model_parallel} processes")
        return cls(
            tp=parallel.tensor_parallel,
            pp=parallel.pipeline_parallel,
            vpp=parallel.virtual_pipeline,
            dp=parallel.data_parallel or world_size // model_parallel,
            sequence_parallel=parallel.sequence_parallel,
            world_size=world_size,
            num_layers_in_first_stage=parallel.num_layers_in_first_stage,
            num_layers_in_last_stage=parallel.num_layers_in_last_stage,
        )

    @property
    def uneven_pipeline(self) -> bool:
        return bool(self.num_layers_in_first_stage or self.num_layers_in_last_stage)


def validate_layout(dims: ParallelDims, arch: ModelArch) -> None:
    """Raise a one-line ValueError if `arch` cannot be split as `dims` says.

    Mirrors megatron-core 0.16's own checks (TransformerConfig, attention,
    get_num_layers_to_build) so that they fail here, before any model is built.
    """
    tp = dims.tp
    if arch.num_attention_heads % tp:
        raise ValueError(
            f"tensor_parallel={tp} does not divide num_attention_heads={arch.num_attention_heads};"
            f" choose one of {_divisors(arch.num_attention_heads)}")
    if arch.num_query_groups % tp:
        raise ValueError(
            f"tensor_parallel={tp} does not divide num_key_value_heads={arch.num_query_groups};"
            f" choose one of {_divisors(arch.num_query_groups)}")
    if arch.ffn_hidden_size % tp:
        raise ValueError(
            f"tensor_parallel={tp} does not divide intermediate_size={arch.ffn_hidden_size};"
            f" choose one of {_divisors(arch.ffn_hidden_size)}")
    _stage_layer_counts(dims, arch.num_layers)


def _stage_layer_counts(dims: ParallelDims, num_layers: int) -> list[int]:
    """Layers on each pipeline rank, validated against virtual pipeline stages."""
    pp, vpp = dims.pp, dims.vpp
    first, last = dims.num_layers_in_first_stage, dims.num_layers_in_last_stage
    if not dims.uneven_pipeline:
        if num_layers % pp:
            raise ValueError(
                f"pipeline_parallel={pp} does not divide num_hidden_layers={num_layers}; choose one of"
                f" {_divisors(num_layers)}, or set num_layers_in_first_stage / num_layers_in_last_stage")
        per_rank = num_layers // pp
        if per_rank % vpp:
            raise ValueError(
                f"virtual_pipeline={vpp} does not divide the {per_rank} layers per pipeline rank;"
                f" choose one of {_divisors(per_rank)}")
        return [per_rank] * pp
    middle_stages = pp - bool(first) - bool(last)
    middle_layers = num_layers - first - last
    for name, count in (("num_layers_in_first_stage", first), ("num_layers_in_last_stage", last)):
        if count and count % vpp:
            raise ValueError(f"{name}={count} is not divisible by virtual_pipeline={vpp}")
    if middle_layers < 0 or bool(middle_layers) != bool(middle_stages):
        raise ValueError(
            f"num_layers_in_first_stage={first} + num_layers_in_last_stage={last} leave {middle_layers}"
            f" of num_hidden_layers={num_layers} for {middle_stages} other pipeline stages;"
            " each stage needs at least one layer")
    if middle_stages and middle_layers % middle_stages:
        raise ValueError(
            f"the {middle_layers} layers between the first and last stage do not split evenly over"
            f" {middle_stages} pipeline stages; change num_layers_in_first_stage / num_layers_in_last_stage")
    per_middle = middle_layers // middle_stages if middle_stages else 0
    if per_middle % vpp:
        raise ValueError(
            f"virtual_pipeline={vpp} does not divide the {per_middle} layers per middle pipeline stage")
    counts = [per_middle] * pp
    if first:
        counts[0] = first
    if last:
        counts[-1] = last
    return counts


def build_parallel_dims(parallel: ParallelConfig, *, world_size: int, arch: ModelArch) -> ParallelDims:
    """ParallelDims for `parallel` on `world_size` processes, validated against `arch`."""
    dims = ParallelDims.from_config(parallel, world_size=world_size)
    validate_layout(dims, arch)
    return dims


@dataclass(frozen=True, kw_only=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def launch_env(environ: Mapping[str, str]) -> LaunchEnv:
    """Rank, world size and rendezvous address from torchrun's or Slurm's variables."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        rank, world_size = int(environ["RANK"]), int(environ["WORLD_SIZE"])
        local_rank = int(environ.get("LOCAL_RANK", rank))
    elif "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        rank, world_size = int(environ["SLURM_PROCID"]), int(environ["SLURM_NTASKS"])
        local_rank = int(environ.get("SLURM_LOCALID", 0))
    elif not environ.get("MASTER_ADDR"):
        # A plain `python script.py`: a one-process group on this machine.
        return LaunchEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=free_port())
    else:
        raise ValueError("MASTER_ADDR is set but neither RANK/WORLD_SIZE (torchrun) nor"
                         " SLURM_PROCID/SLURM_NTASKS (srun) are; launch with torchrun or srun")
    if not environ.get("MASTER_ADDR") or not environ.get("MASTER_PORT"):
        if world_size > 1:
            raise ValueError("MASTER_ADDR and MASTER_PORT must be set for a multi-process launch"
                             " (torchrun sets them; under srun export them in the sbatch script)")
        return LaunchEnv(rank=rank, world_size=1, local_rank=local_rank, master_addr="127.0.0.1",
                         master_port=free_port())
    return LaunchEnv(rank=rank, world_size=world_size, local_rank=local_rank,
                     master_addr=environ["MASTER_ADDR"], master_port=int(environ["MASTER_PORT"]))


def init_distributed(
    parallel: ParallelConfig,
    *,
    arch: ModelArch,
    seed: int,
    environ: Mapping[str, str] | None = None,
    timeout_minutes: int = 30,
) -> ParallelDims:
    """Validate the layout, then start torch.distributed and megatron's parallel state.

    gloo (plus the CPU compatibility layer) without CUDA, NCCL with it. If
    torch.distributed is already initialised (e.g. by a test harness) it is
    reused. Seeds megatron's model-parallel RNG tracker with `seed`.
    """
    import torch
    import torch.distributed as dist

    env = launch_env(os.environ if environ is None else environ)
    world_size = dist.get_world_size() if dist.is_initialized() else env.world_size
    dims = build_parallel_dims(parallel, world_size=world_size, arch=arch)

    from megatron.core import parallel_state, tensor_parallel

    from megatron_gppo.model.cpu_compat import enable_cpu_compat

    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        enable_cpu_compat()
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(env.local_rank)
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=dims.tp,
        pipeline_model_parallel_size=dims.pp,
        virtual_pipeline_model_parallel_size=dims.vpp if dims.vpp > 1 else None,
        distributed_timeout_minutes=timeout_minutes,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
    return dims


def destroy_distributed() -> None:
    """Tear down megatron's parallel state and the default process group."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


__all__ = [
    "LaunchEnv", "ParallelDims", "build_parallel_dims", "destroy_distributed", "init_distributed",
    "launch_env", "validate_layout",
]
