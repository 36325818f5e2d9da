"""The SGLang client: exactly-once samples when a server dies mid-batch, retries, 4xx, auth, router mode."""

import asyncio
import threading
import time
from collections import Counter

import pytest
import requests

from megatron_gppo.rollout.client import RolloutError, SGLangClient
from megatron_gppo.rollout.engine import SamplingParams
from megatron_gppo.rollout.local_servers import LocalServers
from tests._tiny_models import save_test_model


class FakeServer:
    """An in-process SGLang look-alike: answers /generate with 2 tokens, failing the first tries per rid."""

    def __init__(self, *, fail_first: int = 0, fail_status: int = 503, api_key: str = "", stall_first: int = 0) -> None:
        from aiohttp import web

        self.fail_first, self.fail_status, self.api_key = fail_first, fail_status, api_key
        self.stall_first = stall_first
        self.attempts: Counter = Counter()
        self.aborted: list = []
        app = web.Application()
        app.router.add_post("/generate", self._generate)
        app.router.add_post("/abort_request", self._abort)
        app.router.add_get("/health", self._health)
        # A short shutdown wait: close() cancels stalled handlers instead of waiting out their sleep.
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        self._loop = asyncio.new_event_loop()
        started = threading.Event()

        def serve():
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            self._loop.run_until_complete(site.start())
            self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
            started.set()
            self._loop.run_forever()
        self._thread = threading.Thread(target=serve, daemon=True)
        self._thread.start()
        started.wait(10)

    async def _health(self, request):
        from aiohttp import web

        return web.Response()

    async def _abort(self, request):
        from aiohttp import web

        self.aborted.append((await request.json())["rid"])
        return web.Response()

    async def _generate(self, request):
        from aiohttp import web

        if self.api_key and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return web.json_response({"error": "Unauthorized"}, status=401)
        body = await request.json()
        rid = body["rid"]
        self.attempts[rid] += 1
        if self.attempts[rid] <= self.fail_first:
            return web.json_response({"error": {"message": "busy"}}, status=self.fail_status)
        if self.attempts[rid] <= self.stall_first:
            await asyncio.sleep(30)
        if body["sampling_params"].get("top_k") == 0:
            return web.json_response({"error": {"message": "top_k must be -1 or >= 1"}}, status=400)
        tokens = [len(body["input_ids"]), 7]
        return web.json_response({"text": "xy", "output_ids": tokens, "meta_info": {
            "id": rid, "finish_reason": {"type": "length", "length": 2}, "weight_version": "3",
            "output_token_logprobs": [[-0.5, t, None] for t in tokens]}})

    def close(self):
        # Clean up the runner first: stopping the loop with handlers still pending leaves
        # "Task was destroyed but it is pending!" noise at interpreter exit.
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


@pytest.fixture
def fake():
    servers = []

    def make(**kwargs):
        servers.append(FakeServer(**kwargs))
        return servers[-1]
    yield make
    for server in servers:
        server.close()


def test_results_keep_prompt_and_sample_order(fake):
    server = fake()
    client = SGLangClient(server_urls=[server.url], progress=False)
    prompts = [[1], [1, 2], [1, 2, 3]]
    samples = client.generate(prompts, sampling=SamplingParams(max_new_tokens=2), n=3)
    assert [[(s.group_index, s.sample_index) for s in group] for group in samples] == \
        [[(g, j) for j in range(3)] for g in range(3)]
    assert all(s.response_ids == [len(prompts[s.group_index]), 7] and s.prompt_ids == prompts[s.group_index]
               for group in samples for s in group)
    assert all(s.weight_version == "3" and s.rollout_log_probs == [-0.5, -0.5] for group in samples for s in group)


def test_5xx_is_retried_with_backoff_then_gives_up(fake):
    server = fake(fail_first=2)
    client = SGLangClient(server_urls=[server.url], max_retries=2, backoff_s=0.01, progress=False)
    samples = client.generate([[1], [2]], sampling=SamplingParams(max_new_tokens=2), n=2)
    assert len(samples) == 2 and client.last_stats.retries == 8
    assert set(server.attempts.values()) == {3}

    stubborn = fake(fail_first=5)
    client = SGLangClient(server_urls=[stubborn.url], max_retries=1, backoff_s=0.01, progress=False)
    with pytest.raises(RolloutError, match="failed 2 times"):
        client.generate([[1]], sampling=SamplingParams(max_new_tokens=2))


