"""`megatron-gppo serve` as a real process on loopback: log-probs, auth, errors, control endpoints, shutdown."""

import os
import signal
import subprocess
import sys

import pytest
import requests
import torch

from megatron_gppo.rollout.local_servers import LocalServers
from tests._tiny_models import load_model, reference_log_probs, save_test_model

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_test_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    with LocalServers(model_path=model_dir, api_key=KEY, num_threads=1,
                      log_dir=tmp_path_factory.mktemp("logs")) as servers:
        yield servers.urls[0]


def post(url, path, body=None, *, headers=AUTH, data=None):
    return requests.post(f"{url}{path}", json=body, data=data, headers=headers, timeout=60)


def test_log_probs_equal_a_transformers_forward(server, model_dir):
    model = load_model(model_dir)
    prompts = [[3, 4, 5, 6, 7], [8, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18]]
    answer = post(server, "/generate", {
        "input_ids": prompts, "return_logprob": True,
        "sampling_params": [{"temperature": 0.7, "max_new_tokens": 16, "n": 2},
                            {"temperature": 1.0, "top_p": 0.8, "max_new_tokens": 24, "n": 2},
                            {"temperature": 1.5, "top_k": 4, "max_new_tokens": 8, "n": 2}]}).json()
    assert len(answer) == 6
    temperatures = [0.7, 0.7, 1.0, 1.0, 1.5, 1.5]
    for i, output in enumerate(answer):
        meta = output["meta_info"]
        ids = [entry[1] for entry in meta["output_token_logprobs"]]
        got = torch.tensor([entry[0] for entry in meta["output_token_logprobs"]])
        assert ids == output["output_ids"] and meta["completion_tokens"] == len(ids) > 0
        assert meta["prompt_tokens"] == len(prompts[i // 2]) and meta["weight_version"] == "default"
        assert meta["finish_reason"]["type"] in ("stop", "length")
        expected = reference_log_probs(model, prompts[i // 2], ids, temperature=temperatures[i])
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_text_prompt_and_stop_string(server):
    answer = post(server, "/generate", {"text": "12+30=", "sampling_params": {
        "max_new_tokens": 40, "stop": list("0123456789"), "ignore_eos": True}}).json()
    reason = answer["meta_info"]["finish_reason"]
    if reason["type"] == "stop":
        assert reason["matched"] in "0123456789" and reason["matched"] not in answer["text"]
    else:
        assert reason == {"type": "length", "length": 40}


def test_wrong_or_missing_api_key_gets_401(server):
    for headers in ({"Authorization": "Bearer wrong"}, {}):
        response = post(server, "/generate", {"input_ids": [1]}, headers=headers)
        assert response.status_code == 401 and response.json() == {"error": "Unauthorized"}
        assert requests.get(f"{server}/model_info", headers=headers, timeout=10).status_code == 401
    # Health checks stay open, as in SGLang.
    assert requests.get(f"{server}/health", timeout=10).status_code == 200


def test_every_route_but_health_needs_the_api_key(server):
    from megatron_gppo.rollout.server import ROUTES

    for method, path, _ in ROUTES:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            response = requests.request("POST" if method == "*" else method, f"{server}{path}", headers=headers,
                                        timeout=30)
            if path.startswith("/health"):
                assert response.status_code == 200, path
            else:
                assert response.status_code == 401 and response.json() == {"error": "Unauthorized"}, path


@pytest.mark.parametrize("path, data, body", [
    ("/generate", b'{"input_ids": [1, 2', None),
    ("/generate", None, {"input_ids": [1], "sampling_params": {"top_p": 1.5}}),
    ("/generate", None, {"input_ids": [1], "sampling_params": {"max_new_tokens": "lots"}}),
    ("/generate", None, {"text": 5}),
    ("/update_weights_from_disk", b"{not json", None),
    ("/update_weights_from_disk", None, {"model_path": "/does/not/exist"}),
    ("/init_weights_update_group", None, {"master_address": "127.0.0.1"}),
    ("/update_weights_from_distributed", None, {"names": ["x"], "dtypes": ["float32"], "shapes": [[1]]}),
    ("/pause_generation", None, {"mode": "sideways"}),
    ("/abort_request", None, {"rid": 5}),
])
def test_bad_input_gets_400_json_and_the_server_keeps_serving(server, path, data, body):
    headers = {**AUTH, "Content-Type": "application/json"}
    response = requests.post(f"{server}{path}", data=data, json=body, headers=headers, timeout=60)
    assert response.status_code == 400, response.text
    answer = response.json()
    assert "message" in answer["error"]
    if path != "/generate":
        assert answer["success"] is False
    ok = post(server, "/generate", {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2}})
    assert ok.status_code == 200 and ok.json()["meta_info"]["completion_tokens"] <= 2


def test_unknown_paths_and_methods_answer_json(server):
    response = requests.get(f"{server}/no_such_endpoint", headers=AUTH, timeout=10)
    assert response.status_code == 404 and "message" in response.json()["error"]
    response = requests.get(f"{server}/update_weights_from_disk", headers=AUTH, timeout=10)
    assert response.status_code == 405 and response.json()["success"] is False


def test_info_and_control_endpoints(server):
    for path in ("/get_model_info", "/model_info"):
        info = requests.get(f"{server}{path}", headers=AUTH, timeout=10).json()
        assert info["is_generation"] and info["architectures"] == ["Qwen2ForCausalLM"]
    for path in ("/get_server_info", "/server_info"):
        info = requests.get(f"{server}{path}", headers=AUTH, timeout=10).json()
        assert info["tp_size"] == 1 and "api_key" not in info and info["url"] == server
    assert requests.get(f"{server}/health_generate", timeout=30).status_code == 200
    assert post(server, "/flush_cache").status_code == 200
    for path in ("/release_memory_occupation", "/resume_memory_occupation"):
        assert post(server, path, {}).json()["success"] is True
    assert post(server, "/abort_request", {"abort_all": True}).status_code == 200
    assert post(server, "/update_weight_version", {"new_version": "v7"}).json()["new_version"] == "v7"
    assert requests.get(f"{server}/model_info", headers=AUTH, timeout=10).json()["weight_version"] == "v7"
    # Gone since SGLang 0.5.21, as here.
    assert requests.get(f"{server}/get_weight_version", headers=AUTH, timeout=10).status_code == 404
    answer = post(server, "/generate", {"input_ids": [3], "sampling_params": {"max_new_tokens": 1}}).json()
    assert answer["meta_info"]["weight_version"] == "v7"


def test_released_memory_refuses_generation_and_weight_loads_until_resumed(server):
    generate = {"input_ids": [3], "sampling_params": {"max_new_tokens": 1}}
    assert post(server, "/release_memory_occupation", {"tags": ["kv_cache"]}).json()["success"] is True
    refused = post(server, "/generate", generate)
    assert refused.status_code == 400 and "memory released (kv_cache)" in refused.json()["error"]["message"]
    # Weights are still there: a weight load is accepted (and fails later, on the missing path).
    answer = post(server, "/update_weights_from_disk", {"model_path": "/nonexistent"}).json()
    assert "memory released" not in answer["message"]
    assert post(server, "/release_memory_occupation", {}).json()["success"] is True
    answer = post(server, "/update_weights_from_disk", {"model_path": "/nonexistent"})
    assert answer.status_code == 400 and "memory released (weights)" in answer.json()["message"]
    info = requests.get(f"{server}/get_server_info", headers=AUTH, timeout=10).json()
    assert info["internal_states"][0]["memory_released"] is True
    assert post(server, "/resume_memory_occupation", {}).json()["success"] is True
    assert post(server, "/generate", generate).status_code == 200


def test_pause_holds_requests_and_continue_releases_them(server):
    import threading

    assert post(server, "/pause_generation", {"mode": "in_place"}).json()["status"] == "ok"
    answers = []
    thread = threading.Thread(target=lambda: answers.append(post(server, "/generate", {
        "input_ids": [3], "sampling_params": {"max_new_tokens": 3, "ignore_eos": True}}).json()))
    thread.start()
    thread.join(1.0)
    assert thread.is_alive() and not answers  # held while paused
    assert post(server, "/continue_generation", {}).json()["status"] == "ok"
    thread.join(30)
    assert answers[0]["meta_info"]["finish_reason"] == {"type": "length", "length": 3}


def test_sigterm_stops_the_server_cleanly(model_dir, tmp_path):
    servers = LocalServers(model_path=model_dir, num_threads=1, log_dir=tmp_path)
    (url,) = servers.start()
    process = servers.processes[0]
    os.kill(process.pid, signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    assert "shutting down" in servers.log_paths[0].read_text()


def test_missing_model_path_is_a_one_line_user_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "megatron_gppo.cli", "serve", "--model-path", str(tmp_path / "nope"),
                             "--port", "0"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "model path not found" in result.stderr
