"""Tiny Hugging Face models for tests, built in code (no download), and reference log-probs.

`save_test_model(dir)` writes a 2-layer Qwen2 (hidden 64, GQA, tied
embeddings) with the demo's character-level tokenizer in HF format, which
`megatron-gppo serve` and `AutoModelForCausalLM` load like any model.
Import as `from tests._tiny_models import ...` (the suite runs from the repo root).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

# Room for prompt + response in the tests; the demo model defaults to 64.
TEST_MAX_POSITIONS = 256


def save_test_model(output_dir: str | Path, *, seed: int = 0) -> Path:
    from megatron_gppo.tasks.tiny_model import save_tiny_model

    return save_tiny_model(output_dir, seed=seed, num_layers=2, hidden_size=64, intermediate_size=128,
                           num_heads=4, num_kv_heads=2, max_positions=TEST_MAX_POSITIONS)


def load_model(model_dir: str | Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval().requires_grad_(False)


def perturbed(model, *, seed: int, scale: float = 0.2):
    """The same model with every parameter moved by `scale * N(0, 1)` (in place), for weight-sync tests."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    return model


@torch.no_grad()
def reference_log_probs(model, prompt_ids: Sequence[int], response_ids: Sequence[int], *,
                        temperature: float = 1.0) -> torch.Tensor:
    """`[len(response_ids)]` log-probs of the response under one unpadded forward, log_softmax(logits / T)."""
    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    logits = model(ids).logits[0].float()
    log_probs = torch.log_softmax(logits / temperature, dim=-1)
    start = len(prompt_ids) - 1
    targets = torch.tensor(list(response_ids))
    return log_probs[start:start + len(response_ids)].gather(1, targets[:, None]).squeeze(1)


def save_tiny_run(root: str | Path) -> Path:
    """What a tiny RL / SFT run needs under `root`: train.jsonl (64 problems), eval.jsonl (4) and hf/."""
    from megatron_gppo.tasks.arithmetic import split_problems, write_jsonl

    root = Path(root)
    train, held_out = split_problems(num_train=64, num_eval=4, seed=0)
    write_jsonl(train, root / "train.jsonl")
    write_jsonl(held_out, root / "eval.jsonl")
    save_test_model(root / "hf")
    return root


def tiny_run_overrides(root: str | Path) -> list[str]:
    """Overrides of examples/configs/demo_cpu.yaml for a seconds-long run on `save_tiny_run(root)`'s data."""
    root = Path(root)
    return [f"data.train_path={root / 'train.jsonl'}", f"data.eval_path={root / 'eval.jsonl'}",
            "train.prompts_per_step=4", "rollout.num_samples_per_prompt=4", "rollout.max_new_tokens=6",
            "train.micro_batch_size=8", "train.eval_samples_per_prompt=2", "algorithm.max_refill_rounds=0",
            "logging.wandb_mode=disabled"]


# What the rollout server's own log-probs feed: they depend on how its requests happened to be batched (~1e-8).
# With algorithm.tis_cap set (async mode's default) the truncated IS weights are made from them too.
SERVER_LOG_PROB_KEYS = {"rollout_logprob_abs_diff", "rollout_kl", "tis_weight_mean", "tis_clip_frac"}


def computed_metrics(record: dict) -> dict:
    """A metrics.jsonl record without what depends on wall-clock time or on the server's batching."""
    return {k: v for k, v in record.items()
            if not (k.endswith("_s") or "time" in k or "per_s" in k or k in SERVER_LOG_PROB_KEYS)}
