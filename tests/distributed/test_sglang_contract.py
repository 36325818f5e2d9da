"""Everything the trainer sends to a rollout server, judged by SGLang's own code.

Short real runs record every request their local servers receive
(`rollout.record_requests`): a `distributed` run (with eval), a `disk` run, a
colocated `tensor` run (memory release and resume), and a client whose
requests time out (aborts). Each request is then judged against the SGLang
release `make upstream` installs (tests/_sglang_upstream.py):

- its method and path are a route of SGLang's HTTP server;
- its body is read by SGLang's request class for that route (as FastAPI does),
  and names no field the class lacks (SGLang would drop it without a word);
  `/generate` bodies also pass SGLang's JSON contract;
- per server, the order is one SGLang accepts: tensor and distributed updates
  inside a weight-update session, every update and memory release while
  generation is paused and after a cache flush, generation resumed at the end.
  (One `/end_weight_update` before the first session is the trainer closing a
  session a dead predecessor may have left; SGLang answers 400 if none is.)

When SGLang changes its protocol, this test is what tells us.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from megatron_gppo.rollout.server import ROUTES
from tests._sglang_upstream import SGLang, installed_sglang
from tests._tiny_models import save_tiny_run
from tests.distributed.test_train_e2e import train_command

pytestmark = pytest.mark.distributed

SESSION_UPDATES = {"/update_weights_from_tensor", "/update_weights_from_distributed"}
UPDATES = SESSION_UPDATES | {"/update_weights_from_disk"}
# What the runs below must have sent between them, so that the judgment covers it.
EXPECTED = {("POST", "/generate"), ("POST", "/begin_weight_update"), ("POST", "/end_weight_update"),
            ("POST", "/update_weights_from_tensor"), ("POST", "/update_weights_from_distributed"),
            ("POST", "/update_weights_from_disk"), ("POST", "/init_weights_update_group"),
            ("POST", "/destroy_weights_update_group"), ("POST", "/pause_generation"),
            ("POST", "/continue_generation"), ("GET", "/flush_cache"), ("POST", "/release_memory_occupation"),
            ("POST", "/resume_memory_occupation"), ("POST", "/abort_request"), ("GET", "/server_info"),
            ("GET", "/begin_weight_update")}


@pytest.fixture(scope="module")
def sglang() -> SGLang:
    root = installed_sglang()
    if root is None:
        pytest.skip("SGLang is not installed in .cache/upstream: `make upstream` (part of `make test`) installs it")
    return SGLang(root)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> dict[str, list[dict]]:
    """Run name -> the requests its server received, in order."""
    assets = save_tiny_run(tmp_path_factory.mktemp("contract"))
    runs = {
        "distributed": ["train.eval_every=1"],
        "disk": ["rollout.weight_sync=disk", "data.eval_path="],
        "colocated tensor": ["rollout.colocate=true", "rollout.weight_sync=tensor", "data.eval_path="],
    }
    records = {}
    for name, overrides in runs.items():
        out = tmp_path_factory.mktemp(name.replace(" ", "_")) / "run"
        result = subprocess.run(train_command(assets, out, "rollout.record_requests=true", "train.max_steps=1",
                                              "checkpoint.save_every=0", *overrides),
                                capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        records[name] = _read(out / "rollout" / "server_logs" / "requests-0.jsonl")
    records["timed-out client"] = _timed_out_client(assets / "hf", tmp_path_factory.mktemp("aborts"))
    return records


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _timed_out_client(model_dir: Path, log_dir: Path) -> list[dict]:
    """A client whose generations outlive its timeout: it aborts each one on the server it asked."""
    from megatron_gppo.rollout.client import RolloutError, SGLangClient
    from megatron_gppo.rollout.engine import SamplingParams
    from megatron_gppo.rollout.local_servers import LocalServers

    with LocalServers(model_path=model_dir, num_threads=1, log_dir=log_dir, record_requests=True) as servers:
        client = SGLangClient(server_urls=servers.urls, request_timeout_s=0.05, max_retries=1, backoff_s=0.01,
                              progress=False)
        try:
            with pytest.raises(RolloutError, match="failed 2 times"):
                client.generate([[3, 4, 5]] * 4, sampling=SamplingParams(max_new_tokens=200, ignore_eos=True), n=2)
        finally:
            client.close()
    return _read(log_dir / "requests-0.jsonl")


def judge_request(sglang: SGLang, request: dict) -> list[str]:
    """What SGLang would refuse about one request (method, path, body)."""
    method, path, body = request["method"], request["path"], request["body"]
    where = f"{method} {path}"
    route = sglang.routes.get(path)
    if (method, path) == ("GET", "/begin_weight_update"):  # the session probe: a 405 means the route exists
        return [] if route and "GET" not in route.methods else [f"{where}: the session probe needs a POST-only route"]
    if route is None:
        return [f"{where}: not a route of SGLang {sglang.version}"]
    if method not in route.methods:
        return [f"{where}: SGLang serves it with {sorted(route.methods)}"]
    if route.body_class is None:
        return [] if body in (None, {}) else [f"{where}: sends a body to a route that reads none"]
    if body is None:
        return [f"{where}: no body; SGLang requires a {route.body_class}"]
    problems = []
    unknown = sorted(set(body) - sglang.field_names(route.body_class))
    if unknown:
        problems.append(f"{where}: {route.body_class} has no field {unknown} (SGLang would ignore it)")
    if route.body_class == "GenerateReqInput":
        if error := sglang.generate_contract_error(body):
            problems.append(f"{where}: {error}")
    else:
        try:
            sglang.validate(route.body_class, body)
        except ValueError as err:
            problems.append(f"{where}: {route.body_class} refuses it: {err}")
    return problems


def judge_order(requests: list[dict]) -> list[str]:
    """What SGLang would refuse, or die of, in the order of one server's requests."""
    problems = []
    session = paused = flushed = began = False
    for index, request in enumerate(requests):
        path = request["path"]
        if request["method"] == "GET" and path != "/flush_cache":
            continue  # reads (server info, the session probe) change nothing
        where = f"request {index} ({request['method']} {path})"
        if path == "/begin_weight_update":
            problems += [f"{where}: a session is already open"] if session else []
            session = began = True
        elif path == "/end_weight_update":
            # Before the first session: closing one a dead trainer may have left (400 when there is none).
            problems += [] if session or not began else [f"{where}: no session is open"]
            session = False
        elif path == "/pause_generation":
            paused, flushed = True, False
        elif path == "/continue_generation":
            paused = False
        elif path == "/flush_cache":
            flushed = paused
        if path in SESSION_UPDATES and not session:
            problems.append(f"{where}: outside a weight-update session")
        if path in UPDATES | {"/release_memory_occupation"} and not (paused and flushed):
            problems.append(f"{where}: generation not paused and the cache not flushed first")
    if session or paused:
        problems.append(f"the requests end with {'a session open' if session else 'generation paused'}")
    return problems


