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
concurrently, and raises `RolloutError` naming the servers that failed.

Both kinds of call go through one aiohttp session on one event loop, which
the client runs on a thread of its own: synchronous callers (the trainer)
block on a future, and control calls made with `request_each` come back as
futures that can be waited on next to a collective (weight sync).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Coroutine, Sequence, TypeVar

import aiohttp

from megatron_gppo.rollout.engine import SamplingParams
from megatron_gppo.rollout.protocol import generate_payload, response_to_sample
from megatron_gppo.rollout.sglang_requests import (AbortReq, ContinueGenerationReqInput, EndWeightUpdateReqInput,
                                                   PauseGenerationReqInput, ReleaseMemoryOccupationReqInput,
                                                   ResumeMemoryOccupationReqInput, body)
from megatron_gppo.types import Sample


logger = logging.getLogger(__name__)
T = TypeVar("T")

_RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}
_PROBE_TIMEOUT_S = 5.0
_FLUSH_RETRY_S = 0.2
_MAX_RETRY_DELAY_S = 10.0
_MAX_DOWN_S = 30.0


def backoff_s(attempt: int, *, base_s: float, max_s: float) -> float:
    """The wait before try `attempt + 1` (attempt >= 0): doubling from `base_s`, at most `max_s`."""
    return min(base_s * 2 ** attempt, max_s)


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

    def __init__(self, urls: Sequence[str], probe: Callable[[str], Awaitable[bool]], stats: GenerateStats, *,
                 gone: Callable[[str], bool] = lambda url: False) -> None:
        """`gone(url)`: known never to answer again (a local server whose process exited)."""
        self.urls = list(urls)
        self._gone = gone
        self.in_flight = {url: 0 for url in urls}
        self.down_until: dict[str, float] = {}
        self.failed_probes: dict[str, int] = {}
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
            if time.monotonic() > deadline or all(self._gone(url) for url in self.urls):
                raise RolloutError(f"no rollout server answers: {', '.join(self.urls)}")
            await asyncio.sleep(0.2)

    def release(self, url: str) -> None:
        self.in_flight[url] -= 1

    def mark_down(self, url: str) -> None:
        if url not in self.down_until:
            self.failed_probes[url] = 0
            self._probe_later(url)
            self._stats.servers_marked_down.append(url)
            logger.warning("rollout server %s is not answering; its requests go to the others", url)

    def _probe_later(self, url: str) -> None:
        self.down_until[url] = time.monotonic() + backoff_s(self.failed_probes[url], base_s=1.0, max_s=_MAX_DOWN_S)

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
                self.failed_probes.pop(url, None)
                logger.info("rollout server %s is back", url)
            else:
                self.failed_probes[url] += 1
                self._probe_later(url)
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
        self.num_retries = 0
        """Generate requests retried (on this server or another), over the client's life."""
        self._has_sessions: dict[str, bool] = {}  # URL -> whether it has weight-update sessions
        self.continue_aborted = False
        """Partial rollouts: a response aborted mid-way (a weight sync pauses generation with `abort`) is
        continued, from the prompt plus what it has so far, until it finishes."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sglang-client", daemon=True)
        self._thread.start()
        self._http: aiohttp.ClientSession | None = None

    @property
    def generation_urls(self) -> list[str]:
        return [self.router_url] if self.router_url else self.server_urls

    def _submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        """Run `coro` on the client's loop; the future is safe to wait on from any thread."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the client's loop and wait; an interrupted caller cancels it."""
        future = self._submit(coro)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    async def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            # No connection cap: generation is bounded by max_concurrency, control calls are few.
            self._http = aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(limit=0))
        return self._http

    # -- generation ------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], *, sampling: SamplingParams, n: int = 1,
                 desc: str = "rollout") -> list[list[Sample]]:
        """`n` samples per prompt; `result[i][j]` is sample `j` of prompt `i`. Blocks until all are in."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        return self._run(self._generate(prompts, sampling=sampling, n=n, desc=desc))

    async def _generate(self, prompts: Sequence[Sequence[int]], *, sampling: SamplingParams, n: int,
                        desc: str) -> list[list[Sample]]:
        from tqdm.auto import tqdm

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
        pool = _ServerPool(self.generation_urls, self._probe, stats, gone=self.server_gone)
        with tqdm(total=len(jobs), desc=desc, unit="sample", disable=not self.progress, dynamic_ncols=True) as bar:

            async def run(group: int, sample: int) -> None:
                seed = sampling.request_seed(group, sample)
                request_params = params if seed is None else {**params, "sampling_seed": seed}
                payload = generate_payload(prompt_ids=prompts[group], sampling_params=request_params,
                                           rid=f"{batch}-{group}-{sample}")
                async with semaphore:
                    answer, url = await self._generate_one(pool, payload, in_flight, stats, timeout=timeout)
                key = (group, sample)
                assert key not in results, f"slot {key} answered twice"
                result = response_to_sample(answer, prompt_ids=prompts[group], group_index=group,
                                            sample_index=sample)
                part = 0
                while self.continue_aborted and result.finish_reason == "abort":
                    left = request_params["max_new_tokens"] - result.response_length
                    if left <= 0:
                        result.finish_reason = "length"
                        break
                    part += 1
                    prefix = prompts[group] + result.response_ids
                    continued = {**request_params, "max_new_tokens": left}
                    if seed is not None:
                        continued["sampling_seed"] = (seed + part) % (2**63 - 1)
                    async with semaphore:
                        answer, url = await self._generate_one(
                            pool, generate_payload(prompt_ids=prefix, sampling_params=continued,
                                                   rid=f"{payload['rid']}-{part}"),
                            in_flight, stats, timeout=timeout)
                    result = result.continued_by(response_to_sample(answer, prompt_ids=prefix, group_index=group,
                                                                    sample_index=sample))
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
                await self._abort_rids(unfinished)
                raise
        stats.seconds = time.monotonic() - start
        assert len(results) == len(jobs)
        logger.debug("%s: %d samples, %d tokens in %.1fs (%.0f tok/s, %d retries)", desc, stats.num_samples,
                    stats.num_tokens, stats.seconds, stats.tokens_per_s, stats.retries)
        return [[results[(g, s)] for s in range(n)] for g in range(len(prompts))]

    async def _generate_one(self, pool: _ServerPool, payload: dict, in_flight: dict[str, str], stats: GenerateStats,
                            *, timeout: aiohttp.ClientTimeout) -> tuple[Any, str]:
        """POST one request, failing over and backing off; returns (answer, url that answered)."""
        rid = payload["rid"]
        failures = 0
        while True:
            url = await pool.acquire(deadline=time.monotonic() + self.request_timeout_s)
            in_flight[rid] = url
            try:
                return await self._post_generate(url, payload, timeout=timeout), url
            except _Retryable as err:
                error = err
            finally:
                pool.release(url)
                in_flight.pop(rid, None)
            failures += 1
            if error.server_down:
                pool.mark_down(url)
            elif isinstance(error.__cause__, asyncio.TimeoutError):  # it may still be generating there
                await self._abort_rids({rid: url})
            if failures > self.max_retries:
                raise RolloutError(f"request {rid} failed {failures} times; last error from {url}: {error}")
            stats.retries += 1
            self.num_retries += 1
            logger.debug("retrying %s after %s", rid, error)
            # Failing over to another live server needs no wait; retrying the same one does.
            if not (error.server_down and pool.live()):
                delay = backoff_s(failures - 1, base_s=self.backoff_s, max_s=_MAX_RETRY_DELAY_S)
                await asyncio.sleep(delay * (0.5 + random.random()))

    async def _post_generate(self, url: str, payload: dict, *, timeout: aiohttp.ClientTimeout) -> Any:
        session = await self._session()
        try:
            async with session.post(f"{url}/generate", json=payload, timeout=timeout) as response:
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

    def server_gone(self, url: str) -> bool:
        """Whether `url` is known never to answer again (the client cannot know; an engine that started
        the server can)."""
        return False

    async def _probe(self, url: str) -> bool:
        try:
            await self._request(url, "/health", method="GET", timeout_s=_PROBE_TIMEOUT_S)
        except RolloutError:
            return False
        return True

    async def _abort_rids(self, rids: dict[str, str]) -> None:
        """Best effort: ask servers to stop generating for requests nobody waits for any more."""
        async def abort(rid: str, url: str) -> None:
            try:
                await self._request(url, "/abort_request", body(AbortReq(rid=rid)), timeout_s=_PROBE_TIMEOUT_S)
            except RolloutError:
                pass
        await asyncio.gather(*(abort(rid, url) for rid, url in rids.items()))

    # -- control ---------------------------------------------------------------

    async def _status(self, url: str, path: str, payload: dict | None = None, *, method: str = "POST",
                      timeout_s: float | None = None) -> tuple[int, str]:
        """One control call's HTTP status and body text. RolloutError when the server cannot be reached."""
        session = await self._session()
        try:
            async with session.request(method, f"{url}{path}", json=payload,
                                       timeout=aiohttp.ClientTimeout(total=timeout_s or self.control_timeout_s)
                                       ) as response:
                return response.status, await response.text()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as err:
            raise RolloutError(f"{url}{path}: {type(err).__name__}: {err}") from None

    async def _request(self, url: str, path: str, payload: dict | None = None, *, method: str = "POST",
                       timeout_s: float | None = None) -> Any:
        """One control call; the JSON answer (None for an empty body). RolloutError on failure."""
        status, text = await self._status(url, path, payload, method=method, timeout_s=timeout_s)
        try:
            answer = json.loads(text) if text else None
        except ValueError:
            answer = text
        if status >= 400 or (isinstance(answer, dict) and answer.get("success") is False):
            message = answer.get("message") or answer.get("error") if isinstance(answer, dict) else answer
            raise RolloutError(f"{url}{path}: HTTP {status}: {message}")
        return answer

    def request_each(self, path: str, payload: dict | None = None, *, per_url: dict[str, dict] | None = None,
                     method: str = "POST", timeout_s: float | None = None,
                     urls: Sequence[str] | None = None) -> dict[str, Future]:
        """Start the call on every server, or on `urls` (with `per_url[url]` instead of `payload` where given);
        URL -> future."""
        per_url = per_url or {}
        return {url: self._submit(self._request(url, path, per_url.get(url, payload), method=method,
                                                timeout_s=timeout_s))
                for url in (self.server_urls if urls is None else urls)}

    def call_each(self, path: str, payload: dict | None = None, *, method: str = "POST",
                  timeout_s: float | None = None, urls: Sequence[str] | None = None) -> dict[str, Any]:
        if not self.server_urls:
            raise ValueError(f"{path} goes to every server, and no server_urls are configured")
        return wait_each(self.request_each(path, payload, method=method, timeout_s=timeout_s, urls=urls))

    def health(self) -> dict[str, bool]:
        """Server URL -> whether it answers `/health`."""
        futures = {url: self._submit(self._probe(url)) for url in self.server_urls}
        return {url: future.result() for url, future in futures.items()}

    def server_info(self) -> dict[str, dict]:
        """Server URL -> its `/server_info` (startup arguments such as `tp_size`, and its release as `version`)."""
        return self.call_each("/server_info", method="GET")

    def weight_versions(self) -> dict[str, str]:
        """Server URL -> the weight version it reports (in `/model_info`)."""
        return {url: str(answer["weight_version"])
                for url, answer in self.call_each("/model_info", method="GET").items()}

    def has_update_sessions(self) -> dict[str, bool]:
        """Server URL -> whether it has weight-update sessions (SGLang >= 0.5.21, our CPU server).

        Asked once per URL, without changing anything: such a server answers a GET of
        `/begin_weight_update` (a POST route) with 405, an older one with 404.
        """
        async def probe(url: str) -> bool:
            status, text = await self._status(url, "/begin_weight_update", method="GET")
            if status not in (404, 405):
                raise RolloutError(f"{url}/begin_weight_update: HTTP {status}: {text.strip()[:200]}")
            return status == 405
        unknown = [url for url in self.server_urls if url not in self._has_sessions]
        self._has_sessions.update(wait_each({url: self._submit(probe(url)) for url in unknown}))
        return {url: self._has_sessions[url] for url in self.server_urls}

    def end_stale_update_sessions(self) -> list[str]:
        """Close weight-update sessions a previous trainer left open (it died inside an update): servers
        that outlive a trainer would refuse every later update. Returns the URLs that had one."""
        async def end(url: str) -> bool:
            status, text = await self._status(url, "/end_weight_update", body(EndWeightUpdateReqInput()))
            if status not in (200, 400):  # 400: no session was open
                raise RolloutError(f"{url}/end_weight_update: HTTP {status}: {text.strip()[:200]}")
            return status == 200
        urls = [url for url, has in self.has_update_sessions().items() if has]
        ended = wait_each({url: self._submit(end(url)) for url in urls})
        return [url for url, was_open in ended.items() if was_open]

    def pause(self, *, mode: str = "abort") -> None:
        """Stop generating (with `abort`, in-flight requests return what they have)."""
        self.call_each("/pause_generation", body(PauseGenerationReqInput(mode=mode)))

    def flush_cache(self, *, timeout_s: float = 60.0) -> None:
        """Flush every server's prefix cache, retrying while requests still run (as after an abort, which
        SGLang carries out asynchronously); RolloutError when one is still busy after `timeout_s`."""
        async def flush(url: str) -> None:
            deadline = time.monotonic() + timeout_s
            while True:
                status, text = await self._status(url, "/flush_cache", method="GET")
                if status == 200:
                    return
                if time.monotonic() > deadline:
                    raise RolloutError(f"{url}/flush_cache: still refused after {timeout_s:g}s: HTTP {status}: "
                                       f"{text.strip()[:200]}")
                await asyncio.sleep(_FLUSH_RETRY_S)
        wait_each({url: self._submit(flush(url)) for url in self.server_urls})

    def resume(self) -> None:
        self.call_each("/continue_generation", body(ContinueGenerationReqInput()))

    def release_memory(self, *, tags: Sequence[str] | None = None) -> None:
        """Free accelerator memory (colocated runs) until `resume_memory`."""
        self.call_each("/release_memory_occupation", body(ReleaseMemoryOccupationReqInput(tags=tags)))

    def resume_memory(self, *, tags: Sequence[str] | None = None) -> None:
        self.call_each("/resume_memory_occupation", body(ResumeMemoryOccupationReqInput(tags=tags)))

    def close(self) -> None:
        """Close the connections and stop the client's loop; in-flight calls are cancelled."""
        if self._loop.is_closed():
            return

        async def shutdown() -> None:
            others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)
            if self._http is not None:
                await self._http.close()

        try:
            self._submit(shutdown()).result(timeout=10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()


__all__ = ["GenerateStats", "RolloutError", "SGLangClient", "backoff_s", "wait_each"]
