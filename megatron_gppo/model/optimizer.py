"""Megatron DDP, optimizer (Adam/AdamW, optionally distributed) and learning-rate schedule.

`wrap_ddp` puts each model chunk in megatron's DistributedDataParallel (fp32
grad buffers, gradients averaged over data-parallel ranks at the end of the
pipeline schedule), `build_optimizer` returns `get_megatron_optimizer` with
gradient clipping, and `build_scheduler` megatron's OptimizerParamScheduler
for linear warm-up then constant / linear / cosine decay.

Step convention: `optimizer_step` advances the scheduler *before* stepping,
so optimizer step k (1-based) runs at lr * k / warmup_steps during warm-up
and the first step never runs at lr 0.

Non-finite steps: megatron's fp32 and bf16 optimizers apply a NaN gradient as
it is (only the fp16 loss scaler looks for one), and one rank's NaN reaches the
others only through the data-parallel all-reduce, not through tensor- or
pipeline-parallel peers. `optimizer_step` therefore agrees over the whole job
whether the loss and every local gradient are finite, and when they are not,
no rank steps: the weights, the optimizer moments and the lr schedule stay
exactly as they were (megatron-LM does not advance its schedule on a skipped
step either).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer import TransformerConfig

from megatron_gppo.config import TrainConfig
from megatron_gppo.model.cpu_compat import cuda_type_names


def wrap_ddp(
    chunks: list[torch.nn.Module], *, config: TransformerConfig, train: TrainConfig
) -> list[DistributedDataParallel]:
    """Wrap model chunks in megatron DDP and hook its grad sync into `config` for the schedules."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=train.distributed_optimizer,
    )
    wrapped = [
        # Only the first chunk gets buckets for overlapped reduction (megatron-LM's convention).
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=index > 0)
        for index, chunk in enumerate(chunks)
    ]
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = [chunk.no_sync for chunk in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
    return wrapped


def build_optimizer(
    chunks: list[DistributedDataParallel], *, train: TrainConfig, config: TransformerConfig
) -> MegatronOptimizer:
    """AdamW over all chunks; fp32 master weights when the model is bf16."""
    optimizer_config = OptimizerConfig(
        optimizer="adam",
        lr=train.lr,
        min_lr=train.min_lr,
        weight_decay=train.weight_decay,
        adam_beta1=train.adam_beta1,
        adam_beta2=train.adam_beta2,
        adam_eps=train.adam_eps,
        clip_grad=train.grad_clip,
        bf16=config.bf16,
        params_dtype=config.params_dtype,
        use_distributed_optimizer=train.distributed_optimizer,
    )
    params = [param for chunk in chunks for param in chunk.parameters()]
    with cuda_type_names(params):
        return get_megatron_optimizer(optimizer_config, chunks)


def build_scheduler(optimizer: MegatronOptimizer, *, train: TrainConfig) -> OptimizerParamScheduler:
    """Linear warm-up from 0 over `warmup_steps`, then `lr_schedule` down to `min_lr` at `max_steps`."""
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=train.lr,
        min_lr=train.min_lr,
        lr_warmup_steps=train.warmup_steps,
        # megatron asserts warm-up < decay steps; after max_steps the lr is min_lr anyway.
        lr_decay_steps=max(train.max_steps, train.warmup_steps + 1),
        lr_decay_style=train.lr_schedule,
        start_wd=train.weight_decay,
        end_wd=train.weight_decay,
        wd_incr_steps=1,
        wd_incr_style="constant",
    )


@dataclass(frozen=True, kw_only=True)
class StepStats:
    update_successful: bool
    grad_norm: float
    """Global L2 norm of the gradient before clipping."""
    lr: float


def optimizer_step(
    optimizer: MegatronOptimizer, scheduler: OptimizerParamScheduler, *, chunks: list[torch.nn.Module],
    loss: float,
) -> StepStats:
    """Advance the lr schedule, then clip and apply the accumulated gradients of `chunks`.

    Skipped on every rank (`update_successful=False`, nothing changed) when `loss` or any rank's
    gradient is not finite.
    """
    if not finite_everywhere(chunks, loss=loss):
        return StepStats(update_successful=False, grad_norm=float("nan"), lr=current_lr(optimizer))
    scheduler.step(increment=1)
    update_successful, grad_norm, _ = optimizer.step()
    return StepStats(
        update_successful=bool(update_successful),
        grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
        lr=current_lr(optimizer),
    )


def finite_everywhere(chunks: list[torch.nn.Module], *, loss: float) -> bool:
    """Whether `loss` and the accumulated gradients (megatron's `main_grad`) are finite on every rank."""
    grads = [param.main_grad for chunk in chunks for param in chunk.parameters()
             if getattr(param, "main_grad", None) is not None]
    device = grads[0].device if grads else torch.device("cpu")
    finite = torch.tensor(float(torch.isfinite(torch.tensor(loss))), device=device)
    for grad in grads:
        finite = torch.minimum(finite, torch.isfinite(grad).all().to(finite.dtype))
    if dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def torch_optimizers(optimizer: MegatronOptimizer) -> list[tuple[MegatronOptimizer, torch.optim.Optimizer]]:
    """(megatron optimizer, the torch optimizer it steps) for each optimizer a ChainedOptimizer holds, or for
    `optimizer` itself; one without a torch optimizer (no parameters on this rank) is left out."""
    return [(sub, sub.optimizer) for sub in getattr(optimizer, "chained_optimizers", [optimizer])
            if getattr(sub, "optimizer", None) is not None]


def current_lr(optimizer: MegatronOptimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


def zero_grads(chunks: list[DistributedDataParallel], optimizer: MegatronOptimizer) -> None:
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()


__all__ = [
    "StepStats", "build_optimizer", "build_scheduler", "current_lr", "finite_everywhere", "optimizer_step",
    "torch_optimizers", "wrap_ddp", "zero_grads",
]
