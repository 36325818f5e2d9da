"""`megatron-gppo serve`: an SGLang-protocol HTTP server on CPU, backed by `transformers`.

It speaks the subset of SGLang's native API that RL trainers and the
sglang-router use (docs/sglang-protocol.md), so one client
drives it and real SGLang servers alike. Endpoints, with SGLang's names:

  /generate (POST, PUT)                          /health, /health_generate
  /get_model_info, /model_info                   /get_server_info, /server_info
  /flush_cache, /abort_request                   /pause_generation, /continue_generation
  /release_memory_occupation, /resume_memory_occupation
  /begin_weight_update, /end_weight_update
  /update_weights_from_disk, /update_weights_from_tensor, /update_weight_version
  /init_weights_update_group, /update_weights_from_distributed, /destroy_weights_update_group

It follows SGLang's newest protocol (0.5.23) where it differs from older
releases: tensor and distributed updates are refused outside a weight-update
session (`/begin_weight_update` ... `/end_weight_update`, SGLang >= 0.5.21);
the weight version is read from `/model_info` (`/get_weight_version` is
gone); and an update that flushes the cache (`flush_cache`, the default) is
refused while requests are running, or queued on a server that is not
paused: pause generation first.

Errors are JSON: 400 `{"error": {"message": ...}}` for bad input (control
endpoints add `"success": false, "message": ...`), 401 `{"error":
"Unauthorized"}` without the API key (`/health*` stays open, as in SGLang).
Memory release/resume are no-ops here (there is no accelerator memory).

Weight updates are all or nothing. Each request is read and checked in full
before the model changes; an update that spans several requests (the
trainer's buckets) ends with the one that carries `weight_version` (or with
`/update_weight_version`), and a part that fails before then (bad names or
shapes, a truncated file, a broken broadcast) puts back every tensor the
earlier parts wrote: the answer is 400 with the reason, and the server keeps
serving the previous version. A session that ends before its update was
complete is rolled back the same way.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import queue
import signal
import threading
import time
from concurrent.futures import Executor, Future
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from aiohttp import web

from megatron_gppo.rollout.protocol import (ParseContext, RequestModel, SequenceResult, build_response,
                                            parse_generate, validate)
from megatron_gppo.rollout.sglang_requests import (AbortReq, BeginWeightUpdateReqInput, ContinueGenerationReqInput,
                                                   DestroyWeightsUpdateGroupReqInput, EndWeightUpdateReqInput,
                                                   InitWeightsUpdateGroupReqInput,
                                                   PauseGenerationReqInput, ReleaseMemoryOccupationReqInput,
                                                   ResumeMemoryOccupationReqInput, UpdateWeightFromDiskReqInput,
                                                   UpdateWeightsFromDistributedReqInput,
                                                   UpdateWeightsFromTensorReqInput, UpdateWeightVersionReqInput)
from megatron_gppo.rollout.weight_loader import UpdateJournal

logger = logging.getLogger(__name__)

SERVER_VERSION = "megatron-gppo-cpu-0.1"
HEALTH_GENERATE_TIMEOUT_S = 20.0
MEMORY_TAGS = ("weights", "kv_cache", "cuda_graph")
# (method, path, RolloutServer handler): SGLang's names. Every route but /health* needs the API key.
ROUTES = (
    ("*", "/generate", "generate"),
    ("GET", "/health", "health"),
    ("GET", "/health_generate", "health_generate"),
    ("GET", "/get_model_info", "model_info"),
    ("GET", "/model_info", "model_info"),
    ("GET", "/get_server_info", "server_info"),
    ("GET", "/server_info", "server_info"),
    ("*", "/flush_cache", "flush_cache"),
    ("POST", "/abort_request", "abort_request"),
    ("POST", "/pause_generation", "pause_generation"),
    ("POST", "/continue_generation", "continue_generation"),
    ("*", "/release_memory_occupation", "release_memory"),
    ("*", "/resume_memory_occupation", "resume_memory"),
    ("POST", "/begin_weight_update", "begin_weight_update"),
    ("POST", "/end_weight_update", "end_weight_update"),
    ("POST", "/update_weight_version", "update_weight_version"),
    ("POST", "/update_weights_from_disk", "update_weights_from_disk"),
    ("POST", "/update_weights_from_tensor", "update_weights_from_tensor"),
    ("POST", "/init_weights_update_group", "init_weights_update_group"),
    ("POST", "/update_weights_from_distributed", "update_weights_from_distributed"),
    ("POST", "/destroy_weights_update_group", "destroy_weights_update_group"),
)


@dataclass(kw_only=True)
class ServerArgs:
    model_path: str
    host: str = "127.0.0.1"
    port: int = 30000
    """0 picks a free port (the ready line says which)."""
    api_key: str = ""
    dtype: str = "float32"
    max_running_requests: int = 128
    max_prefill_tokens: int = 16384
    random_seed: int = 0
    num_threads: int = 0
    """torch intra-op threads; 0 keeps torch's default."""
    context_length: int = 0
    """0 takes max_position_embeddings from the model config."""
    weight_version: str = "default"
    max_request_mb: int = 256
    """Largest request body; larger ones get 413."""
    request_log: str = ""
    """Append every request (method, path, query, JSON body) to this file, one JSON line each."""


class _BadRequest(Exception):
    pass


class _SerialDaemonExecutor(Executor):
    """One daemon thread, jobs in order: weight ops may block in a collective, and must not block exit."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.Queue = queue.Queue()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        self._jobs.put((future, fn, args, kwargs))
        return future

    def _run(self) -> None:
        while True:
            future, fn, args, kwargs = self._jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as err:
                future.set_exception(err)


def _error(status: int, message: str, *, control: bool = False) -> web.Response:
    body: dict[str, Any] = {"error": {"message": message}}
    if control:
        body.update(success=False, message=message)
    return web.json_response(body, status=status)


async def _body_text(request: web.Request) -> str:
    try:
        return (await request.read()).decode("utf-8")
    except UnicodeDecodeError as err:
        raise _BadRequest(f"the request body is not UTF-8 ({err.reason} at byte {err.start})") from None


async def _read_json(request: web.Request) -> Any:
    text = await _body_text(request)
    if not text.strip():
        raise _BadRequest("the request body is empty; expected a JSON object")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise _BadRequest(f"malformed JSON: {err}") from None


async def _read(request: web.Request, model: type[RequestModel], *, allow_empty: bool = False) -> RequestModel:
    """The body as `model` (one of SGLang's request classes); an empty body is the defaults if allowed."""
    if allow_empty and not (await _body_text(request)).strip():
        return model()
    try:
        return validate(model, await _read_json(request))
    except ValueError as err:
        raise _BadRequest(str(err)) from None


class RolloutServer:
    """Loads the model, owns the generation worker, and serves the HTTP API."""

    def __init__(self, args: ServerArgs) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from megatron_gppo.rollout.generator import Generator
        from megatron_gppo.rollout.process_group import dtype_from_name
        from megatron_gppo.rollout.worker import GenerationWorker

        model_dir = Path(args.model_path)
        if not model_dir.is_dir():
            raise FileNotFoundError(f"model path not found: {model_dir}")
        if args.num_threads > 0:
            torch.set_num_threads(args.num_threads)
        self.args = args
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype_from_name(args.dtype))
        model.eval().requires_grad_(False)
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
        except (OSError, ValueError) as err:
            logger.warning("no tokenizer in %s (%s): only input_ids requests will work", model_dir, err)
            tokenizer = None
        context_length = args.context_length or int(model.config.max_position_embeddings)
        self.generator = Generator(model=model, tokenizer=tokenizer, context_length=context_length,
                                   max_running=args.max_running_requests, max_prefill_tokens=args.max_prefill_tokens,
                                   seed=args.random_seed, weight_version=args.weight_version)
        self.parse_ctx = ParseContext(vocab_size=self.generator.vocab_size, context_length=context_length,
                                      tokenizer=tokenizer)
        self.worker = GenerationWorker(self.generator)
        self.weights = _SerialDaemonExecutor("weight-updates")
        self.journal = UpdateJournal()  # what the update in progress overwrote; touched on the worker thread only
        self.groups: dict[str, Any] = {}
        self.update_session: str | None = None  # the open weight-update session's selector
        self.released_memory: set[str] = set()  # SGLang's tags: weights, kv_cache, cuda_graph
        self.url = ""

    # -- plumbing --------------------------------------------------------------

    def build_app(self) -> web.Application:
        middlewares = [self._record] if self.args.request_log else []
        app = web.Application(middlewares=[*middlewares, self._auth, self._errors],
                              client_max_size=self.args.max_request_mb * 2**20)
        for method, path, handler in ROUTES:
            app.router.add_route(method, path, getattr(self, handler))
        return app

    @web.middleware
    async def _record(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        text = (await request.read()).decode("utf-8", errors="replace")
        try:
            body = json.loads(text) if text.strip() else None
        except json.JSONDecodeError:
            body = text
        entry = {"method": request.method, "path": request.path, "query": dict(request.query), "body": body}
        with open(self.args.request_log, "a", encoding="utf-8") as log:
            log.write(json.dumps(entry) + "\n")
        return await handler(request)

    @web.middleware
    async def _auth(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        key = self.args.api_key
        if key and request.method != "OPTIONS" and not request.path.startswith(("/health", "/metrics")):
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                return web.json_response({"error": "Unauthorized"}, status=401)
        return await handler(request)

    @web.middleware
    async def _errors(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        control = request.path != "/generate"
        try:
            return await handler(request)
        except _BadRequest as err:
            return _error(400, str(err), control=control)
        except web.HTTPException as err:
            if err.status < 400:
                raise
            return _error(err.status, f"{request.method} {request.path}: {err.reason}", control=control)
        except Exception as err:  # answer, log, keep serving
            logger.exception("%s %s failed", request.method, request.path)
            return _error(500, f"internal error: {err}", control=control)

    async def _on_worker(self, fn: Callable) -> Any:
        return await asyncio.wrap_future(self.worker.call(fn))

    async def _on_weights_thread(self, fn: Callable, *args: Any) -> Any:
        return await asyncio.wrap_future(self.weights.submit(fn, *args))

    # -- generation ------------------------------------------------------------

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await _read_json(request)
        self._require_memory(*MEMORY_TAGS, doing="generate")
        try:
            parsed = parse_generate(body, self.parse_ctx)
        except ValueError as err:
            return _error(400, str(err))
        loop = asyncio.get_running_loop()
        futures = []
        for seq in parsed.sequences:
            future = loop.create_future()
            self.worker.submit(seq, _resolver(loop, future))
            futures.append(future)
        try:
            results = await asyncio.gather(*futures)
        except asyncio.CancelledError:  # the client went away: stop generating for it
            rids = {seq.rid for seq in parsed.sequences}
            self.worker.call(lambda g: g.abort(rids=rids))
            raise
        tokenizer = self.parse_ctx.tokenizer
        token_text = (lambda t: tokenizer.decode([t])) if tokenizer is not None else None
        outputs = [build_response(seq, result, token_text=token_text) for seq, result in zip(parsed.sequences, results)]
        answer: Any = outputs if parsed.returns_list else outputs[0]
        if not parsed.stream:
            return web.json_response(answer)
        # Streaming clients get the finished output as one event.
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for output in outputs:
            await response.write(b"data: " + json.dumps(output).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.worker.alive else 503)

    async def health_generate(self, request: web.Request) -> web.Response:
        parsed = parse_generate({"input_ids": [0], "sampling_params": {"max_new_tokens": 1, "temperature": 0},
                                 "rid": f"HEALTH_CHECK_{time.time()}"}, self.parse_ctx)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.worker.submit(parsed.sequences[0], _resolver(loop, future))
        try:
            await asyncio.wait_for(future, HEALTH_GENERATE_TIMEOUT_S)
        except asyncio.TimeoutError:
            return web.Response(status=503)
        return web.Response(status=200)

    # -- information -----------------------------------------------------------

    async def model_info(self, request: web.Request) -> web.Response:
        config = self.generator.model.config
        return web.json_response({
            "model_path": self.args.model_path, "served_model_name": self.args.model_path,
            "tokenizer_path": self.args.model_path, "is_generation": True, "preferred_sampling_params": None,
            "weight_version": self.generator.weight_version, "load_format": "auto", "reasoning_parser": None,
            "tool_call_parser": None, "disaggregation_mode": "null", "has_image_understanding": False,
            "has_audio_understanding": False, "model_type": getattr(config, "model_type", None),
            "architectures": getattr(config, "architectures", None),
        })

    async def server_info(self, request: web.Request) -> web.Response:
        info = {k: v for k, v in asdict(self.args).items() if k != "api_key"}
        info.update(
            port=int(self.url.rsplit(":", 1)[1]) if self.url else self.args.port,
            tp_size=1, dp_size=1, pp_size=1, context_length=self.parse_ctx.context_length,
            weight_version=self.generator.weight_version, version=SERVER_VERSION, url=self.url,
            internal_states=[{
                "num_running_reqs": self.generator.num_running, "num_waiting_reqs": self.generator.num_waiting,
                "num_generated_tokens": self.generator.num_generated_tokens, "paused": self.worker.paused,
                "memory_released": bool(self.released_memory),
            }],
        )
        return web.json_response(info)

    # -- control ---------------------------------------------------------------

    async def flush_cache(self, request: web.Request) -> web.Response:
        # There is no prefix cache here, but as in SGLang the flush fails (400, text) while requests run.
        busy = await self._on_worker(self._busy)
        if busy:
            return web.Response(status=400, text=f"Cache not flushed: {busy}.\n")
        return web.Response(text="Cache flushed.\n")

    def _busy(self, g: Any) -> str:
        """Why the cache cannot be flushed now ('' when it can): requests running, or queued unpaused."""
        if g.num_running or (g.num_waiting and not self.worker.paused):
            return f"{g.num_running} requests running, {g.num_waiting} queued"
        return ""

    async def abort_request(self, request: web.Request) -> web.Response:
        abort = await _read(request, AbortReq)
        await self._on_worker(lambda g: g.abort(rid_prefix=abort.rid or "", abort_all=abort.abort_all))
        return web.Response(status=200)

    async def pause_generation(self, request: web.Request) -> web.Response:
        pause = await _read(request, PauseGenerationReqInput, allow_empty=True)
        # Paused before aborting, as SGLang does: a request resubmitted on the abort's answer (a partial
        # rollout's continuation) then waits for /continue_generation instead of starting.
        await asyncio.wrap_future(self.worker.set_paused(True))
        if pause.mode == "abort":
            await self._on_worker(lambda g: g.abort(abort_all=True))
        return web.json_response({"message": "Generation paused successfully.", "status": "ok", "success": True})

    async def continue_generation(self, request: web.Request) -> web.Response:
        await _read(request, ContinueGenerationReqInput, allow_empty=True)
        await asyncio.wrap_future(self.worker.set_paused(False))
        return web.json_response({"message": "Generation continued successfully.", "status": "ok", "success": True})

    # There is no accelerator memory to free here; the state is kept so that, as on a
    # real SGLang server, generating or loading weights while released fails loudly.
    async def release_memory(self, request: web.Request) -> web.Response:
        tags = (await _read(request, ReleaseMemoryOccupationReqInput, allow_empty=True)).tags or list(MEMORY_TAGS)
        self.released_memory.update(tags)
        logger.info("memory released: %s", ", ".join(sorted(tags)))
        return web.json_response({"success": True, "message": "no accelerator memory to release on the CPU server"})

    async def resume_memory(self, request: web.Request) -> web.Response:
        tags = (await _read(request, ResumeMemoryOccupationReqInput, allow_empty=True)).tags or list(MEMORY_TAGS)
        self.released_memory.difference_update(tags)
        logger.info("memory resumed: %s", ", ".join(sorted(tags)))
        return web.json_response({"success": True, "message": "memory resumed"})

    def _require_memory(self, *tags: str, doing: str) -> None:
        released = sorted(self.released_memory.intersection(tags))
        if released:
            raise _BadRequest(f"cannot {doing}: memory released ({', '.join(released)}); "
                              f"call /resume_memory_occupation first")

    # -- weights ---------------------------------------------------------------

    async def _load(self, named: list, version: str | None, *, abort_all: bool, flush_cache: bool) -> int:
        from megatron_gppo.rollout.weight_loader import load_named_tensors

        def apply(g: Any) -> int:
            if abort_all:
                g.abort(abort_all=True)
            # SGLang loads, then fails the call when the flush finds requests still running (or queued,
            # unless paused); we refuse before loading, so a failed update changes nothing.
            if flush_cache and (busy := self._busy(g)):
                raise ValueError(f"the cache cannot be flushed: {busy}; pause generation (/pause_generation) "
                                 f"or let them finish before updating weights")
            # The tensors were made for us: adopt them.
            count = load_named_tensors(g.model, named, adopt=True, journal=self.journal)
            if version is not None:
                g.weight_version = version
                self.journal.commit()
            return count
        return await self._on_worker(apply)

    def _weights_answer(self, count: int, version: str | None, **extra: Any) -> web.Response:
        message = f"Updated {count} tensors."
        if version is not None:
            message += f" Weight version updated to {version}."
        return web.json_response({"success": True, "message": message, **extra})

    async def _weights_op(self, fn: Callable[[], Any]) -> Any:
        """Run a weight op; its ValueErrors are the caller's mistakes (400), RuntimeErrors are comms failures.

        On a failure every tensor of the unfinished update is put back (see the module docstring).
        """
        self._require_memory("weights", doing="update weights")
        try:
            return await fn()
        except (ValueError, RuntimeError, OSError) as err:
            def rollback(g: Any) -> str:
                count = self.journal.rollback()
                return (f"; restored {count} tensors written earlier in this update" if count else "") + \
                    f"; serving weight version {g.weight_version}"
            restored = await self._on_worker(rollback)
            logger.warning("weight update failed: %s%s", err, restored)
            raise _BadRequest(f"weight update failed: {str(err).strip().splitlines()[0]}{restored}") from None

    async def update_weights_from_disk(self, request: web.Request) -> web.Response:
        from megatron_gppo.rollout.weight_loader import read_safetensors_dir

        update = await _read(request, UpdateWeightFromDiskReqInput)
        if update.load_format not in (None, "auto", "safetensors"):
            raise _BadRequest(f"load_format {update.load_format!r} is not supported (safetensors only)")

        async def op() -> int:
            named = await self._on_weights_thread(read_safetensors_dir, update.model_path)
            return await self._load(named, update.weight_version, abort_all=update.abort_all_requests,
                                    flush_cache=update.flush_cache)
        count = await self._weights_op(op)
        await self._on_worker(lambda g: self.journal.commit())  # a directory is a whole update
        return self._weights_answer(count, update.weight_version, num_paused_requests=0)

    async def update_weights_from_tensor(self, request: web.Request) -> web.Response:
        from megatron_gppo.rollout.weight_loader import deserialize_named_tensors

        update = await _read(request, UpdateWeightsFromTensorReqInput)
        self._require_session("update_weights_from_tensor")
        if update.load_format not in (None, "direct"):
            raise _BadRequest(f"load_format {update.load_format!r} is not supported; send a list of (name, tensor)")
        if not update.serialized_named_tensors:
            raise _BadRequest("serialized_named_tensors must be a non-empty list of base64 strings")

        async def op() -> int:
            # One entry per tensor-parallel rank; this server is rank 0 of 1.
            named = await self._on_weights_thread(deserialize_named_tensors, update.serialized_named_tensors[0])
            return await self._load(named, update.weight_version, abort_all=update.abort_all_requests,
                                    flush_cache=update.flush_cache)
        count = await self._weights_op(op)
        return self._weights_answer(count, update.weight_version)

    async def update_weight_version(self, request: web.Request) -> web.Response:
        update = await _read(request, UpdateWeightVersionReqInput)

        def apply(g: Any) -> None:
            if update.abort_all_requests:
                g.abort(abort_all=True)
            g.weight_version = update.new_version
            self.journal.commit()
        await self._on_worker(apply)
        return web.json_response({"success": True, "message": f"Weight version updated to {update.new_version}",
                                  "new_version": update.new_version})

    async def init_weights_update_group(self, request: web.Request) -> web.Response:
        from megatron_gppo.rollout.process_group import init_weight_update_group

        init = await _read(request, InitWeightsUpdateGroupReqInput)
        if init.backend != "gloo":
            raise _BadRequest(f"backend {init.backend!r} is not available on the CPU server; use 'gloo'")
        if init.group_name in self.groups:
            raise _BadRequest(f"weight update group {init.group_name!r} already exists; destroy it first")

        async def op() -> Any:
            return await self._on_weights_thread(lambda: init_weight_update_group(
                master_address=init.master_address, master_port=init.master_port, rank=init.rank_offset,
                world_size=init.world_size, group_name=init.group_name, backend=init.backend))
        self.groups[init.group_name] = await self._weights_op(op)
        return web.json_response({"success": True,
                                  "message": f"Joined {init.group_name!r} as rank {init.rank_offset}."})

    async def update_weights_from_distributed(self, request: web.Request) -> web.Response:
        from megatron_gppo.rollout.weight_loader import receive_bucket

        update = await _read(request, UpdateWeightsFromDistributedReqInput)
        self._require_session("update_weights_from_distributed")
        group = self.groups.get(update.group_name)
        if group is None:
            raise _BadRequest(f"no weight update group {update.group_name!r}; call /init_weights_update_group first")

        async def op() -> int:
            try:
                named = await self._on_weights_thread(lambda: receive_bucket(
                    names=update.names, dtypes=update.dtypes, shapes=update.shapes, group=group))
            except RuntimeError as err:
                # The broadcast broke (the trainer died or timed out): the group cannot be used again.
                self.groups.pop(update.group_name, None)
                detail = str(err).split("] ", 1)[-1].split(". ", 1)[0]  # gloo: "[file:line] what. advice..."
                raise RuntimeError(f"the broadcast broke ({detail}); group {update.group_name!r} is closed, "
                                   f"call /init_weights_update_group again") from None
            return await self._load(named, update.weight_version, abort_all=update.abort_all_requests,
                                    flush_cache=update.flush_cache)
        count = await self._weights_op(op)
        return self._weights_answer(count, update.weight_version)

    def _require_session(self, route: str) -> None:
        if self.update_session is None:
            raise _BadRequest(f"{route} must run between begin_weight_update() and end_weight_update()")

    async def begin_weight_update(self, request: web.Request) -> web.Response:
        begin = await _read(request, BeginWeightUpdateReqInput)  # SGLang requires a body, if only {}
        if self.update_session is not None:
            raise _BadRequest("a weight-update session is already open; call end_weight_update() first")
        self.update_session = begin.selector
        return web.json_response({"success": True, "message": "Success"})

    async def end_weight_update(self, request: web.Request) -> web.Response:
        await _read(request, EndWeightUpdateReqInput)
        if self.update_session is None:
            raise _BadRequest("no weight-update session is open; call begin_weight_update() first")
        self.update_session = None
        # An update that never reached its last part (the one with the weight version) is put back.
        restored = await self._on_worker(lambda g: self.journal.rollback())
        if restored:
            logger.warning("weight-update session ended with its update incomplete: restored %d tensors", restored)
        return web.json_response({"success": True, "message": "Success"})

    async def destroy_weights_update_group(self, request: web.Request) -> web.Response:
        from megatron_gppo.rollout.process_group import destroy_weight_update_group

        group_name = (await _read(request, DestroyWeightsUpdateGroupReqInput, allow_empty=True)).group_name
        group = self.groups.pop(group_name, None)
        if group is None:
            raise _BadRequest(f"no weight update group {group_name!r}")
        await self._on_weights_thread(destroy_weight_update_group, group)
        return web.json_response({"success": True, "message": f"Destroyed {group_name!r}."})

    # -- lifecycle -------------------------------------------------------------

    async def serve(self) -> None:
        """Serve until SIGTERM or SIGINT, then abort in-flight requests and close."""
        self.worker.start()
        runner = web.AppRunner(self.build_app(), handle_signals=False, handler_cancellation=True, access_log=None,
                               shutdown_timeout=5.0)
        await runner.setup()
        site = web.TCPSite(runner, self.args.host, self.args.port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # the real port when --port 0
        host = self.args.host if ":" not in self.args.host else f"[{self.args.host}]"
        self.url = f"http://{host}:{port}"
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        logger.info("megatron-gppo serve: ready at %s (model %s, weight version %s)", self.url, self.args.model_path,
                    self.generator.weight_version)
        try:
            await stop.wait()
        finally:
            logger.info("shutting down")
            self.worker.stop()
            await runner.cleanup()


def _resolver(loop: asyncio.AbstractEventLoop, future: asyncio.Future) -> Callable[[SequenceResult], None]:
    """A callback for the worker thread that completes `future` on the event loop."""
    def set_result(result: SequenceResult) -> None:
        if not future.done():
            future.set_result(result)

    def on_done(result: SequenceResult) -> None:
        try:
            loop.call_soon_threadsafe(set_result, result)
        except RuntimeError:  # the loop closed during shutdown; nobody is waiting
            pass
    return on_done


class _QuietMalformedHttp(logging.Filter):
    """sglang-router probes workers with an HTTP/2 preface first; aiohttp logs each probe as an error."""

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import BadHttpMessage

        return not (record.exc_info and isinstance(record.exc_info[1], BadHttpMessage))


def run_server(args: ServerArgs) -> None:
    logging.getLogger("aiohttp.server").addFilter(_QuietMalformedHttp())
    server = RolloutServer(args)
    asyncio.run(server.serve())


__all__ = ["RolloutServer", "ServerArgs", "run_server"]
