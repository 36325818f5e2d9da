"""Hugging Face <-> Megatron checkpoints: per-family tensor maps, conversion, training checkpoints.

The mapping of a model is chosen by the exact `architectures[0]` string of its
HF config.json (`MAPPINGS`), never by substring:

    Qwen2ForCausalLM -> qwen2.py    LlamaForCausalLM -> llama.py    Qwen3ForCausalLM -> qwen3.py

Each family file spells out its whole table, even the rows it shares with
another family: one file is all a reader checks against one HF architecture.

Modules: `mapping` (tables and per-tensor fuse/split), `hf_io` (streaming
safetensors), `dist_io` (megatron torch_dist files without a model),
`convert` (the two conversions), `live` (a running, sharded model: load a
checkpoint, stream HF-named tensors for weight sync), `training` (atomic,
resumable training checkpoints).
"""

from __future__ import annotations

from typing import Any

from megatron_gppo.checkpoint import llama, qwen2, qwen3
from megatron_gppo.checkpoint.mapping import FamilyMapping
from megatron_gppo.model.arch import ModelArch

MAPPINGS: dict[str, FamilyMapping] = {m.architecture: m for m in (qwen2.MAPPING, llama.MAPPING, qwen3.MAPPING)}


def mapping_for_config(config: dict[str, Any]) -> FamilyMapping:
    """The mapping for a HF config.json dict, by its exact `architectures[0]`."""
    architectures = config.get("architectures") or []
    name = architectures[0] if architectures else f"(none; model_type={config.get('model_type')!r})"
    if name not in MAPPINGS:
        raise ValueError(f"unsupported architecture {name}; supported: {', '.join(MAPPINGS)}")
    return MAPPINGS[name]


def mapping_for(arch: ModelArch) -> FamilyMapping:
    """The mapping of a parsed architecture."""
    for m in MAPPINGS.values():
        if m.family == arch.family:
            return m
    raise ValueError(f"unsupported model family {arch.family}; supported: {', '.join(MAPPINGS)}")


__all__ = ["MAPPINGS", "mapping_for", "mapping_for_config"]
