"""Llama 3 (`LlamaForCausalLM`): GQA, no biases, SwiGLU, llama3 rope scaling, tied (3.2 1B/3B) or untied.

HF name (per layer under `model.layers.{i}.`)    megatron name (under `decoder.layers.{i}.`)
    input_layernorm.weight                   self_attention.linear_qkv.layer_norm_weight
    self_attn.{q,k,v}_proj.weight            self_attention.linear_qkv.weight  (fused per query group)
    self_attn.o_proj.weight                  self_attention.linear_proj.weight
    post_attention_layernorm.weight          mlp.linear_fc1.layer_norm_weight
    mlp.{gate,up}_proj.weight                mlp.linear_fc1.weight  ([gate; up])
    mlp.down_proj.weight                     mlp.linear_fc2.weight
Rope scaling lives in the architecture (provider), not in any tensor.
"""

from __future__ import annotations

from megatron_gppo.checkpoint.mapping import FamilyMapping, TensorMap

MAPPING = FamilyMapping(
    architecture="LlamaForCausalLM",
    family="llama",
    model=(
        TensorMap("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
        TensorMap("decoder.final_layernorm.weight", ("model.norm.weight",)),
        TensorMap("output_layer.weight", ("lm_head.weight",), "vocab", requires="untied"),
    ),
    layer=(
        TensorMap("self_attention.linear_qkv.layer_norm_weight", ("input_layernorm.weight",)),
        TensorMap("self_attention.linear_qkv.weight",
                  ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), "qkv"),
        TensorMap("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",)),
        TensorMap("mlp.linear_fc1.layer_norm_weight", ("post_attention_layernorm.weight",)),
        TensorMap("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "gate_up"),
        TensorMap("mlp.linear_fc2.weight", ("mlp.down_proj.weight",)),
    ),
)

__all__ = ["MAPPING"]
