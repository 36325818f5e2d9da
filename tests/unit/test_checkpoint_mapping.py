"""The per-family tables and per-tensor fuse / split functions (pure torch, no megatron model)."""

from __future__ import annotations

import pytest
import torch

from megatron_gppo.checkpoint import MAPPINGS, mapping_for, mapping_for_config
from megatron_gppo.checkpoint.mapping import (
    canonical_name,
    fuse,
    fuse_qkv,
    gather_tp_shards,
    hf_to_megatron,
    local_spec_name,
    megatron_to_hf,
    split,
)
from megatron_gppo.model.arch import ModelArch

QWEN2 = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 8, "intermediate_size": 12,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 11,
         "tie_word_embeddings": False}


def test_registry_is_keyed_by_exact_architecture():
    assert set(MAPPINGS) == {"Qwen2ForCausalLM", "LlamaForCausalLM", "Qwen3ForCausalLM"}
    assert mapping_for_config({"architectures": ["Qwen3ForCausalLM"]}).family == "qwen3"
    for name in ("Qwen2ForCausalLMWithValueHead", "Qwen2MoeForCausalLM", "MistralForCausalLM"):
        with pytest.raises(ValueError, match=r"unsupported architecture .*; supported: Qwen2ForCausalLM, "
                                             r"LlamaForCausalLM, Qwen3ForCausalLM"):
            mapping_for_config({"architectures": [name]})


def test_qkv_is_fused_per_query_group():
    arch = ModelArch.from_hf_config(QWEN2)  # 4 heads, 2 groups, head_dim 2
    q = torch.arange(8.0)  # heads 0..3, 2 rows each
    k = 100 + torch.arange(4.0)
    v = 200 + torch.arange(4.0)
    expected = [0, 1, 2, 3, 100, 101, 200, 201, 4, 5, 6, 7, 102, 103, 202, 203]
    assert fuse_qkv(q, k, v, arch=arch).tolist() == expected


@pytest.mark.parametrize("kind", ["copy", "qkv", "gate_up"])
def test_split_inverts_fuse_bit_for_bit(kind):
    arch = ModelArch.from_hf_config(QWEN2)
    shapes = {"copy": [(8, 8)], "qkv": [(8, 8), (4, 8), (4, 8)], "gate_up": [(12, 8), (12, 8)]}[kind]
    parts = [torch.randn(shape, dtype=torch.bfloat16) for shape in shapes]
    back = split(kind, fuse(kind, parts, arch=arch), arch=arch)
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(parts, back, strict=True))


def test_vocab_split_drops_padding_rows():
    arch = ModelArch.from_hf_config(QWEN2)
    padded = torch.randn(12, 8)
    assert torch.equal(split("vocab", padded, arch=arch)[0], padded[:11])


def test_gate_up_tp_shards_gather_to_gate_then_up():
    gate, up = torch.randn(12, 8), torch.randn(12, 8)
    shards = [torch.cat([gate[:6], up[:6]]), torch.cat([gate[6:], up[6:]])]  # what each TP rank holds
    assert torch.equal(gather_tp_shards("gate_up", shards, dim=0), torch.cat([gate, up]))
    qkv = torch.randn(16, 8)
    assert torch.equal(gather_tp_shards("qkv", list(qkv.chunk(2)), dim=0), qkv)


def test_local_and_canonical_norm_names():
    local = "decoder.layers.3.input_layernorm.weight"
    assert canonical_name(local) == "decoder.layers.3.self_attention.linear_qkv.layer_norm_weight"
    assert local_spec_name(canonical_name(local)) == local
    fc1_norm = "decoder.layers.1.mlp.linear_fc1.layer_norm_weight"
    assert canonical_name("decoder.layers.1.pre_mlp_layernorm.weight") == fc1_norm


@pytest.mark.parametrize("architecture", sorted(MAPPINGS))
def test_state_dict_round_trip_every_family(architecture):
    config = {**QWEN2, "architectures": [architecture], "head_dim": 2}
    arch = ModelArch.from_hf_config(config)
    family = mapping_for(arch)
    hf = {}
    for m in family.bound_maps(arch):
        for name in m.hf:
            if name.endswith(("q_proj.weight", "o_proj.weight")):
                shape = (8, 8)
            elif name.endswith(("k_proj.weight", "v_proj.weight")):
                shape = (4, 8)
            elif name.endswith("q_proj.bias"):
                shape = (8,)
            elif name.endswith(("k_proj.bias", "v_proj.bias")):
                shape = (4,)
            elif name.endswith(("gate_proj.weight", "up_proj.weight")):
                shape = (12, 8)
            elif name.endswith("down_proj.weight"):
                shape = (8, 12)
            elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
                shape = (11, 8)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                shape = (2,)
            else:
                shape = (8,)
            hf[name] = torch.randn(shape)
    for te_names in (True, False):
        full = hf_to_megatron(family, hf, arch=arch, te_names=te_names)
        back = megatron_to_hf(family, full, arch=arch)
        assert back.keys() == hf.keys()
        assert all(torch.equal(back[n], hf[n]) for n in hf)
    assert ("model.layers.0.self_attn.q_norm.weight" in hf) == (architecture == "Qwen3ForCausalLM")
    assert ("model.layers.0.self_attn.q_proj.bias" in hf) == (architecture == "Qwen2ForCausalLM")
