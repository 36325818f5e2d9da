"""`rollout.mode=async`: the next step's rollouts are generated while this step trains.

Checked on tiny end-to-end runs: with `max_staleness=0` async is sync, metric
for metric; with 1, every trained sample is one policy version old (from its
own `weight_version`) once the producer runs ahead, never more; a run
stopped after a checkpoint and resumed (the checkpoint holds the finished
batch waiting for the next step) logs what the uninterrupted run logged; and
with partial rollouts, through the real sglang-router to servers given by
URL, no sample is older than one version either (test_partial_rollouts.py
checks a continued response token by token).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from megatron_gppo.metrics import read_metrics
from megatron_gppo.ports import free_port
from megatron_gppo.rollout.local_servers import LocalServers
from tests._tiny_models import computed_metrics, save_tiny_run
from tests.distributed.test_train_e2e import train_command

pytestmark = pytest.mark.distributed

MAX_STEPS = 3


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return save_tiny_run(tmp_path_factory.mktemp("async"))


def run(assets, out, *overrides) -> list[dict]:
    result = subprocess.run(train_command(assets, out, "checkpoint.save_every=2", "train.eval_every=2",
                                          "logging.plots=false", *overrides),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return read_metrics(out / "metrics.jsonl")


def test_async_with_max_staleness_0_is_sync(assets, tmp_path):
    steps = f"train.max_steps={MAX_STEPS}"
    synced = run(assets, tmp_path / "sync", steps, "algorithm.tis_cap=2.0")
    asynced = run(assets, tmp_path / "async", steps, "rollout.mode=async", "rollout.max_staleness=0")
    assert [computed_metrics(r) for r in asynced] == [computed_metrics(r) for r in synced]


def test_async_trains_one_version_old_samples_and_resumes_exactly(assets, tmp_path):
    uninterrupted = run(assets, tmp_path / "whole", f"train.max_steps={MAX_STEPS}", "rollout.mode=async")
    trained = [r for r in uninterrupted if "staleness_max" in r]
    assert [r["staleness_max"] for r in trained] == [0.0] + [1.0] * (MAX_STEPS - 1)
    assert all(r["staleness_mean"] == r["staleness_max"] and r["staleness_exceeded"] == 0 for r in trained)
    assert all(r["tis_weight_mean"] > 0 for r in trained)  # the off-policy correction is on by default

    resumed = tmp_path / "resumed"
    run(assets, resumed, "train.max_steps=2", "rollout.mode=async")
    records = run(assets, resumed, f"train.max_steps={MAX_STEPS}", "rollout.mode=async")
    assert [r["step"] for r in records] == [r["step"] for r in uninterrupted]
    assert [computed_metrics(r) for r in records] == [computed_metrics(r) for r in uninterrupted]


ROUTER = shutil.which("sglang-router", path=str(Path(sys.executable).parent)) or shutil.which("sglang-router")


@pytest.mark.skipif(ROUTER is None, reason="sglang-router is not installed (pip install sglang-router)")
def test_async_partial_run_through_the_router_to_server_urls(assets, tmp_path):
    """The `sglang` backend: servers given by URL, generation through the real sglang-router, weights to every
    server; async with partial rollouts on top."""
    with LocalServers(model_path=assets / "hf", num_servers=2, num_threads=1, log_dir=tmp_path / "logs",
                      record_requests=True) as servers:
        port = free_port()
        with open(tmp_path / "router.log", "w") as log:
            router = subprocess.Popen([ROUTER, "launch", "--host", "127.0.0.1", "--port", str(port),
                                       "--worker-urls", *servers.urls, "--policy", "round_robin",
                                       "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())],
                                      stdout=log, stderr=subprocess.STDOUT)
        router_url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while not _answers(router_url):
                assert time.monotonic() < deadline, (tmp_path / "router.log").read_text()[-2000:]
                time.sleep(0.2)
            records = run(assets, tmp_path / "run", "train.max_steps=3", "rollout.mode=async", "rollout.partial=true",
                          "rollout.backend=sglang", f"rollout.server_urls=[{','.join(servers.urls)}]",
                          f"rollout.router_url={router_url}", "rollout.weight_sync_address=127.0.0.1")
        finally:
            router.terminate()
            router.wait(15)
        generated = [sum(r["path"] == "/generate" for r in map(json.loads, open(tmp_path / "logs" / name)))
                     for name in ("requests-0.jsonl", "requests-1.jsonl")]
    trained = [r for r in records if "staleness_max" in r]
    assert len(trained) == 3 and max(r["staleness_max"] for r in trained) <= 1
    assert all(count > 0 for count in generated), generated  # the router spread the rollouts over both


def _answers(url: str) -> bool:
    try:
        return requests.post(f"{url}/generate", json={"input_ids": [3], "sampling_params": {"max_new_tokens": 1}},
                             timeout=5).status_code == 200
    except requests.ConnectionError:
        return False