def test_timeout_aborts_the_request_and_retries(fake):
    server = fake(stall_first=1)
    client = SGLangClient(server_urls=[server.url], request_timeout_s=0.5, backoff_s=0.01, progress=False)
    (sample,) = client.generate([[1]], sampling=SamplingParams(max_new_tokens=2))[0:1][0]
    assert client.last_stats.retries == 1 and server.aborted == [sample.metadata["rid"]]


def test_4xx_fails_at_once_and_api_key_is_sent(fake):
    server = fake(api_key="k")
    client = SGLangClient(router_url=server.url, api_key="k", max_retries=3, progress=False)
    with pytest.raises(ValueError, match="HTTP 400"):
        client.generate([[1]], sampling=SamplingParams(max_new_tokens=2, extra={"top_k": 0}))
    assert sum(server.attempts.values()) == 1
    samples = client.generate([[1]], sampling=SamplingParams(max_new_tokens=2))  # via the router URL
    assert samples[0][0].metadata["server_url"] == server.url
    with pytest.raises(ValueError, match="HTTP 401"):
        SGLangClient(server_urls=[server.url], api_key="wrong", progress=False).generate(
            [[1]], sampling=SamplingParams(max_new_tokens=2))


def test_unreachable_servers_fail_after_retries(fake):
    from megatron_gppo.ports import free_port

    client = SGLangClient(server_urls=[f"http://127.0.0.1:{free_port()}"], max_retries=1, backoff_s=0.01,
                          request_timeout_s=2, progress=False)
    with pytest.raises(RolloutError):
        client.generate([[1]], sampling=SamplingParams(max_new_tokens=2))


def test_server_killed_mid_batch_loses_and_duplicates_no_sample(tmp_path):
    model_dir = save_test_model(tmp_path / "tiny")
    num_prompts, n, length = 12, 4, 150
    with LocalServers(model_path=model_dir, num_servers=2, num_threads=1, log_dir=tmp_path / "logs") as servers:
        survivor, victim = servers.urls
        client = SGLangClient(server_urls=servers.urls, max_concurrency=16, max_retries=2, backoff_s=0.05,
                              progress=False)
        prompts = [[3 + i % 20, 4, 5][: 1 + i % 3] for i in range(num_prompts)]
        outcome = {}

        def run():
            try:
                outcome["samples"] = client.generate(prompts, n=n, sampling=SamplingParams(
                    temperature=1.0, max_new_tokens=length, ignore_eos=True))
            except BaseException as err:
                outcome["error"] = err
        thread = threading.Thread(target=run)
        thread.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # kill once the victim is decoding a batch
            state = requests.get(f"{victim}/get_server_info", timeout=10).json()["internal_states"][0]
            if state["num_running_reqs"] > 0 and state["num_generated_tokens"] > 50:
                break
            time.sleep(0.01)
        servers.kill(1)
        thread.join(120)
        assert not thread.is_alive() and "error" not in outcome, outcome.get("error")

    samples = outcome["samples"]
    stats = client.last_stats
    assert stats.retries >= 1 and victim in stats.servers_marked_down, "nothing was in flight on the killed server"
    assert [len(group) for group in samples] == [n] * num_prompts
    flat = [s for group in samples for s in group]
    assert [(s.group_index, s.sample_index) for s in flat] == [(g, j) for g in range(num_prompts) for j in range(n)]
    rids = [s.metadata["rid"] for s in flat]
    assert len(set(rids)) == len(flat) == num_prompts * n
    assert all(rid.endswith(f"-{s.group_index}-{s.sample_index}") for rid, s in zip(rids, flat))
    # Every sample is complete: none is a partial answer from the dead server.
    assert all(s.finish_reason == "length" and s.response_length == length == len(s.rollout_log_probs) for s in flat)
    assert all(s.prompt_ids == prompts[s.group_index] for s in flat)
    assert sum(stats.samples_per_server.values()) == len(flat) and stats.samples_per_server[survivor] > 0
