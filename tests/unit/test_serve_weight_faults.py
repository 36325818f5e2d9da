"""A weight update to `serve` that fails part-way changes nothing: 400 with the reason, the old weights keep serving.

Each fault is checked the same way: the log-probs of a fixed greedy
generation and the weight version are the same before and after, to the bit,
and a good update still works afterwards. The broken broadcast is the
hardest case: its first bucket has already been written when the trainer
dies in the second, so the server must put the first bucket back.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from safetensors.torch import load_file, save_file

from megatron_gppo.ports import free_port
from megatron_gppo.rollout.local_servers import LocalServers
from tests._tiny_models import save_test_model

KEY = "faults-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
GROUP = "faults"

# The trainer's side of a two-bucket broadcast that dies inside the second bucket.
DYING_TRAINER = """
import os, sys
from megatron_gppo.rollout.process_group import broadcast_from_trainer, init_weight_update_group
from tests._tiny_models import load_model, perturbed

port, model_dir, num_first = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
group = init_weight_update_group(master_address="127.0.0.1", master_port=port, rank=0, world_size=2,
                                 group_name="faults", backend="gloo")
tensors = [p for _, p in perturbed(load_model(model_dir), seed=1).named_parameters()]
broadcast_from_trainer(tensors[:num_first], group=group)
print("FIRST BUCKET SENT", flush=True)
sys.stdin.readline()
broadcast_from_trainer(tensors[num_first:num_first + 1], group=group)
os._exit(1)
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_test_model(tmp_path_factory.mktemp("faults_model"))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    with LocalServers(model_path=model_dir, api_key=KEY, num_threads=1,
                      log_dir=tmp_path_factory.mktemp("logs")) as servers:
        yield servers.urls[0]


def post(url, path, body):
    return requests.post(f"{url}{path}", json=body, headers=AUTH, timeout=120)


def served(url) -> tuple[str, list[float]]:
    """The weight version and the log-probs of one fixed greedy generation."""
    answer = post(url, "/generate", {"input_ids": [3, 4, 5, 6, 7], "return_logprob": True,
                                     "sampling_params": {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}})
    meta = answer.json()["meta_info"]
    return meta["weight_version"], [entry[0] for entry in meta["output_token_logprobs"]]


def weights_dir(model_dir: Path, target: Path, edit) -> Path:
    """A copy of the model's weights directory with `edit(tensors)` applied to its one shard."""
    target.mkdir()
    (shard,) = model_dir.glob("*.safetensors")
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, target / shard.name)
    return target


def _wrong_shape(tensors):
    name = next(iter(tensors))
    tensors[name] = tensors[name][:-1].contiguous()


def _wrong_name(tensors):
    tensors["model.layers.7.mlp.up_proj.weight"] = next(iter(tensors.values())).clone()


def _nan(tensors):
    name = next(iter(tensors))
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")


@pytest.mark.parametrize("fault, edit, reason", [
    ("wrong shape", _wrong_shape, "does not match the model's"),
    ("unknown name", _wrong_name, "the model has no parameter named"),
    ("non-finite values", _nan, "holds NaN or infinite values"),
])
def test_bad_tensors_on_disk_change_nothing(server, model_dir, tmp_path, fault, edit, reason):
    before = served(server)
    response = post(server, "/update_weights_from_disk",
                    {"model_path": str(weights_dir(model_dir, tmp_path / "bad", edit)), "weight_version": "bad"})
    assert response.status_code == 400, response.text
    assert reason in response.json()["message"] and response.json()["success"] is False
    assert served(server) == before


def test_truncated_missing_or_escaping_files_change_nothing(server, model_dir, tmp_path):
    (shard,) = model_dir.glob("*.safetensors")
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / shard.name).write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    escaping = tmp_path / "escaping"
    escaping.mkdir()
    (escaping / shard.name).symlink_to(shard)
    before = served(server)
    for path, reason in ((truncated, "is not a complete safetensors file"),
                         (tmp_path / "does-not-exist", "is not a directory"),
                         (escaping, "leads out of")):
        response = post(server, "/update_weights_from_disk", {"model_path": str(path), "weight_version": "bad"})
        assert response.status_code == 400 and reason in response.json()["message"], response.text
        assert served(server) == before


