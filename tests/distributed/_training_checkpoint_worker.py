"""Worker processes for tests/distributed/test_checkpoint_training.py.

A tiny fp32 Qwen2-shaped model trained with megatron DDP + the distributed
optimizer (AdamW, warm-up + cosine lr) on fixed batches; the loss is the
next-token cross-entropy of `hidden @ output_weight.T` (TP=1).

- `run_dp2` (2 processes, DP=2): steps 1..3, saving after each (keep_last=2),
  records the parameters and RNG draws right after the step-3 save, then
  takes step 4 and records the parameters again.
- `run_killed` (one plain process, started by the test in its own session):
  step 1, a complete save, then a step-2 save that hangs after megatron has
  written the weights but before the checkpoint is complete; the test
  SIGKILLs it there.
- `run_dp1` (1 process, DP=1): resumes the DP=2 run (optimizer resharded),
  checks the parameters, RNG draws, lr and the data-sampler position, takes
  step 4 on the whole batch and records the parameters; then loads the killed
  run's latest checkpoint and saves over its stale temporary directory.
- `run_disk_faults` (1 process): saves steps 1 and 2 on a small tmpfs that
  cannot hold a third checkpoint, fails to save step 3 there, then again
  after the filesystem is remounted read-only.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

CONFIG = {
    "architectures": ["Qwen2ForCausalLM"], "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 50, "max_position_embeddings": 32,
    "tie_word_embeddings": False,
}
TRAIN = {"lr": 1e-2, "warmup_steps": 2, "lr_schedule": "cosine", "max_steps": 10, "distributed_optimizer": True,
         "weight_decay": 0.01}
ROWS, SEQ = 4, 12


def batch(step: int) -> torch.Tensor:
    """`[ROWS, SEQ]` tokens of optimizer step `step` (DP ranks take contiguous halves)."""
    return torch.randint(0, CONFIG["vocab_size"], (ROWS, SEQ), generator=torch.Generator().manual_seed(100 + step))


def _setup(rank: int, world_size: int, port: int):
    from megatron_gppo.config import ModelConfig, ParallelConfig, TrainConfig
    from megatron_gppo.model.arch import ModelArch
    from megatron_gppo.model.optimizer import build_optimizer, build_scheduler, wrap_ddp
    from megatron_gppo.model.parallel import init_distributed
    from megatron_gppo.model.provider import build_model_chunks

    arch = ModelArch.from_hf_config(CONFIG)
    environ = {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    dims = init_distributed(ParallelConfig(), arch=arch, seed=1234, environ=environ)
    chunks = build_model_chunks(arch, dims, model=ModelConfig(dtype="float32"))
    train = TrainConfig(**TRAIN)
    model = wrap_ddp(chunks, config=chunks[0].config, train=train)
    optimizer = build_optimizer(model, train=train, config=chunks[0].config)
    return arch, dims, model, optimizer, build_scheduler(optimizer, train=train)


def train_step(model, optimizer, scheduler, *, step: int, dp_rank: int, dp: int) -> float:
    from megatron_gppo.model.optimizer import optimizer_step, zero_grads

    tokens = batch(step).chunk(dp)[dp_rank]
    zero_grads(model, optimizer)
    positions = torch.arange(SEQ)[None].expand_as(tokens)
    hidden = model[0](tokens, positions, None)  # [s, b, h]
    logits = (hidden @ model[0].module.output_weight().t()).transpose(0, 1)  # [b, s, V]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    loss.backward()
    model[0].finish_grad_sync()
    stats = optimizer_step(optimizer, scheduler, chunks=model, loss=loss.item())
    return stats.lr


def params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model[0].module.named_parameters()}


def rng_draws() -> dict:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    with get_cuda_rng_tracker().fork():
        tracker = torch.rand(3).tolist()
    return {"torch": torch.rand(3).tolist(), "python": random.random(), "numpy": float(np.random.rand()),
            "tracker": tracker}


def run_dp2(rank: int, port: int, root: str) -> None:
    from megatron_gppo.checkpoint.training import save_training_checkpoint
    from megatron_gppo.model.parallel import destroy_distributed

    _, dims, model, optimizer, scheduler = _setup(rank, 2, port)
    run = Path(root) / "run_dp2"
    for step in (1, 2, 3):
        train_step(model, optimizer, scheduler, step=step, dp_rank=rank, dp=2)
        save_training_checkpoint(run, step=step, model=model, optimizer=optimizer, scheduler=scheduler,
                                 extra={"sampler": {"consumed": 4 * step}}, config={"train": TRAIN}, keep_last=2)
    saved = {"params": params(model), "rng": rng_draws(), "lr": optimizer.param_groups[0]["lr"]}
    lr4 = train_step(model, optimizer, scheduler, step=4, dp_rank=rank, dp=2)
    if rank == 0:
        torch.save({**saved, "params_after_4": params(model), "lr_after_4": lr4}, Path(root) / "dp2_reference.pt")
    destroy_distributed()


def run_killed(root: str, port: int) -> None:
    """Runs as `python -c`; prints SAVED1 after a complete save and HANGING inside the second one."""
    import megatron.core.dist_checkpointing as dist_checkpointing

    from megatron_gppo.checkpoint.training import save_training_checkpoint

    _, _, model, optimizer, scheduler = _setup(0, 1, port)
    run = Path(root) / "run_killed"
    train_step(model, optimizer, scheduler, step=1, dp_rank=0, dp=1)
    save_training_checkpoint(run, step=1, model=model, optimizer=optimizer, scheduler=scheduler,
                             extra={"sampler": {"consumed": 4}})
    torch.save(params(model), Path(root) / "killed_step1.pt")
    print("SAVED1", flush=True)
    train_step(model, optimizer, scheduler, step=2, dp_rank=0, dp=1)
    original = dist_checkpointing.save

    def save_then_hang(*args, **kwargs):
        original(*args, **kwargs)
        print("HANGING", flush=True)
        time.sleep(600)

    dist_checkpointing.save = save_then_hang
    save_training_checkpoint(run, step=2, model=model, optimizer=optimizer, scheduler=scheduler)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def run_dp1(rank: int, port: int, root: str) -> None:
    from megatron_gppo.checkpoint.training import (find_latest, load_training_checkpoint, resume,
                                                   save_training_checkpoint)
    from megatron_gppo.model.parallel import destroy_distributed

    root_path = Path(root)
    reference = torch.load(root_path / "dp2_reference.pt")
    _, _, model, optimizer, scheduler = _setup(0, 1, port)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        state = resume(root_path / "run_dp2", model=model, optimizer=optimizer, scheduler=scheduler)
    result = {
        "printed": out.getvalue(),
        "step": state.step,
        "extra": state.extra,
        "config": state.config,
        "params_diff": _max_diff(params(model), reference["params"]),
        "lr": optimizer.param_groups[0]["lr"],
        "lr_reference": reference["lr"],
        "rng_equal": rng_draws() == reference["rng"],
    }
    lr4 = train_step(model, optimizer, scheduler, step=4, dp_rank=0, dp=1)
    result["params_after_4_diff"] = _max_diff(params(model), reference["params_after_4"])
    result["lr_after_4"], result["lr_after_4_reference"] = lr4, reference["lr_after_4"]

    killed = root_path / "run_killed"
    latest = find_latest(killed)
    result["killed_latest"] = latest.name
    state = load_training_checkpoint(latest, model=model, optimizer=optimizer, scheduler=scheduler)
    result["killed_step"], result["killed_extra"] = state.step, state.extra
    result["killed_params_diff"] = _max_diff(params(model), torch.load(root_path / "killed_step1.pt"))
    # The next save of the killed run replaces its stale temporary directory.
    save_training_checkpoint(killed, step=2, model=model, optimizer=optimizer, scheduler=scheduler)
    result["after_resave"] = sorted(p.name for p in (killed / "checkpoints").iterdir())
    result["after_resave_latest"] = (killed / "checkpoints" / "latest").read_text().strip()
    (root_path / "dp1_result.json").write_text(json.dumps(result))
    destroy_distributed()


def run_disk_faults(rank: int, port: int, disk: str, out: str) -> None:
    from megatron_gppo.checkpoint.training import CheckpointWriteError, resume, save_training_checkpoint

    _, _, model, optimizer, scheduler = _setup(0, 1, port)
    run = Path(disk) / "run"
    checkpoints = run / "checkpoints"
    for step in (1, 2):
        train_step(model, optimizer, scheduler, step=step, dp_rank=0, dp=1)
        save_training_checkpoint(run, step=step, model=model, optimizer=optimizer, scheduler=scheduler, keep_last=2)
    saved = params(model)
    train_step(model, optimizer, scheduler, step=3, dp_rank=0, dp=1)
    result = {}
    for fault in ("disk_full", "read_only"):
        if fault == "read_only":
            subprocess.run(["mount", "-o", "remount,ro", disk], check=True)
        try:
            save_training_checkpoint(run, step=3, model=model, optimizer=optimizer, scheduler=scheduler,
                                     keep_last=2)
            result[fault] = {"error": None}
        except CheckpointWriteError as err:
            result[fault] = {"error": str(err), "dirs": sorted(p.name for p in checkpoints.iterdir()),
                             "latest": (checkpoints / "latest").read_text().strip()}
    state = resume(run, model=model, optimizer=optimizer, scheduler=scheduler)
    result["resumed_step"], result["resumed_params_diff"] = state.step, _max_diff(params(model), saved)
    Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    run_killed(sys.argv[1], int(sys.argv[2]))
