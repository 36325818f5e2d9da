"""Qwen2 / Qwen2.5 (`Qwen2ForCausalLM`): qkv bias, GQA, SwiGLU, tied or untied embeddings.

HF name (per layer under `model.layers.{i}.`)    megatron name (under `decoder.layers.{i}.`)
    input_layernorm.weight                   self_attention.linear_qkv.layer_norm_weight
    self_attn.{q,k,v}_proj.weight / .bias    self_attention.linear_qkv.weight / .bias  (fused per query group)
    self_attn.o_proj.weight                  self_attention.linear_proj.weight
    post_attention_layernorm.weight          mlp.linear_fc1.layer_norm_weight
    mlp.{gate,up}_proj.weight                mlp.linear_fc1.weight  ([gate; up])
    mlp.down_proj.weight                     mlp.linear_fc2.weight
The local layer spec names the two norms input_layernorm / pre_mlp_layernorm
(see mapping.LOCAL_SPEC_NAMES). Verified against megatron: logits equal to ~1e-7.
"""

from __future__ import annotations

from typing import Mapping

import torch

from megatron_gppo.checkpoint import mapping
from megatron_gppo.checkpoint.mapping import FamilyMapping, TensorMap, fuse_qkv, split_qkv
from megatron_gppo.model.arch import ModelArch

MAPPING = FamilyMapping(
    architecture="Qwen2ForCausalLM",
    family="qwen2",
    model=(
        TensorMap("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
        TensorMap("decoder.final_layernorm.weight", ("model.norm.weight",)),
        TensorMap("output_layer.weight", ("lm_head.weight",), "vocab", requires="untied"),
    ),
    layer=(
        TensorMap("self_attention.linear_qkv.layer_norm_weight", ("input_layernorm.weight",)),
        TensorMap("self_attention.linear_qkv.weight",
                  ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), "qkv"),
        TensorMap("self_attention.linear_qkv.bias",
                  ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"), "qkv",
                  requires="qkv_bias"),
        TensorMap("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",)),
        TensorMap("mlp.linear_fc1.layer_norm_weight", ("post_attention_layernorm.weight",)),
        TensorMap("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "gate_up"),
        TensorMap("mlp.linear_fc2.weight", ("mlp.down_proj.weight",)),
    ),
)


def hf_to_megatron(
    hf: Mapping[str, torch.Tensor], *, arch: ModelArch, te_names: bool = False
) -> dict[str, torch.Tensor]:
    """Full megatron state dict (local-spec norm names unless `te_names`) from a HF Qwen2 one."""
    return mapping.hf_to_megatron(MAPPING, hf, arch=arch, te_names=te_names)


def megatron_to_hf(full: Mapping[str, torch.Tensor], *, arch: ModelArch) -> dict[str, torch.Tensor]:
    """HF Qwen2 state dict from a full megatron one (inverse of `hf_to_megatron`)."""
    return mapping.megatron_to_hf(MAPPING, full, arch=arch)


__all__ = ["MAPPING", "fuse_qkv", "hf_to_megatron", "megatron_to_hf", "split_qkv"]
