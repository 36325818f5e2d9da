"""Weight-sync building blocks: buckets, the atomic safetensors dump, loading by name, payload safety."""

import base64
import inspect
import pickle
import subprocess
import sys

import pytest
import torch

from megatron_gppo.rollout.weight_loader import deserialize_named_tensors, load_named_tensors, read_safetensors_dir
from megatron_gppo.checkpoint.hf_io import save_safetensors_atomic
from megatron_gppo.rollout.weight_sync import iter_buckets, serialize_named_tensors


def named(*sizes):
    return [(f"t{i}", torch.full((size,), float(i))) for i, size in enumerate(sizes)]


def test_buckets_keep_order_and_size_and_give_big_tensors_their_own():
    buckets = list(iter_buckets(named(2, 2, 10, 1, 1, 1), bucket_bytes=16))  # float32: 4 bytes each
    assert [[name for name, _ in bucket] for bucket in buckets] == [["t0", "t1"], ["t2"], ["t3", "t4", "t5"]]
    assert [len(b) for b in iter_buckets(named(1, 1, 1), bucket_bytes=1)] == [1, 1, 1]


def test_atomic_dump_shards_ties_and_round_trips(tmp_path):
    shared = torch.arange(6.0)
    tensors = [("a", shared), ("b", shared), ("c", torch.ones(3, 2).t()), ("d", torch.zeros(50))]
    out = save_safetensors_atomic(tensors, tmp_path / "dump", shard_bytes=64)
    assert (out / "model.safetensors.index.json").is_file()
    loaded = dict(read_safetensors_dir(out))
    assert sorted(loaded) == ["a", "b", "c", "d"]
    for name, tensor in tensors:
        assert torch.equal(loaded[name], tensor)
    single = save_safetensors_atomic(tensors[:1], tmp_path / "one")
    assert sorted(p.name for p in single.iterdir()) == ["model-00001-of-00001.safetensors",
                                                        "model.safetensors.index.json"]


def test_failed_dump_leaves_nothing_behind(tmp_path):
    def broken():
        yield "a", torch.zeros(4)
        raise RuntimeError("conversion failed")
    with pytest.raises(RuntimeError, match="conversion failed"):
        save_safetensors_atomic(broken(), tmp_path / "dump", shard_bytes=8)
    assert list(tmp_path.iterdir()) == []


def test_load_checks_everything_before_writing_and_updates_tied_weights():
    model = torch.nn.Sequential(torch.nn.Embedding(4, 2), torch.nn.Linear(2, 4, bias=False))
    model[1].weight = model[0].weight  # tied, as lm_head / embed_tokens
    before = model[0].weight.clone()
    with pytest.raises(ValueError, match="no parameter named"):
        load_named_tensors(model, [("0.weight", torch.ones(4, 2)), ("2.weight", torch.ones(1))])
    with pytest.raises(ValueError, match="does not match"):
        load_named_tensors(model, [("0.weight", torch.ones(4, 2)), ("1.weight", torch.ones(2, 4))])
    assert torch.equal(model[0].weight, before)
    assert load_named_tensors(model, [("1.weight", torch.full((4, 2), 3.0, dtype=torch.float64))]) == 1
    assert torch.equal(model[0].weight, torch.full((4, 2), 3.0)) and model[0].weight.dtype == torch.float32


def test_tensor_payload_refuses_anything_but_torch():
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    payload = base64.b64encode(pickle.dumps([("x", Evil())])).decode()
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        deserialize_named_tensors(payload)


def test_cpu_tensor_payload_opens_in_another_process():
    # Shared-memory files, not file descriptors: they survive a trip over HTTP to another process.
    tensors = [("a", torch.arange(6, dtype=torch.float32).reshape(2, 3).clone()), ("b", torch.tensor([7, 8]))]
    code = ("import sys; from megatron_gppo.rollout.weight_loader import deserialize_named_tensors; "
            "print([(n, t.dtype, t.tolist()) for n, t in deserialize_named_tensors(sys.stdin.read())])")
    opened = subprocess.run([sys.executable, "-c", code], input=serialize_named_tensors(tensors),
                            capture_output=True, text=True, timeout=120, check=True)
    assert opened.stdout.strip() == "[('a', torch.float32, [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]), " \
                                    "('b', torch.int64, [7, 8])]"
    assert isinstance(serialize_named_tensors([]), str)


def test_gpus_are_named_in_the_argument_sglang_rewrites():
    # SGLang swaps argument 6 of torch's CUDA tensor rebuild for the GPU's UUID (srt/utils/patch_torch.py),
    # and so do we (weight_sync._CUDA_DEVICE_ARG); a torch that moves it breaks both.
    from torch.multiprocessing import reductions

    from megatron_gppo.rollout.weight_sync import _CUDA_DEVICE_ARG

    assert list(inspect.signature(reductions.rebuild_cuda_tensor).parameters)[_CUDA_DEVICE_ARG] == "storage_device"



def test_adopt_takes_matching_tensors_without_copying():
    model = torch.nn.Linear(3, 2)
    fresh = torch.randn(2, 3)
    other_dtype = torch.randn(2, dtype=torch.float64)
    load_named_tensors(model, [("weight", fresh), ("bias", other_dtype)], adopt=True)
    assert model.weight.data_ptr() == fresh.data_ptr() and isinstance(model.weight, torch.nn.Parameter)
    assert model.bias.dtype == torch.float32 and torch.equal(model.bias, other_dtype.float())


def test_tensor_update_carries_one_pickle_per_server_tp_rank():
    from megatron_gppo.rollout.sglang_requests import UpdateWeightsFromTensorReqInput
    from megatron_gppo.rollout.weight_sync import tensor_update

    tensors = [("a", torch.arange(4.0).clone()), ("b", torch.ones(2, 2))]
    middle = tensor_update(tensors, tp_size=4, version=None)
    last = tensor_update(tensors, tp_size=2, version="step-3")
    assert len(middle["serialized_named_tensors"]) == 4 and len(last["serialized_named_tensors"]) == 2
    assert (middle["flush_cache"], "weight_version" not in middle) == (False, True)
    assert (last["flush_cache"], last["weight_version"]) == (True, "step-3")
    UpdateWeightsFromTensorReqInput.model_validate(last)
    for entry in middle["serialized_named_tensors"]:  # each rank's entry holds every tensor, whole
        assert [(name, t.tolist()) for name, t in deserialize_named_tensors(entry)] == \
               [("a", [0.0, 1.0, 2.0, 3.0]), ("b", [[1.0, 1.0], [1.0, 1.0]])]
