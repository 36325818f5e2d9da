"""Architecture of a decoder-only model, read from a Hugging Face `config.json`.

Pure Python (no torch, no transformers): the parallel layout is validated from
this before any process group or model exists, and the Megatron provider and
the checkpoint converters build from it.

Families are keyed by the exact `architectures` string (or the exact
`model_type` when a config has no `architectures`), never by substring.
Both the transformers 4.x rope keys (`rope_theta`, `rope_scaling`) and the
5.x ones (`rope_parameters`) are understood.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# architectures[0] -> (family, default qkv bias, qk layernorm)
_ARCHITECTURES = {
    "Qwen2ForCausalLM": ("qwen2", True, False),
    "LlamaForCausalLM": ("llama", False, False),
    "Qwen3ForCausalLM": ("qwen3", False, True),
}
_MODEL_TYPES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}


@dataclass(frozen=True, kw_only=True)
class ModelArch:
    """What the Megatron GPTModel needs to reproduce a Hugging Face causal LM."""

    family: str
    """qwen2, llama or qwen3."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    """Key/value heads (GQA); equal to num_attention_heads for plain multi-head attention."""

    head_dim: int
    """Per-head channels; Qwen3 may differ from hidden_size / num_attention_heads."""

    vocab_size: int
    """True vocabulary size (rows of the HF embedding), before any padding for TP."""

    max_position_embeddings: int
    norm_eps: float
    rope_theta: float
    qkv_bias: bool
    mlp_bias: bool
    qk_layernorm: bool
    tie_word_embeddings: bool

    rope_scaling_type: str = "default"
    """default (none), linear or llama3."""

    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192

    @classmethod
    def from_hf_config(cls, config: dict[str, Any] | str | os.PathLike) -> "ModelArch":
        """Parse a config.json dict, a path to one, or a model directory containing one."""
        if not isinstance(config, dict):
            path = Path(config)
            if path.is_dir():
                path = path / "config.json"
            if not path.is_file():
                raise ValueError(f"no Hugging Face config.json at {path}")
            config = json.loads(path.read_text())
        return _parse(config)

    @property
    def num_params(self) -> int:
        """Parameter count of the unpadded model (embedding counted once when tied)."""
        q = self.num_attention_heads * self.head_dim
        kv = self.num_query_groups * self.head_dim
        attn = self.hidden_size * (q + 2 * kv) + q * self.hidden_size
        if self.qkv_bias:
            attn += q + 2 * kv
        if self.qk_layernorm:
            attn += 2 * self.head_dim
        mlp = 3 * self.hidden_size * self.ffn_hidden_size
        if self.mlp_bias:
            mlp += 2 * self.ffn_hidden_size + self.hidden_size
        layer = attn + mlp + 2 * self.hidden_size
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + embeddings + self.hidden_size


def _parse(config: dict[str, Any]) -> ModelArch:
    architectures = config.get("architectures") or []
    name = architectures[0] if architectures else _MODEL_TYPES.get(config.get("model_type", ""), "")
    if name not in _ARCHITECTURES:
        shown = architectures[0] if architectures else f"model_type={config.get('model_type')!r}"
        raise ValueError(f"unsupported architecture {shown}; supported: {', '.join(_ARCHITECTURES)}")
    family, default_qkv_bias, qk_layernorm = _ARCHITECTURES[name]

    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{name}: hidden_act={config['hidden_act']!r} is not supported (only silu / SwiGLU)")
    if config.get("use_sliding_window", False):
        raise ValueError(f"{name}: use_sliding_window=true is not supported; set it to false")

    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    if rope_type not in ("default", "linear", "llama3"):
        raise ValueError(f"{name}: rope type {rope_type!r} is not supported; supported: default, linear, llama3")
    rope_theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))

    return ModelArch(
        family=family,
        num_layers=int(config["num_hidden_layers"]),
        hidden_size=hidden,
        ffn_hidden_size=int(config["intermediate_size"]),
        num_attention_heads=heads,
        num_query_groups=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or hidden // heads),
        vocab_size=int(config["vocab_size"]),
        max_position_embeddings=int(config.get("max_position_embeddings", 4096)),
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta),
        qkv_bias=bool(config.get("attention_bias", default_qkv_bias)),
        mlp_bias=bool(config.get("mlp_bias", False)),
        qk_layernorm=qk_layernorm,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        rope_scaling_type=rope_type,
        rope_scaling_factor=float(rope.get("factor", 1.0)),
        rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        rope_original_max_position_embeddings=int(rope.get("original_max_position_embeddings", 8192)),
    )


__all__ = ["ModelArch"]