def test_a_broadcast_broken_in_its_second_bucket_restores_the_first(server, model_dir):
    from megatron_gppo.rollout.process_group import dtype_name
    from tests._tiny_models import load_model

    before = served(server)
    names, params = zip(*load_model(model_dir).named_parameters())
    num_first = len(names) // 2
    port = free_port()
    trainer = subprocess.Popen([sys.executable, "-c", DYING_TRAINER, str(port), str(model_dir), str(num_first)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                               cwd=Path(__file__).parents[2])

    def bucket(lo, hi, **extra):
        return {"names": list(names[lo:hi]), "dtypes": [dtype_name(p.dtype) for p in params[lo:hi]],
                "shapes": [list(p.shape) for p in params[lo:hi]], "group_name": GROUP, **extra}
    try:
        joined = post(server, "/init_weights_update_group", {
            "master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": 2,
            "group_name": GROUP, "backend": "gloo"})
        assert joined.status_code == 200, joined.text
        assert post(server, "/begin_weight_update", {}).status_code == 200
        assert post(server, "/update_weights_from_distributed", bucket(0, num_first)).status_code == 200
        assert trainer.stdout.readline().strip() == "FIRST BUCKET SENT"
        halfway = served(server)
        assert halfway[0] == before[0] and halfway[1] != before[1]  # the first bucket is in the model

        answers = []
        second = threading.Thread(target=lambda: answers.append(
            post(server, "/update_weights_from_distributed", bucket(num_first, len(names), weight_version="v2"))))
        second.start()
        trainer.stdin.write("go\n")
        trainer.stdin.flush()
        second.join(timeout=120)
        (response,) = answers
    finally:
        trainer.kill()
        trainer.wait()
    print(f"\n{response.json()['message']}")
    assert response.status_code == 400
    assert f"restored {num_first} tensors written earlier in this update" in response.json()["message"]
    assert served(server) == before
    # The broken group is gone; a good update still works.
    assert post(server, "/update_weights_from_distributed", bucket(0, 1)).status_code == 400
    assert post(server, "/end_weight_update", {}).status_code == 200
    good = shutil.copytree(model_dir, model_dir.parent / "good", dirs_exist_ok=True)
    assert post(server, "/update_weights_from_disk", {"model_path": str(good), "weight_version": "v3"}).ok
    assert served(server) == ("v3", before[1])


def tensor_update(model_dir, *, num_tensors: int, seed: int, **extra) -> dict:
    """An /update_weights_from_tensor body with the first `num_tensors` parameters of a perturbed model."""
    from megatron_gppo.rollout.weight_sync import serialize_named_tensors
    from tests._tiny_models import load_model, perturbed

    named = [(n, p.detach().clone()) for n, p in perturbed(load_model(model_dir), seed=seed).named_parameters()]
    return {"serialized_named_tensors": [serialize_named_tensors(named[:num_tensors])], **extra}


def test_tensor_and_distributed_updates_need_a_session_as_in_sglang(server, model_dir):
    before = served(server)
    refused = post(server, "/update_weights_from_tensor", tensor_update(model_dir, num_tensors=2, seed=2))
    assert refused.status_code == 400
    assert "must run between begin_weight_update() and end_weight_update()" in refused.json()["message"]
    refused = post(server, "/update_weights_from_distributed", {"names": [], "dtypes": [], "shapes": []})
    assert refused.status_code == 400 and "begin_weight_update()" in refused.json()["message"]
    assert post(server, "/end_weight_update", {}).json()["message"].startswith("no weight-update session is open")
    assert post(server, "/begin_weight_update", {}).json() == {"success": True, "message": "Success"}
    assert post(server, "/begin_weight_update", {}).json()["message"].startswith("a weight-update session is already")
    # A session that ends before its update is complete (no part carried the weight version) is rolled back.
    assert post(server, "/update_weights_from_tensor", tensor_update(model_dir, num_tensors=3, seed=2)).ok
    assert served(server)[1] != before[1]
    assert post(server, "/end_weight_update", {}).ok
    assert served(server) == before
    # A complete one stays.
    assert post(server, "/begin_weight_update", {}).ok
    assert post(server, "/update_weights_from_tensor",
                tensor_update(model_dir, num_tensors=3, seed=2, weight_version="v-session")).ok
    assert post(server, "/end_weight_update", {}).ok
    version, log_probs = served(server)
    assert version == "v-session" and log_probs != before[1]
    good = shutil.copytree(model_dir, model_dir.parent / "restore-session", dirs_exist_ok=True)
    assert post(server, "/update_weights_from_disk", {"model_path": str(good), "weight_version": before[0]}).ok
    assert served(server) == before


def _num_running(server) -> int:
    return requests.get(f"{server}/server_info", headers=AUTH, timeout=10).json()["internal_states"][0][
        "num_running_reqs"]


def test_an_update_that_flushes_the_cache_waits_for_paused_generation(server, model_dir):
    before = served(server)
    good = shutil.copytree(model_dir, model_dir.parent / "flush", dirs_exist_ok=True)
    long = {"input_ids": [3, 4, 5], "sampling_params": {"max_new_tokens": 40, "ignore_eos": True}}
    answers: list = []
    for _attempt in range(50):  # catch a generation mid-way and freeze it there (in_place keeps it running)
        generating = threading.Thread(target=lambda: answers.append(post(server, "/generate", long)))
        generating.start()
        while not _num_running(server) and generating.is_alive():
            time.sleep(0.001)
        assert post(server, "/pause_generation", {"mode": "in_place"}).ok
        if _num_running(server) == 1:
            break
        assert post(server, "/continue_generation", {}).ok
        generating.join(timeout=60)
    else:
        pytest.fail("never caught a generation running")
    try:
        for path, update in (("/update_weights_from_disk", {"model_path": str(good), "weight_version": "flush"}),
                             ("/flush_cache", None)):
            refused = post(server, path, update)
            assert refused.status_code == 400 and "1 requests running" in refused.text, refused.text
        assert post(server, "/pause_generation", {"mode": "abort"}).ok
    finally:
        generating.join(timeout=60)
    assert answers[-1].json()["meta_info"]["finish_reason"]["type"] == "abort"
    assert post(server, "/flush_cache", None).ok
    assert post(server, "/update_weights_from_disk", {"model_path": str(good), "weight_version": "flush"}).ok
    assert post(server, "/continue_generation", {}).ok
    assert served(server) == ("flush", before[1])
    assert post(server, "/update_weight_version", {"new_version": before[0]}).ok


def test_a_session_a_dead_trainer_left_open_is_closed_by_the_next_one(server):
    from megatron_gppo.rollout.client import SGLangClient

    assert post(server, "/begin_weight_update", {}).ok  # a trainer that died inside an update
    client = SGLangClient(server_urls=[server], api_key=KEY, progress=False)
    try:
        assert client.has_update_sessions() == {server: True}
        assert client.end_stale_update_sessions() == [server]
        assert client.end_stale_update_sessions() == []
    finally:
        client.close()
    assert post(server, "/begin_weight_update", {}).ok and post(server, "/end_weight_update", {}).ok