def test_every_request_the_trainer_sends_is_one_sglang_accepts(sglang, recorded):
    sent = {(r["method"], r["path"]) for requests in recorded.values() for r in requests}
    assert EXPECTED <= sent, f"not exercised: {sorted(EXPECTED - sent)}"
    problems = []
    for name, requests in recorded.items():
        for request in requests:
            problems += [f"{name}: {p}" for p in judge_request(sglang, request)]
        problems += [f"{name}: {p}" for p in judge_order(requests)]
    assert not problems, "\n".join(dict.fromkeys(problems))


def test_the_cpu_server_serves_only_sglang_routes(sglang):
    for method, path, _ in ROUTES:
        route = sglang.routes.get(path)
        assert route is not None, f"{path}: not a route of SGLang {sglang.version}"
        if method != "*":
            assert method in route.methods, f"{method} {path}: SGLang serves it with {sorted(route.methods)}"


def test_the_judges_catch_what_sglang_refuses(sglang):
    """Each rule fails on a request SGLang would refuse (so the test above can fail)."""
    refused = [
        {"method": "GET", "path": "/get_weight_version", "body": None},  # removed in 0.5.21
        {"method": "POST", "path": "/update_weights_from_tensor", "body": {"serialized_named_tensors": "x"}},
        {"method": "POST", "path": "/pause_generation", "body": {"mode": "freeze"}},
        {"method": "POST", "path": "/abort_request", "body": {"rid": "r", "abort_everything": True}},
        {"method": "POST", "path": "/generate", "body": {"input_ids": [1], "sampling_params": {"temperature": "hot"}}},
        {"method": "POST", "path": "/begin_weight_update", "body": None},
    ]
    for request in refused:
        assert judge_request(sglang, request), request
    update = {"method": "POST", "path": "/update_weights_from_tensor", "body": {}}
    assert judge_order([update]) and judge_order([{"method": "POST", "path": "/pause_generation"}, update])
    pause, flush = {"method": "POST", "path": "/pause_generation"}, {"method": "GET", "path": "/flush_cache"}
    begin, end = ({"method": "POST", "path": p} for p in ("/begin_weight_update", "/end_weight_update"))
    resume = {"method": "POST", "path": "/continue_generation"}
    assert judge_order([pause, flush, begin, update, end, resume]) == []
    assert judge_order([pause, flush, begin, update, end])  # left paused
    assert judge_order([pause, flush, begin, update, end, end, resume])  # ended twice
    assert judge_order([end, pause, flush, begin, update, end, resume]) == []  # a stale session closed first
    assert sglang.generate_response_error({"text": "", "meta_info": {"weight_versions": "v1"}})


