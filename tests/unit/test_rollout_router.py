"""The real sglang-router in front of `megatron-gppo serve` workers (skipped when it is not installed).

The router is an independent client of the protocol: it health-checks the
workers, reads /server_info and /model_info, adds its own fields to every
/generate body, and fans /flush_cache out.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from megatron_gppo.rollout.client import SGLangClient
from megatron_gppo.rollout.engine import SamplingParams
from megatron_gppo.rollout.local_servers import LocalServers
from megatron_gppo.ports import free_port
from tests._tiny_models import save_test_model

# Installed by the `test` extra next to this interpreter (its bin/ need not be on PATH).
ROUTER = shutil.which("sglang-router", path=str(Path(sys.executable).parent)) or shutil.which("sglang-router")
pytestmark = pytest.mark.skipif(ROUTER is None, reason="sglang-router is not installed (pip install sglang-router)")


def test_generation_through_the_router(tmp_path):
    model_dir = save_test_model(tmp_path / "tiny")
    with LocalServers(model_path=model_dir, num_servers=2, num_threads=1, log_dir=tmp_path / "logs") as servers:
        port = free_port()
        log = open(tmp_path / "router.log", "w")
        # Its Prometheus listener defaults to 0.0.0.0:29000; keep it on loopback and off shared ports.
        router = subprocess.Popen([ROUTER, "launch", "--host", "127.0.0.1", "--port", str(port), "--worker-urls",
                                   *servers.urls, "--policy", "round_robin", "--prometheus-host", "127.0.0.1",
                                   "--prometheus-port", str(free_port())], stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if requests.post(f"{url}/generate", json={"input_ids": [3], "sampling_params": {
                            "max_new_tokens": 1}}, timeout=5).status_code == 200:
                        break
                except requests.ConnectionError:
                    pass
                assert time.monotonic() < deadline, (tmp_path / "router.log").read_text()[-2000:]
                time.sleep(0.2)
            client = SGLangClient(router_url=url, progress=False)
            samples = client.generate([[3, 4], [5]], sampling=SamplingParams(max_new_tokens=6), n=4)
            assert [len(group) for group in samples] == [4, 4]
            assert all(len(s.response_ids) == len(s.rollout_log_probs) > 0 for group in samples for s in group)
            assert requests.post(f"{url}/flush_cache", timeout=10).status_code == 200
            served = [requests.get(f"{u}/get_server_info", timeout=10).json()["internal_states"][0]
                      ["num_generated_tokens"] for u in servers.urls]
            assert all(tokens > 0 for tokens in served)  # round robin reached both workers
        finally:
            os.kill(router.pid, signal.SIGTERM)
            try:
                router.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(router.pid, signal.SIGKILL)
                router.wait()
            log.close()
