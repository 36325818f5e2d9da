"""HF -> megatron (torch_dist) -> HF reproduces every tensor bit for bit, for every family.

Runs the conversions in this process (they need no process group); the
megatron side's logits at TP / PP layouts are checked in
tests/distributed/test_checkpoint_layouts.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from megatron_gppo.checkpoint.convert import convert_hf_to_megatron, convert_megatron_to_hf
from megatron_gppo.checkpoint.dist_io import TorchDistReader
from tests._checkpoint_models import FAMILIES, load_hf_tensors, save_family_model


def _assert_identical(src: dict, dst: dict) -> None:
    assert sorted(src) == sorted(dst)
    for name, tensor in src.items():
        assert dst[name].dtype == tensor.dtype, name
        assert torch.equal(dst[name], tensor), name


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_bit_exact(tmp_path, family):
    hf = save_family_model(family, tmp_path / "hf")
    convert_hf_to_megatron(hf, tmp_path / "meg", progress=False)
    convert_megatron_to_hf(tmp_path / "meg", tmp_path / "back", max_shard_size="40KB", progress=False)
    _assert_identical(load_hf_tensors(hf), load_hf_tensors(tmp_path / "back"))

    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded at 40KB
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == json.loads((hf / "config.json").read_text())
    assert not list(tmp_path.glob(".*tmp*"))  # temporary directories were renamed away


def test_bf16_sharded_input_keeps_dtype_and_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    hf = save_family_model("qwen2_untied", tmp_path / "hf", dtype=torch.bfloat16, max_shard_size="60KB")
    assert (hf / "model.safetensors.index.json").is_file()
    convert_hf_to_megatron(hf, tmp_path / "meg", progress=False)
    reader = TorchDistReader(tmp_path / "meg")
    assert reader.shape("decoder.layers.self_attention.linear_qkv.weight") == (4, 128, 64)  # [layers, (4+2+2)*16, h]
    assert reader.dtype("decoder.layers.self_attention.linear_qkv.weight") == torch.bfloat16
    assert (tmp_path / "meg" / "hf" / "tokenizer.json").is_file()

    convert_megatron_to_hf(tmp_path / "meg", tmp_path / "back", progress=False)
    _assert_identical(load_hf_tensors(hf), load_hf_tensors(tmp_path / "back"))
    tokens = torch.tensor([[1, 5, 7, 9, 11]])
    with torch.no_grad():
        original = AutoModelForCausalLM.from_pretrained(hf)(tokens).logits
        back = AutoModelForCausalLM.from_pretrained(tmp_path / "back")(tokens).logits
    assert torch.equal(original, back)


def test_megatron_to_hf_cast_dtype(tmp_path):
    hf = save_family_model("qwen3_qknorm", tmp_path / "hf")
    convert_hf_to_megatron(hf, tmp_path / "meg", progress=False)
    convert_megatron_to_hf(tmp_path / "meg", tmp_path / "back", dtype="bfloat16", progress=False)
    back = load_hf_tensors(tmp_path / "back")
    assert {t.dtype for t in back.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "back" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    src = load_hf_tensors(hf)
    assert all(torch.equal(back[n], src[n].to(torch.bfloat16)) for n in src)


def test_output_directory_must_be_new(tmp_path):
    hf = save_family_model("qwen2_tied", tmp_path / "hf")
    (tmp_path / "meg").mkdir()
    (tmp_path / "meg" / "something").write_text("x")
    with pytest.raises(ValueError, match="already exists and is not empty"):
        convert_hf_to_megatron(hf, tmp_path / "meg", progress=False)


class _WithExtraState(torch.nn.Module):
    """Like Transformer Engine's modules: reports an `_extra_state` entry a checkpoint may lack."""

    def get_extra_state(self):
        return torch.zeros(0)

    def set_extra_state(self, state):
        pass


class _Layer(_WithExtraState):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)
        self.attention = _WithExtraState()


def test_resume_tolerates_missing_extra_state_and_nothing_else():
    from megatron_gppo.checkpoint.training import load_module_state

    source = _Layer()
    saved = {key: value for key, value in source.state_dict().items() if not key.endswith("_extra_state")}
    assert {"_extra_state", "attention._extra_state"} <= set(source.state_dict()) - set(saved)
    target = _Layer()
    load_module_state(target, saved)
    assert torch.equal(target.linear.weight, source.linear.weight)
    for broken in ({k: v for k, v in saved.items() if k != "linear.bias"}, {**saved, "linear.scale": torch.ones(1)}):
        with pytest.raises(RuntimeError, match="linear"):
            load_module_state(_Layer(), broken)
