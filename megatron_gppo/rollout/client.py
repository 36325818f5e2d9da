"""HTTP client for SGLang servers (and for `megatron-gppo serve`, which speaks the same protocol).

Generation: every sample is its own single-sample `/generate` request with a
unique `rid` (`<batch>-<prompt>-<sample>`), so the unit of retry is one
sample and exactness is easy: each (prompt, sample) slot is filled by the
one attempt that answered, attempts for a slot never overlap, and a server
that dies mid-batch only costs a retry of its unfinished requests on the
others. Requests spread over `server_urls` (least in-flight first), or all
go to `router_url`. A bounded number are in flight (`max_concurrency`);
connection errors, timeouts, 408/429 and 5xx answers are retried with
exponential backoff up to `max_retries` times, other 4xx answers fail at
once. A server that refuses connections is skipped until `/health` answers
again.

Control (health, pause, weight updates, ...) goes to every server directly,
concurrently, one thread per server, and raises `RolloutError` naming the
servers that failed.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Sequence, TypeVar

from megatron_gppo.rollout.engine import SamplingParams
from megatron_gppo.rollout.protocol import generate_payload, response_to_sample
from megatron_gppo.types import Sample

if TYPE_CHECKING:
    import aiohttp

    from megatron_gppo.config import RolloutConfig

logger = logging.getLogger(__name__)
T = TypeVar("T")

_RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}
_PROBE_TIMEOUT_S = 5.0
_MAX_BACKOFF_S = 10.0


class RolloutError(RuntimeError):
    """A rollout server failed (after retries, where retries apply)."""


@dataclass
class GenerateStats:
    """What the last `generate` call did; `retries` counts re-sent requests."""

    num_samples: int = 0
    num_tokens: int = 0
    retries: int = 0
    seconds: float = 0.0
    servers_marked_down: list[str] = field(default_factory=list)
    samples_per_server: dict[str, int] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / self.seconds if self.seconds > 0 else 0.0


class _Retryable(Exception):
    def __init__(self, message: str, *, server_down: bool = False) -> None:
        super().__init__(message)
        self.server_down = server_down


class _ServerPool:
    """Picks the least-loaded live server; servers that refused connections return after a /health probe."""

    def __init__(self, urls: Sequence[str], probe: Callable[[str], Awaitable[bool]], stats: GenerateStats) -> None:
        self.urls = list(urls)
        self.in_flight = {url: 0 for url in urls}
        self.down_until: dict[str, float] = {}
        self.down_for: dict[str, float] = {}
        self.probing: set[str] = set()
        self._probe = probe
        self._stats = stats

    def live(self) -> list[str]:
        return [url for url in self.urls if url not in self.down_until]

    async def acquire(self, *, deadline: float) -> str:
        while True:
            self._start_probes()
            live = self.live()
            if live:
                url = min(live, key=lambda u: (self.in_flight[u], random.random()))
                self.in_flight[url] += 1
                return url
            if time.monotonic() > deadline:
                raise RolloutError(f"no rollout server answers: {', '.join(self.urls)}")
            await asyncio.sleep(0.2)

    def release(self, url: str) -> None:
        self.in_flight[url] -= 1

    def mark_down(self, url: str) -> None:
        if url not in self.down_until:
            self.down_for[url] = min(2 * self.down_for.get(url, 0.5), 30.0)
            self.down_until[url] = time.monotonic() + self.down_for[url]
            self._stats.servers_marked_down.append(url)
            logger.warning("rollout server %s is not answering; its requests go to the others", url)

    def _start_probes(self) -> None:
        now = time.monotonic()
        for url, until in list(self.down_until.items()):
            if until <= now and url not in self.probing:
                self.probing.add(url)
                asyncio.get_running_loop().create_task(self._probe_one(url))

    async def _probe_one(self, url: str) -> None:
        try:
            if await self._probe(url):
                self.down_until.pop(url, None)
                self.down_for.pop(url, None)
                logger.info("rollout server %s is back", url)
            else:
                self.down_for[url] = min(2 * self.down_for[url], 30.0)
                self.down_until[url] = time.monotonic() + self.down_for[url]
        finally:
            self.probing.discard(url)


def wait_each(futures: dict[str, Future]) -> dict[str, Any]:
    """Answers of `SGLangClient.request_each` by URL; one RolloutError listing every server that failed."""
    answers, errors = {}, []
    for url, future in futures.items():
        try:
            answers[url] = future.result()
        except RolloutError as err:
            errors.append(str(err))
    if errors:
        raise RolloutError("; ".join(errors))
    return answers


def _run_sync(coro: Awaitable[T]) -> T:
    """Run a coroutine to completion from synchronous code, even when called inside a running loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)  # type: ignore[arg-type]
    with ThreadPoolExecutor(max_workers=1) as pool:  # e.g. inside a notebook's event loop
        return pool.submit(asyncio.run, coro).result()  # type: ignore[arg-type]


