"""megatron_gppo.model.memory against real megatron models, and tools/estimate_memory.py.

Parameters per rank and the per-layer activation bytes are checked exactly
against megatron-core models built in this process: each rank of a TP x PP
layout is built in turn under a fake process group (torch's "fake" backend:
collectives are no-ops, so one process can be any rank of any world size).
Activation bytes are what autograd saves in a forward pass (saved-tensor
hooks, unique storages, parameters excluded), one layer being the difference
between a 3-layer and a 1-layer model. The measured peak memory of whole
training steps is compared in tests/distributed/test_estimate_memory.py.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megatron_gppo.config import ModelConfig, ParallelConfig
from megatron_gppo.model.arch import ModelArch
from megatron_gppo.model.memory import (
    LOGPROB_TILE,
    estimate_memory,
    layer_activation_bytes,
    num_in_flight,
    num_params_per_rank,
)
from megatron_gppo.model.parallel import ParallelDims, build_parallel_dims, destroy_distributed

TOOL = Path(__file__).resolve().parents[2] / "tools" / "estimate_memory.py"
COMMON = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4, "num_attention_heads": 4,
          "num_key_value_heads": 2, "max_position_embeddings": 256, "hidden_act": "silu"}
ARCHS = {
    # qkv bias, tied embeddings, a vocab that TP=2 pads by one row
    "qwen2_tied": {**COMMON, "architectures": ["Qwen2ForCausalLM"], "vocab_size": 251, "tie_word_embeddings": True},
    "llama": {**COMMON, "architectures": ["LlamaForCausalLM"], "vocab_size": 256, "tie_word_embeddings": False},
    # qk-norm, head_dim != hidden / heads
    "qwen3": {**COMMON, "architectures": ["Qwen3ForCausalLM"], "vocab_size": 250, "head_dim": 24,
              "tie_word_embeddings": False},
}
LAYOUTS = {
    "tp1": ParallelConfig(),
    "tp2": ParallelConfig(tensor_parallel=2),
    "pp2": ParallelConfig(pipeline_parallel=2),
    "tp2_pp2": ParallelConfig(tensor_parallel=2, pipeline_parallel=2),
    "pp2_vpp2": ParallelConfig(pipeline_parallel=2, virtual_pipeline=2),
    "pp2_uneven": ParallelConfig(pipeline_parallel=2, num_layers_in_first_stage=1, num_layers_in_last_stage=3),
}


@contextlib.contextmanager
def fake_rank(parallel: ParallelConfig, arch: ModelArch, *, rank: int):
    """megatron's parallel state as rank `rank` of a TP x PP world, in this process."""
    from megatron.core import parallel_state, tensor_parallel
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from megatron_gppo.model.cpu_compat import enable_cpu_compat

    world_size = parallel.tensor_parallel * parallel.pipeline_parallel
    dims = build_parallel_dims(parallel, world_size=world_size, arch=arch)
    enable_cpu_compat()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        # gloo sub-groups cannot be made on a fake group; megatron needs them only for checkpoints.
        parallel_state.initialize_model_parallel(
            dims.tp, dims.pp, dims.vpp if dims.vpp > 1 else None, create_gloo_process_groups=False)
        tensor_parallel.model_parallel_cuda_manual_seed(1234, force_reset_rng=True)
        yield dims
    finally:
        destroy_distributed()


def _build(arch: ModelArch, dims: ParallelDims, model: ModelConfig):
    from megatron_gppo.model.provider import build_model_chunks

    return build_model_chunks(arch, dims, model=model)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", ARCHS)
def test_params_per_rank_equal_megatron(family, layout):
    from megatron.core import parallel_state

    arch = ModelArch.from_hf_config(ARCHS[family])
    parallel = LAYOUTS[layout]
    for rank in range(parallel.tensor_parallel * parallel.pipeline_parallel):
        with fake_rank(parallel, arch, rank=rank) as dims:
            chunks = _build(arch, dims, ModelConfig(dtype="float32"))
            built = sum(param.numel() for chunk in chunks for param in chunk.parameters())
            expected = num_params_per_rank(arch, dims)[parallel_state.get_pipeline_model_parallel_rank()]
        assert built == expected, f"{family} {layout} rank {rank}: megatron {built}, estimate {expected}"


