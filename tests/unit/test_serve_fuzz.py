"""Malformed HTTP requests to `megatron-gppo serve`: each gets a 4xx with a JSON error, and the server goes on.

Over 200 requests are generated from a seed: bodies that are not JSON (cut
short, garbage, non-UTF-8, empty, larger than `--max-request-mb`), wrong
types and values in every field a generate request has, unknown sampling
parameters, token ids outside the vocabulary, wrong methods, and missing or
wrong API keys, spread over every route. After each one, a fixed greedy
request must still give the same answer as before the first.
"""

from __future__ import annotations

import json
import random

import pytest
import requests

from megatron_gppo.rollout.local_servers import LocalServers
from megatron_gppo.rollout.server import ROUTES
from tests._tiny_models import save_test_model

KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_REQUEST_MB = 1
GREEDY = {"input_ids": [3, 4, 5, 6], "return_logprob": True,
          "sampling_params": {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}}
POST_ROUTES = sorted({path for method, path, _ in ROUTES if method in ("POST", "*") and not path.startswith("/health")})
# Routes whose body may be empty (all defaults), and /flush_cache, which takes none (as in SGLang).
EMPTY_BODY_OK = {"/continue_generation", "/pause_generation", "/release_memory_occupation",
                 "/resume_memory_occupation", "/destroy_weights_update_group", "/flush_cache"}
GET_ONLY_ROUTES = sorted(path for method, path, _ in ROUTES if method == "GET" and not path.startswith("/health"))

# Values of the wrong type or out of range for each field of a generate request.
BAD_GENERATE_FIELDS = {
    "input_ids": ["1 2 3", [], [[]], [1.5], [[1], ["a"]], {"a": 1}, [-1], [10**20], [True], None],
    "text": [5, [1, 2], {"a": "b"}],
    "return_logprob": ["yes", 2],
    "logprob_start_len": ["start", 1.5],
    "stream": ["no", [False]],
    "rid": [5, {"a": 1}],
}
BAD_SAMPLING_PARAMS = {
    "temperature": [-1.0, "hot", [1.0], float("nan")],
    "top_p": [0.0, 1.5, "x", -0.1],
    "top_k": [0, -2, "many", 1.5],
    "min_p": [-0.5, 2.0, "p"],
    "max_new_tokens": [-1, "lots", 1.5, 10**12],
    "n": [0, -3, "two"],
    "stop": [5, [1, 2], {"a": 1}],
    "stop_token_ids": ["x", [1.5], 7],
    "ignore_eos": ["maybe", 3],
    "frequency_penalty": ["f", [0]],
    "no_such_sampling_param": [1, "x"],
    "another_unknown_param": [True],
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = save_test_model(tmp_path_factory.mktemp("fuzz_model"))
    with LocalServers(model_path=model_dir, api_key=KEY, num_threads=1, log_dir=tmp_path_factory.mktemp("logs"),
                      extra_args=["--max-request-mb", str(MAX_REQUEST_MB)]) as servers:
        yield servers.urls[0]


def malformed_requests(seed: int = 0) -> list[tuple[str, str, dict, bytes | None]]:
    """(method, path, headers, body) of each malformed request."""
    rng = random.Random(seed)
    json_headers = {**AUTH, "Content-Type": "application/json"}
    cases = []
    for path in POST_ROUTES:
        bodies = (b'{"input_ids": [1, 2', b"not json at all", b"\xff\xfe\x00garbage", b"[1, 2, 3]", b"",
                  b'"just a string"')
        for body in bodies if path != "/flush_cache" else ():
            if body or path not in EMPTY_BODY_OK:
                cases.append(("POST", path, json_headers, body))
        cases.append(("POST", path, {}, json.dumps(GREEDY).encode()))  # no key
        cases.append(("POST", path, {"Authorization": "Bearer not-the-key"}, json.dumps(GREEDY).encode()))
        cases.append(("POST", path, {"Authorization": KEY}, json.dumps(GREEDY).encode()))  # no "Bearer"
    for path in GET_ONLY_ROUTES:
        for method in ("POST", "PUT", "DELETE"):
            cases.append((method, path, AUTH, None))
        cases.append(("GET", path, {}, None))
    for field, values in BAD_GENERATE_FIELDS.items():
        for value in values:
            body = {**GREEDY, field: value}
            if field == "text":
                body.pop("input_ids")
            cases.append(("POST", "/generate", json_headers, json.dumps(body).encode()))
    for name, values in BAD_SAMPLING_PARAMS.items():
        for value in values:
            params = {**GREEDY["sampling_params"], name: value}
            cases.append(("POST", "/generate", json_headers, json.dumps({**GREEDY, "sampling_params": params},
                                                                         allow_nan=True).encode()))
    for _ in range(20):  # token ids just outside the vocabulary, in random places of a batch
        batch = [[rng.randrange(16) for _ in range(rng.randint(1, 6))] for _ in range(rng.randint(1, 4))]
        row = rng.randrange(len(batch))
        batch[row][rng.randrange(len(batch[row]))] = rng.choice([-1, -(2**31), 2**31, 2**63 - 1, 151936])
        cases.append(("POST", "/generate", json_headers, json.dumps({**GREEDY, "input_ids": batch}).encode()))
    oversized = json.dumps({**GREEDY, "input_ids": [1] * (MAX_REQUEST_MB * 2**20 // 2)}).encode()
    cases.append(("POST", "/generate", json_headers, oversized))
    cases.append(("POST", "/update_weights_from_disk", json_headers, oversized))
    cases.append(("PATCH", "/generate", AUTH, None))
    cases.append(("DELETE", "/generate", AUTH, None))
    return cases


def test_over_200_malformed_requests_get_4xx_json_and_the_server_keeps_serving(server):
    cases = malformed_requests()
    assert len(cases) >= 200
    expected = requests.post(f"{server}/generate", json=GREEDY, headers=AUTH, timeout=60).json()
    statuses: dict[int, int] = {}
    for method, path, headers, body in cases:
        response = requests.request(method, f"{server}{path}", headers=headers, data=body, timeout=60)
        where = f"{method} {path} {body[:80] if body else body!r}"
        assert 400 <= response.status_code < 500, f"{where}: {response.status_code} {response.text[:300]}"
        answer = response.json()  # every refusal is JSON
        assert "error" in answer, where
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        after = requests.post(f"{server}/generate", json=GREEDY, headers=AUTH, timeout=60)
        assert after.status_code == 200 and after.json()["output_ids"] == expected["output_ids"], where
        assert after.json()["meta_info"]["output_token_logprobs"] == expected["meta_info"]["output_token_logprobs"]
    print(f"\n{len(cases)} malformed requests, answered {dict(sorted(statuses.items()))}")
    assert set(statuses) >= {400, 401, 405, 413}