class SGLangClient:
    """Generation over many servers (or a router) plus control calls to every server."""

    def __init__(self, *, server_urls: Sequence[str] = (), router_url: str = "", api_key: str = "",
                 max_concurrency: int = 64, request_timeout_s: float = 600.0, max_retries: int = 3,
                 backoff_s: float = 0.5, control_timeout_s: float = 600.0, progress: bool = True) -> None:
        if not server_urls and not router_url:
            raise ValueError("give server_urls, router_url or both")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.server_urls = [url.rstrip("/") for url in server_urls]
        self.router_url = router_url.rstrip("/")
        self.api_key = api_key
        self.max_concurrency = max_concurrency
        self.request_timeout_s = request_timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.control_timeout_s = control_timeout_s
        self.progress = progress
        self.last_stats = GenerateStats()
        self._control_pool = ThreadPoolExecutor(max_workers=max(4, 2 * len(self.server_urls)),
                                                thread_name_prefix="rollout-control")
        self._sessions: dict[str, Any] = {}
        self._sessions_lock = threading.Lock()

    @classmethod
    def from_config(cls, config: RolloutConfig, *, server_urls: Sequence[str] | None = None,
                    progress: bool = True) -> SGLangClient:
        return cls(server_urls=list(server_urls if server_urls is not None else config.server_urls),
                   router_url=config.router_url, api_key=config.api_key, max_concurrency=config.max_concurrency,
                   request_timeout_s=config.request_timeout_s, max_retries=config.max_retries, progress=progress)

    @property
    def generation_urls(self) -> list[str]:
        return [self.router_url] if self.router_url else self.server_urls

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    # -- generation ------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], *, sampling: SamplingParams, n: int = 1,
                 desc: str = "rollout") -> list[list[Sample]]:
        """`n` samples per prompt; `result[i][j]` is sample `j` of prompt `i`. Blocks until all are in."""
        return _run_sync(self.agenerate(prompts, sampling=sampling, n=n, desc=desc))

    async def agenerate(self, prompts: Sequence[Sequence[int]], *, sampling: SamplingParams, n: int = 1,
                        desc: str = "rollout") -> list[list[Sample]]:
        import aiohttp
        from tqdm.auto import tqdm

        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        stats = GenerateStats()
        self.last_stats = stats
        batch = uuid.uuid4().hex[:12]
        jobs = [(g, s) for g in range(len(prompts)) for s in range(n)]
        results: dict[tuple[int, int], Sample] = {}
        params = sampling.to_sglang()
        semaphore = asyncio.Semaphore(self.max_concurrency)
        in_flight: dict[str, str] = {}  # rid -> url, for abort on cancellation
        start = time.monotonic()
        timeout = aiohttp.ClientTimeout(total=self.request_timeout_s)
        connector = aiohttp.TCPConnector(limit=self.max_concurrency, limit_per_host=self.max_concurrency)
        with tqdm(total=len(jobs), desc=desc, unit="sample", disable=not self.progress, dynamic_ncols=True) as bar:
            async with aiohttp.ClientSession(headers=self._headers(), timeout=timeout, connector=connector) as session:
                pool = _ServerPool(self.generation_urls, lambda url: self._probe(session, url), stats)

                async def run(group: int, sample: int) -> None:
                    seed = sampling.request_seed(group, sample)
                    request_params = params if seed is None else {**params, "sampling_seed": seed}
                    payload = generate_payload(prompt_ids=prompts[group], sampling_params=request_params,
                                               rid=f"{batch}-{group}-{sample}")
                    async with semaphore:
                        answer, url = await self._generate_one(session, pool, payload, in_flight, stats)
                    key = (group, sample)
                    assert key not in results, f"slot {key} answered twice"
                    result = response_to_sample(answer, prompt_ids=prompts[group], group_index=group,
                                                sample_index=sample)
                    result.metadata.update(server_url=url, rid=payload["rid"])
                    results[key] = result
                    stats.num_samples += 1
                    stats.num_tokens += result.response_length
                    stats.samples_per_server[url] = stats.samples_per_server.get(url, 0) + 1
                    stats.seconds = time.monotonic() - start
                    bar.update(1)
                    bar.set_postfix_str(f"{stats.tokens_per_s:.0f} tok/s", refresh=False)

                tasks = [asyncio.ensure_future(run(g, s)) for g, s in jobs]
                try:
                    await asyncio.gather(*tasks)
                except BaseException:
                    unfinished = dict(in_flight)  # cancelled tasks forget their rids
                    for task in tasks:
                        task.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
                    await self._abort_rids(session, unfinished)
                    raise
        stats.seconds = time.monotonic() - start
        assert len(results) == len(jobs)
        logger.info("%s: %d samples, %d tokens in %.1fs (%.0f tok/s, %d retries)", desc, stats.num_samples,
                    stats.num_tokens, stats.seconds, stats.tokens_per_s, stats.retries)
        return [[results[(g, s)] for s in range(n)] for g in range(len(prompts))]

    async def _generate_one(self, session: aiohttp.ClientSession, pool: _ServerPool, payload: dict,
                            in_flight: dict[str, str], stats: GenerateStats) -> tuple[Any, str]:
        """POST one request, failing over and backing off; returns (answer, url that answered)."""
        rid = payload["rid"]
        failures = 0
        while True:
            url = await pool.acquire(deadline=time.monotonic() + self.request_timeout_s)
            in_flight[rid] = url
            try:
                return await self._post_generate(session, url, payload), url
            except _Retryable as err:
                error = err
            finally:
                pool.release(url)
                in_flight.pop(rid, None)
            failures += 1
            if error.server_down:
                pool.mark_down(url)
            elif isinstance(error.__cause__, asyncio.TimeoutError):  # it may still be generating there
                await self._abort_rids(session, {rid: url})
            if failures > self.max_retries:
                raise RolloutError(f"request {rid} failed {failures} times; last error from {url}: {error}")
            stats.retries += 1
            logger.debug("retrying %s after %s", rid, error)
            # Failing over to another live server needs no wait; retrying the same one does.
            if not (error.server_down and pool.live()):
                delay = min(self.backoff_s * 2 ** (failures - 1), _MAX_BACKOFF_S)
                await asyncio.sleep(delay * (0.5 + random.random()))

    async def _post_generate(self, session: aiohttp.ClientSession, url: str, payload: dict) -> Any:
        import aiohttp

        try:
            async with session.post(f"{url}/generate", json=payload) as response:
                if response.status in _RETRYABLE_STATUS:
                    raise _Retryable(f"HTTP {response.status}: {(await response.text())[:200]}")
                if response.status >= 400:
                    raise ValueError(f"{url}/generate answered HTTP {response.status}: {(await response.text())[:500]}")
                return await response.json(content_type=None)
        except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError,
                aiohttp.ClientPayloadError) as err:  # refused, reset, or cut off mid-answer: the server is gone
            raise _Retryable(f"{type(err).__name__}: {err}", server_down=True) from err
        except asyncio.TimeoutError as err:
            raise _Retryable(f"no answer within {self.request_timeout_s}s") from err

    async def _probe(self, session: aiohttp.ClientSession, url: str) -> bool:
        import aiohttp

        try:
            async with session.get(f"{url}/health", timeout=aiohttp.ClientTimeout(total=_PROBE_TIMEOUT_S)) as response:
                return response.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return False

    async def _abort_rids(self, session: aiohttp.ClientSession, rids: dict[str, str]) -> None:
        """Best effort: ask servers to stop generating for requests nobody waits for any more."""
        import aiohttp

        async def abort(rid: str, url: str) -> None:
            try:
                async with session.post(f"{url}/abort_request", json={"rid": rid},
                                        timeout=aiohttp.ClientTimeout(total=_PROBE_TIMEOUT_S)):
                    pass
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                pass
        await asyncio.gather(*(abort(rid, url) for rid, url in rids.items()))

    # -- control ---------------------------------------------------------------

    def _session(self, url: str) -> Any:
        import requests

        with self._sessions_lock:
            if url not in self._sessions:
                session = requests.Session()
                session.headers.update(self._headers())
                self._sessions[url] = session
            return self._sessions[url]

    def request(self, url: str, path: str, payload: dict | None = None, *, method: str = "POST",
                timeout_s: float | None = None) -> Any:
        """One control call; returns the JSON answer (or None for an empty body). RolloutError on failure."""
        import requests

        try:
            response = self._session(url).request(method, f"{url}{path}", json=payload,
                                                  timeout=timeout_s or self.control_timeout_s)
        except requests.RequestException as err:
            raise RolloutError(f"{url}{path}: {type(err).__name__}: {err}") from None
        try:
            answer = response.json() if response.content else None
        except ValueError:
            answer = response.text
        if response.status_code >= 400 or (isinstance(answer, dict) and answer.get("success") is False):
            message = answer.get("message") or answer.get("error") if isinstance(answer, dict) else answer
            raise RolloutError(f"{url}{path}: HTTP {response.status_code}: {message}")
        return answer

    def request_each(self, path: str, payload: dict | None = None, *, per_url: dict[str, dict] | None = None,
                     method: str = "POST", timeout_s: float | None = None) -> dict[str, Future]:
        """Start the call on every server (with `per_url[url]` instead of `payload` where given); URL -> future."""
        per_url = per_url or {}
        return {url: self._control_pool.submit(self.request, url, path, per_url.get(url, payload), method=method,
                                               timeout_s=timeout_s) for url in self.server_urls}

    def call_each(self, path: str, payload: dict | None = None, *, method: str = "POST",
                  timeout_s: float | None = None) -> dict[str, Any]:
        if not self.server_urls:
            raise ValueError(f"{path} goes to every server, and no server_urls are configured")
        return wait_each(self.request_each(path, payload, method=method, timeout_s=timeout_s))

    def health(self, *, timeout_s: float = _PROBE_TIMEOUT_S) -> dict[str, bool]:
        futures = self.request_each("/health", method="GET", timeout_s=timeout_s)
        healthy = {}
        for url, future in futures.items():
            try:
                future.result()
                healthy[url] = True
            except RolloutError:
                healthy[url] = False
        return healthy

    def wait_until_healthy(self, *, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            healthy = self.health()
            if all(healthy.values()):
                return
            if time.monotonic() > deadline:
                down = [url for url, ok in healthy.items() if not ok]
                raise RolloutError(f"rollout servers not healthy after {timeout_s:.0f}s: {', '.join(down)}")
            time.sleep(0.5)

    def server_info(self) -> dict[str, dict]:
        return self.call_each("/get_server_info", method="GET")

    def weight_versions(self) -> dict[str, str]:
        return {url: str(answer["weight_version"])
                for url, answer in self.call_each("/get_weight_version", method="GET").items()}

    def pause(self, *, mode: str = "abort") -> None:
        self.call_each("/pause_generation", {"mode": mode})

    def resume(self) -> None:
        self.call_each("/continue_generation", {})

    def flush_cache(self) -> None:
        self.call_each("/flush_cache", {})

    def release_memory(self, *, tags: Sequence[str] | None = None) -> None:
        self.call_each("/release_memory_occupation", {"tags": list(tags)} if tags else {})

    def resume_memory(self, *, tags: Sequence[str] | None = None) -> None:
        self.call_each("/resume_memory_occupation", {"tags": list(tags)} if tags else {})

    def abort_all(self) -> None:
        self.call_each("/abort_request", {"abort_all": True, "rid": ""})

    def close(self) -> None:
        self._control_pool.shutdown(wait=False, cancel_futures=True)
        with self._sessions_lock:
            for session in self._sessions.values():
                session.close()
            self._sessions.clear()


__all__ = ["GenerateStats", "RolloutError", "SGLangClient", "wait_each"]