def _saved_bytes(arch: ModelArch, parallel: ParallelConfig, model: ModelConfig, *, batch: int, seq: int) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in one forward of `arch`."""
    with fake_rank(parallel, arch, rank=0) as dims:
        (chunk,) = _build(arch, dims, model)
        params = {param.untyped_storage().data_ptr() for param in chunk.parameters()}
        saved = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in params:
                saved[storage.data_ptr()] = storage.nbytes()
            return tensor

        tokens = torch.randint(0, arch.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            chunk(tokens, torch.arange(seq).expand(batch, seq), None)
        return sum(saved.values())


ACTIVATION_CASES = {
    "fp32_gqa": ({}, ParallelConfig(), ModelConfig(dtype="float32")),
    "fp32_mha": ({"num_key_value_heads": 4}, ParallelConfig(), ModelConfig(dtype="float32")),
    "bf16_gqa": ({}, ParallelConfig(), ModelConfig(dtype="bfloat16")),
    "qwen3_qk_norm": ({"architectures": ["Qwen3ForCausalLM"], "head_dim": 24}, ParallelConfig(),
                      ModelConfig(dtype="float32")),
    "qwen3_bf16_selective": ({"architectures": ["Qwen3ForCausalLM"], "head_dim": 24}, ParallelConfig(),
                             ModelConfig(dtype="bfloat16", recompute="selective")),
    "selective": ({}, ParallelConfig(), ModelConfig(dtype="float32", recompute="selective")),
    "full": ({}, ParallelConfig(), ModelConfig(dtype="float32", recompute="full")),
    "tp2": ({}, ParallelConfig(tensor_parallel=2), ModelConfig(dtype="float32")),
    "tp2_sp": ({}, ParallelConfig(tensor_parallel=2, sequence_parallel=True), ModelConfig(dtype="float32")),
}


@pytest.mark.parametrize("case", ACTIVATION_CASES)
def test_layer_activation_bytes_equal_what_autograd_saves(case):
    overrides, parallel, model = ACTIVATION_CASES[case]
    batch, seq = 2, 48
    measured = []
    for num_layers in (1, 3):
        config = {**ARCHS["qwen2_tied"], "tie_word_embeddings": False, **overrides, "num_hidden_layers": num_layers}
        arch = ModelArch.from_hf_config(config)
        measured.append(_saved_bytes(arch, parallel, model, batch=batch, seq=seq))
    per_layer = (measured[1] - measured[0]) / 2
    dims = build_parallel_dims(parallel, world_size=parallel.tensor_parallel, arch=arch)
    estimate = layer_activation_bytes(arch, dims, micro_batch_size=batch, seq_length=seq, dtype=model.dtype,
                                      recompute=model.recompute, device="cpu")
    # Selective recompute also saves the RNG tracker's 4-byte state per layer.
    assert abs(estimate - per_layer) <= 4, f"{case}: estimate {estimate}, autograd saves {per_layer}"


def test_in_flight_microbatches_follow_megatron_schedules():
    one_f_one_b = ParallelDims(pp=4, world_size=4)
    assert [num_in_flight(one_f_one_b, pipeline_rank=r, num_microbatches=0) for r in range(4)] == [4, 3, 2, 1]
    assert num_in_flight(one_f_one_b, pipeline_rank=0, num_microbatches=2) == 2
    # Interleaved, rank 0: 2 (pp - 1) + (vpp - 1) pp warm-up forwards + 1 = pp vpp (1 + (pp - 1) / (pp vpp)).
    interleaved = ParallelDims(pp=4, vpp=5, world_size=4)
    assert num_in_flight(interleaved, pipeline_rank=0, num_microbatches=0) == 4 * 5 + 4 - 1
    assert num_in_flight(ParallelDims(world_size=1), pipeline_rank=0, num_microbatches=8) == 1


def test_optimizer_and_gradient_bytes_per_parameter():
    arch = ModelArch.from_hf_config(ARCHS["llama"])
    step = dict(arch=arch, micro_batch_size=1, seq_length=64, device="cpu")
    fp32 = estimate_memory(dims=ParallelDims(world_size=1), dtype="float32", **step)
    bf16 = estimate_memory(dims=ParallelDims(world_size=1), dtype="bfloat16", **step)
    sharded = estimate_memory(dims=ParallelDims(dp=4, world_size=4), dtype="bfloat16", distributed_optimizer=True,
                              **step)
    n = fp32.num_params
    assert (fp32.weights, fp32.gradients, fp32.optimizer) == (4 * n, 4 * n, 8 * n)  # Adam moments
    assert (bf16.weights, bf16.gradients, bf16.optimizer) == (2 * n, 4 * n, 12 * n)  # + fp32 master copy
    assert sharded.optimizer == 3 * n and sharded.gradients == 4 * n
    assert fp32.activations > 0 and fp32.logprob_workspace > 0
    assert fp32.total == fp32.weights + fp32.gradients + fp32.optimizer + fp32.activations + fp32.logprob_workspace


def test_logprob_tile_matches_the_op():
    from megatron_gppo.model.logprobs import DEFAULT_TILE

    assert LOGPROB_TILE == DEFAULT_TILE


def test_bad_input_is_a_value_error():
    arch = ModelArch.from_hf_config(ARCHS["llama"])
    with pytest.raises(ValueError, match="tensor_parallel=3"):
        estimate_memory(arch=arch, dims=ParallelDims(tp=3, world_size=3), micro_batch_size=1, seq_length=8)
    with pytest.raises(ValueError, match="recompute"):
        estimate_memory(arch=arch, dims=ParallelDims(world_size=1), micro_batch_size=1, seq_length=8,
                        recompute="some")


# ---------------------------------------------------------------------------- the CLI


def _tool():
    spec = importlib.util.spec_from_file_location("_tool_estimate_memory", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def hf_config(tmp_path) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(ARCHS["qwen2_tied"]))
    return path


def test_cli_prints_a_table_and_json(hf_config, capsys):
    tool = _tool()
    assert tool.main(["--hf-config", str(hf_config), "--tp", "2", "--pp", "2", "--seq-length", "128"]) == 0
    out = capsys.readouterr().out
    for row in ("weights", "gradients", "optimizer", "activations", "log-prob workspace", "total"):
        assert row in out
    assert "per pipeline rank" in out
    assert tool.main(["--hf-config", str(hf_config), "--seq-length", "128", "--dtype", "float32", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["total"] == sum(report[k] for k in ("weights", "gradients", "optimizer", "activations",
                                                      "logprob_workspace"))
    assert report["inputs"]["dtype"] == "float32"


def test_cli_reads_a_run_config(hf_config, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {{hf_path: {hf_config.parent}, dtype: float32, recompute: selective}}\n"
                      "parallel: {tensor_parallel: 2}\n"
                      "data: {max_prompt_tokens: 100}\nrollout: {max_new_tokens: 28}\n"
                      "train: {micro_batch_size: 3}\n")
    assert _tool().main(["--config", str(config), "--json", "parallel.pipeline_parallel=2"]) == 0
    inputs = json.loads(capsys.readouterr().out)["inputs"]
    assert (inputs["tp"], inputs["pp"], inputs["seq_length"], inputs["micro_batch_size"]) == (2, 2, 128, 3)
    assert (inputs["dtype"], inputs["recompute"]) == ("float32", "selective")
    # A packed token budget sets the micro-batch: as many rows of the longest sample as fit.
    assert _tool().main(["--config", str(config), "--json", "train.max_tokens_per_micro_batch=700"]) == 0
    packed = json.loads(capsys.readouterr().out)
    assert packed["inputs"]["micro_batch_size"] == 5 and "packed micro-batches of 700 tokens" in packed["notes"][-1]


@pytest.mark.parametrize("argv, message", [
    (["--seq-length", "8"], "pass --config"),
    (["--hf-config", "/nonexistent/config.json", "--seq-length", "8"], "no Hugging Face config.json"),
    (["--hf-config", "{hf}", "--tp", "3", "--seq-length", "8"], "tensor_parallel=3 does not divide"),
    (["--hf-config", "{hf}", "--tp", "0", "--seq-length", "8"], "--tp=0 must be >= 1"),
    (["--hf-config", "{hf}"], "--seq-length"),
    (["--config", "/nonexistent/run.yaml"], "config file not found"),
    (["--hf-config", "{hf}", "--seq-length", "64", "--max-tokens-per-micro-batch", "32"], "raise it to at least 64"),
])
def test_cli_bad_input_is_one_line_and_exit_2(hf_config, capsys, argv, message):
    code = _tool().main([arg.replace("{hf}", str(hf_config)) for arg in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error:") and message in err, err
