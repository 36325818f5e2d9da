"""Parallel layouts that cannot work fail before any model or process group exists, in one line."""

from __future__ import annotations

import json

import pytest

from megatron_gppo.config import ParallelConfig
from megatron_gppo.model.arch import ModelArch
from megatron_gppo.model.parallel import ParallelDims, build_parallel_dims, launch_env

QWEN2_0_5B = {  # Qwen2.5-0.5B's config.json (the fields read)
    "architectures": ["Qwen2ForCausalLM"], "hidden_size": 896, "intermediate_size": 4864,
    "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 32768, "tie_word_embeddings": True,
}


def dims(world_size: int, **parallel) -> ParallelDims:
    arch = ModelArch.from_hf_config(QWEN2_0_5B)
    return build_parallel_dims(ParallelConfig(**parallel), world_size=world_size, arch=arch)


def error(world_size: int, **parallel) -> str:
    with pytest.raises(ValueError) as info:
        dims(world_size, **parallel)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_valid_layouts():
    assert dims(8, tensor_parallel=2, pipeline_parallel=2) == ParallelDims(tp=2, pp=2, dp=2, world_size=8)
    assert dims(4, pipeline_parallel=4, virtual_pipeline=2).vpp == 2
    uneven = dims(2, pipeline_parallel=2, num_layers_in_first_stage=10, num_layers_in_last_stage=14)
    assert (uneven.num_layers_in_first_stage, uneven.num_layers_in_last_stage) == (10, 14)
    assert dims(3, pipeline_parallel=3, num_layers_in_last_stage=4).pp == 3  # 20 layers over 2 other stages


def test_tp_must_divide_attention_heads():
    assert error(3, tensor_parallel=3) == (
        "tensor_parallel=3 does not divide num_attention_heads=14; choose one of 1, 2, 7, 14")


def test_tp_must_divide_kv_heads():
    assert error(7, tensor_parallel=7) == (
        "tensor_parallel=7 does not divide num_key_value_heads=2; choose one of 1, 2")


def test_world_size_must_be_tp_x_pp_x_dp():
    assert "world size 6 is not divisible by tensor_parallel=2 x pipeline_parallel=2 = 4" in error(
        6, tensor_parallel=2, pipeline_parallel=2)
    assert "world size 8 != tensor_parallel=2 x pipeline_parallel=1 x data_parallel=2 = 4" in error(
        8, tensor_parallel=2, data_parallel=2)


def test_pp_must_divide_layers():
    assert error(5, pipeline_parallel=5).startswith(
        "pipeline_parallel=5 does not divide num_hidden_layers=24; choose one of 1, 2, 3, 4, 6, 8, 12, 24")


def test_virtual_pipeline_constraints():
    assert error(4, pipeline_parallel=4, virtual_pipeline=4) == (
        "virtual_pipeline=4 does not divide the 6 layers per pipeline rank; choose one of 1, 2, 3, 6")
    assert "needs pipeline_parallel > 1" in error(1, virtual_pipeline=2)


def test_uneven_stages_must_add_up():
    assert "leave 4 of num_hidden_layers=24 for 0 other pipeline stages" in error(
        2, pipeline_parallel=2, num_layers_in_first_stage=10, num_layers_in_last_stage=10)
    assert "do not split evenly over 2 pipeline stages" in error(
        4, pipeline_parallel=4, num_layers_in_first_stage=5, num_layers_in_last_stage=4)


def test_layout_from_config_json_path(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN2_0_5B))
    arch = ModelArch.from_hf_config(tmp_path)
    assert (arch.num_attention_heads, arch.num_query_groups, arch.head_dim) == (14, 2, 64)
    with pytest.raises(ValueError, match="does not divide num_attention_heads=14"):
        build_parallel_dims(ParallelConfig(tensor_parallel=4), world_size=4, arch=arch)


def test_init_distributed_rejects_a_bad_layout_before_starting_anything():
    import torch.distributed as dist

    from megatron_gppo.model.parallel import init_distributed

    environ = {"RANK": "0", "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    with pytest.raises(ValueError, match="tensor_parallel=3 does not divide num_attention_heads=14"):
        init_distributed(ParallelConfig(tensor_parallel=3), arch=ModelArch.from_hf_config(QWEN2_0_5B),
                         seed=0, environ=environ)
    assert not dist.is_initialized()


def test_launch_env_torchrun_and_slurm():
    torchrun = launch_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
                           "MASTER_ADDR": "node1", "MASTER_PORT": "29500"})
    assert (torchrun.rank, torchrun.world_size, torchrun.local_rank, torchrun.master_addr) == (3, 4, 1, "node1")
    slurm = launch_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                        "MASTER_ADDR": "node2", "MASTER_PORT": "29501"})
    assert (slurm.rank, slurm.world_size, slurm.local_rank, slurm.master_port) == (5, 8, 1, 29501)
    with pytest.raises(ValueError, match="MASTER_ADDR and MASTER_PORT must be set"):
        launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"})
    assert launch_env({}).world_size == 1


def test_unsupported_architecture_is_one_line():
    with pytest.raises(ValueError, match="unsupported architecture MistralForCausalLM; supported: "):
        ModelArch.from_hf_config({**QWEN2_0_5B, "architectures": ["MistralForCausalLM"]})