def test_colocated_servers_release_memory_after_each_rollout_and_resume_it_for_the_sync(recorded):
    paths = [r["path"] for r in recorded["colocated tensor"]]
    memory = [p.split("_")[0].lstrip("/") for p in paths if p.endswith("_memory_occupation")]
    assert memory == ["release", "resume"]
    # Each release follows a rollout, each resume precedes a weight update.
    for i, path in enumerate(paths):
        if path == "/release_memory_occupation":
            assert "/generate" in paths[:i] and paths[i - 1] == "/flush_cache"
        if path == "/resume_memory_occupation":
            assert "/update_weights_from_tensor" in paths[i:]


def test_the_cpu_server_answers_generate_in_sglang_s_schema(sglang, tmp_path):
    """Every kind of /generate answer our server gives decodes with SGLang's response schema, and names
    nothing that schema lacks."""
    import requests

    from megatron_gppo.rollout.local_servers import LocalServers
    from tests._tiny_models import save_test_model

    bodies = [
        {"input_ids": [3, 4, 5], "sampling_params": {"max_new_tokens": 5}},
        {"input_ids": [[3, 4], [5]], "return_logprob": True, "top_logprobs_num": 2,
         "sampling_params": {"max_new_tokens": 4, "temperature": 0.7, "n": 2}},
        {"input_ids": [3], "sampling_params": {"max_new_tokens": 0}},
        {"input_ids": [3, 4], "sampling_params": {"max_new_tokens": 6, "stop_token_ids": [7, 8, 9]},
         "return_logprob": True, "logprob_start_len": 0},
    ]
    meta_fields = sglang.response_fields("GenerateMetaInfo")
    with LocalServers(model_path=save_test_model(tmp_path / "tiny"), num_threads=1, log_dir=tmp_path) as servers:
        for body in bodies:
            answer = requests.post(f"{servers.urls[0]}/generate", json=body, timeout=60).json()
            for output in answer if isinstance(answer, list) else [answer]:
                assert sglang.generate_response_error(output) is None, (body, output)
                assert set(output["meta_info"]) <= meta_fields, set(output["meta_info"]) - meta_fields
                spans = output["meta_info"]["weight_versions"]
                assert spans == [{"version": "default", "start": 0, "end": len(output["output_ids"])}]
