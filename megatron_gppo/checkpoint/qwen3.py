"""Qwen3 dense (`Qwen3ForCausalLM`): per-head q/k RMSNorm, no qkv bias, head_dim independent of hidden/heads.

HF name (per layer under `model.layers.{i}.`)    megatron name (under `decoder.layers.{i}.`)
    input_layernorm.weight                   self_attention.linear_qkv.layer_norm_weight
    self_attn.{q,k,v}_proj.weight            self_attention.linear_qkv.weight  (fused per query group)
    self_attn.q_norm.weight                  self_attention.q_layernorm.weight  ([head_dim])
    self_attn.k_norm.weight                  self_attention.k_layernorm.weight  ([head_dim])
    self_attn.o_proj.weight                  self_attention.linear_proj.weight
    post_attention_layernorm.weight          mlp.linear_fc1.layer_norm_weight
    mlp.{gate,up}_proj.weight                mlp.linear_fc1.weight  ([gate; up])
    mlp.down_proj.weight                     mlp.linear_fc2.weight
"""

from __future__ import annotations

from megatron_gppo.checkpoint.mapping import FamilyMapping, TensorMap

MAPPING = FamilyMapping(
    architecture="Qwen3ForCausalLM",
    family="qwen3",
    model=(
        TensorMap("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
        TensorMap("decoder.final_layernorm.weight", ("model.norm.weight",)),
        TensorMap("output_layer.weight", ("lm_head.weight",), "vocab", requires="untied"),
    ),
    layer=(
        TensorMap("self_attention.linear_qkv.layer_norm_weight", ("input_layernorm.weight",)),
        TensorMap("self_attention.linear_qkv.weight",
                  ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), "qkv"),
        TensorMap("self_attention.q_layernorm.weight", ("self_attn.q_norm.weight",)),
        TensorMap("self_attention.k_layernorm.weight", ("self_attn.k_norm.weight",)),
        TensorMap("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",)),
        TensorMap("mlp.linear_fc1.layer_norm_weight", ("post_attention_layernorm.weight",)),
        TensorMap("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "gate_up"),
        TensorMap("mlp.linear_fc2.weight", ("mlp.down_proj.weight",)),
    ),
)

__all__ = ["MAPPING"]
