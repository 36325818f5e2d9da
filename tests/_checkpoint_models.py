"""Tiny random Hugging Face models of every supported family, for the checkpoint tests.

All have 4 layers (so PP=2 x VPP=2 splits them), hidden 64, 4 heads / 2 KV
heads, and are saved with `save_pretrained` (safetensors). Import as
`from tests._checkpoint_models import ...` or, from tests/distributed workers,
by path.

    qwen2_untied   Qwen2 (qkv bias), untied embeddings, the demo's char tokenizer
    qwen2_tied     Qwen2, tied embeddings (save_tiny_model's default)
    llama_gqa      Llama 3 style: GQA, no bias, llama3 rope scaling, vocab 67 (TP=2 pads a row)
    qwen3_qknorm   Qwen3: q/k RMSNorm, head_dim 32 != hidden / heads, tied embeddings
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("qwen2_untied", "qwen2_tied", "llama_gqa", "qwen3_qknorm")
_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)


def _randomize_norms(model, *, seed: int) -> None:
    # Fresh RMSNorm weights are all ones; random ones make a wrong norm mapping visible.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=generator))


def save_family_model(name: str, output_dir: str | Path, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                      max_shard_size: str | None = None) -> Path:
    """Build and save the tiny model `name` (see FAMILIES); `max_shard_size` writes a sharded checkpoint."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    from megatron_gppo.tasks.tiny_model import build_tokenizer

    output_dir = Path(output_dir)
    tokenizer = None
    if name.startswith("qwen2"):
        tokenizer = build_tokenizer()
        config = Qwen2Config(vocab_size=len(tokenizer), tie_word_embeddings=name == "qwen2_tied",
                             bos_token_id=1, eos_token_id=2, pad_token_id=0, **_COMMON)
    elif name == "llama_gqa":
        config = LlamaConfig(vocab_size=67, tie_word_embeddings=False, rope_theta=500000.0,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
                             **_COMMON)
    elif name == "qwen3_qknorm":
        config = Qwen3Config(vocab_size=64, head_dim=32, tie_word_embeddings=True, **_COMMON)
    else:
        raise ValueError(f"unknown tiny family {name}; choose one of {FAMILIES}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize_norms(model, seed=seed)
    model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(output_dir, **kwargs)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    return output_dir


def load_hf_tensors(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file in a directory."""
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors
