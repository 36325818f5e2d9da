"""Worker processes for test_estimate_memory.py: measured peak memory of RL training steps.

Each layout builds a randomly initialised fp32 Qwen2-shaped policy (8 layers,
hidden 512, 8 heads / 2 KV heads, SwiGLU 1408, vocab 16,000: 39M parameters),
runs two CE-GPPO steps, each on micro-batches of 2 sequences x 256 tokens (the
second step is the peak: Adam's state exists from the first), and writes, per
rank, the measured bytes next to `estimate_memory`'s components to
`<out>/<layout>.rank<r>.json` (memory as megatron_gppo.model.peak_memory
measures it: anonymous RSS, and the RSS high-water mark less file pages):

    baseline   memory after imports and process-group start, before the model exists
    peak       the high-water mark during the two steps, minus the baseline
    static     memory after the steps (weights, grads, optimizer state), minus the baseline
    num_params parameters this rank's model chunks hold

Layouts sharing a world size run one after another in one gloo group
(megatron's parallel state is re-initialised in place).
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import torch

MODEL = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 512,
    "intermediate_size": 1408,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "vocab_size": 16000,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
}
SEQ_LEN = 256
MICRO_BATCH_SIZE = 2
NUM_STEPS = 2

# name: (ParallelConfig fields, micro-batches per step); with PP=2 and two micro-batches,
# 1F1B's first stage holds both micro-batches' activations at once.
LAYOUTS = {
    "tp1": ({}, 1),
    "tp2": ({"tensor_parallel": 2}, 1),
    "pp2": ({"pipeline_parallel": 2}, 2),
}


def random_batch(vocab_size: int, *, num_microbatches: int):
    """Every token but the first is scored, as in a batch of long responses."""
    from megatron_gppo.model.policy import PolicyBatch

    gen = torch.Generator().manual_seed(0)
    shape = (MICRO_BATCH_SIZE * num_microbatches, SEQ_LEN)
    loss_mask = torch.ones(shape, dtype=torch.bool)
    loss_mask[:, 0] = False
    return PolicyBatch(tokens=torch.randint(0, vocab_size, shape, generator=gen), loss_mask=loss_mask,
                       advantages=torch.randn(shape, generator=gen), old_log_probs=torch.full(shape, -1.0))


def measure(rank: int, world_size: int, port: int, name: str, out_dir: str) -> None:
    from megatron.core import parallel_state

    from megatron_gppo.config import ModelConfig, ParallelConfig, TrainConfig
    from megatron_gppo.model import peak_memory
    from megatron_gppo.model.arch import ModelArch
    from megatron_gppo.model.memory import estimate_memory
    from megatron_gppo.model.parallel import init_distributed
    from megatron_gppo.model.policy import Policy

    arch = ModelArch.from_hf_config(MODEL)
    environ = {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    parallel_fields, num_microbatches = LAYOUTS[name]
    dims = init_distributed(ParallelConfig(**parallel_fields), arch=arch, seed=1234, environ=environ)
    model, train = ModelConfig(dtype="float32", recompute="none"), TrainConfig(lr=1e-5)
    batch = random_batch(arch.vocab_size, num_microbatches=num_microbatches)
    gc.collect()
    baseline = peak_memory.current_bytes()
    policy = Policy(arch=arch, dims=dims, model=model, train=train)
    # Building splits full-size initial weights on CPU; that transient is not part of a step.
    peak_memory.reset_peak()
    for _ in range(NUM_STEPS):
        policy.forward_backward_step(batch, loss_name="ce_gppo", micro_batch_size=MICRO_BATCH_SIZE)
    peak = peak_memory.peak_bytes() - baseline
    static = peak_memory.current_bytes() - baseline
    estimate = estimate_memory(
        arch=arch, dims=dims, micro_batch_size=MICRO_BATCH_SIZE, seq_length=SEQ_LEN, dtype=model.dtype,
        recompute=model.recompute, distributed_optimizer=train.distributed_optimizer,
        num_microbatches=num_microbatches, device="cpu",
        pipeline_rank=parallel_state.get_pipeline_model_parallel_rank())
    result = {
        "baseline": baseline, "peak": peak, "static": static,
        "num_params": sum(param.numel() for chunk in policy.chunks for param in chunk.parameters()),
        "pipeline_rank": parallel_state.get_pipeline_model_parallel_rank(),
        "estimate": estimate.to_dict(),
    }
    Path(out_dir, f"{name}.rank{rank}.json").write_text(json.dumps(result))
    del policy
    gc.collect()


def run_layouts(rank: int, world_size: int, port: int, names: list[str], out_dir: str) -> None:
    from megatron_gppo.model import peak_memory

    torch.set_num_threads(1)
    peak_memory.release_freed_memory_promptly()
    for name in names:
        measure(rank, world_size, port, name, out_dir)


if __name__ == "__main__":
    raise SystemExit("spawned by tests/distributed/test_estimate_memory.py")
