"""The SGLang `/generate` wire format, in one place for the server and the client.

Field names follow SGLang's `GenerateReqInput` / `SamplingParams`
(python/sglang/srt/managers/io_struct.py, srt/sampling/sampling_params.py)
and the `meta_info` the tokenizer manager builds for every output:
`id`, `finish_reason` (`{"type": "stop", "matched": token_id_or_str}`,
`{"type": "length", "length": n}`, `{"type": "abort", "message": ...}`),
`prompt_tokens`, `completion_tokens`, `cached_tokens`, `weight_version`,
`output_token_logprobs` (`[[logprob, token_id, text_or_null], ...]`).

A request with a batch of prompts, or with `n > 1`, answers a list with one
entry per (prompt, sample), prompt-major; otherwise a single object.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import Any, Sequence

from megatron_gppo.types import Sample

# SGLang's defaults for what the caller leaves out.
DEFAULT_MAX_NEW_TOKENS = 128
# Sampling params SGLang knows that this server accepts only at their neutral value.
_NEUTRAL_PARAMS = {
    "frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0, "min_new_tokens": 0,
    "json_schema": None, "regex": None, "ebnf": None, "structural_tag": None, "logit_bias": None,
    "custom_params": None, "stop_regex": None,
}
# Known and harmless here: they only shape text/streaming output.
_IGNORED_PARAMS = {"spaces_between_special_tokens", "stream_interval"}


@dataclass(kw_only=True)
class SequenceRequest:
    """One prompt, one sample: the unit the generator schedules."""

    rid: str
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float
    """> 0; greedy requests arrive here as temperature 1 with top_k 1 (SGLang's normalisation)."""
    top_p: float
    top_k: int
    """-1 disables top-k."""
    min_p: float
    stop_token_ids: frozenset[int]
    stop_strs: tuple[str, ...]
    ignore_eos: bool
    no_stop_trim: bool
    skip_special_tokens: bool
    return_logprob: bool
    top_logprobs_num: int
    return_text_in_logprobs: bool
    sampling_seed: int | None = None
    """Seed of this sequence's own sampling generator (SGLang's `sampling_seed`); None: the server's."""


@dataclass(kw_only=True)
class SequenceResult:
    output_ids: list[int]
    output_logprobs: list[float]
    output_top_logprobs: list[tuple[list[float], list[int]]]
    finish_reason: dict[str, Any]
    weight_version: str
    text: str
    e2e_latency: float


@dataclass(kw_only=True)
class GenerateRequest:
    sequences: list[SequenceRequest]
    returns_list: bool
    """Batch input or n > 1: the answer is a list."""
    stream: bool = False


@dataclass(kw_only=True)
class ParseContext:
    """What request validation needs to know about the served model."""

    vocab_size: int
    context_length: int
    tokenizer: Any = None
    """A Hugging Face tokenizer, or None when the model directory has none (then `text` and `stop` are refused)."""


def _per_item(value: Any, num_items: int, name: str, is_batch: bool) -> list[Any]:
    """Broadcast a scalar field over the batch, or check a per-item list's length."""
    if is_batch and isinstance(value, list):
        if len(value) != num_items:
            raise ValueError(f"'{name}' has {len(value)} entries for a batch of {num_items}")
        return value
    return [value] * num_items


def _number(params: dict, key: str, default: float) -> float:
    value = params.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"sampling_params.{key} must be a finite number, got {value!r}")
    return float(value)


def _integer(params: dict, key: str, default: int | None) -> int | None:
    value = params.get(key, default)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"sampling_params.{key} must be an integer, got {value!r}")
    return value


def _flag(value: Any, name: str, default: bool = False) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValueError(f"'{name}' must be true or false, got {value!r}")
    return value


def _sampling(params: Any, ctx: ParseContext) -> dict[str, Any]:
    """Validate one `sampling_params` dict as SGLang's SamplingParams.verify does."""
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ValueError(f"sampling_params must be an object, got {type(params).__name__}")
    for key, neutral in _NEUTRAL_PARAMS.items():
        if params.get(key, neutral) not in (neutral, None):
            raise ValueError(f"sampling_params.{key}={params[key]!r} is not supported by this server")
    known = {"temperature", "top_p", "top_k", "min_p", "max_new_tokens", "n", "stop", "stop_token_ids",
             "ignore_eos", "no_stop_trim", "skip_special_tokens", "sampling_seed", *_NEUTRAL_PARAMS,
             *_IGNORED_PARAMS}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"unknown sampling_params: {', '.join(unknown)}")
    temperature = _number(params, "temperature", 1.0)
    top_p = _number(params, "top_p", 1.0)
    top_k = _integer(params, "top_k", -1)
    min_p = _number(params, "min_p", 0.0)
    max_new_tokens = _integer(params, "max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    n = _integer(params, "n", 1)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not (top_k == -1 or top_k >= 1):
        raise ValueError(f"top_k must be -1 (disable) or at least 1, got {top_k}")
    if not 0 <= min_p <= 1:
        raise ValueError(f"min_p must be in [0, 1], got {min_p}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be at least 0, got {max_new_tokens}")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if temperature < 1e-6:  # SGLang: greedy is temperature 1 with top_k 1
        temperature, top_k = 1.0, 1
    stop = params.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ValueError(f"stop must be a string or a list of non-empty strings, got {params.get('stop')!r}")
    if stop and ctx.tokenizer is None:
        raise ValueError("stop strings need a tokenizer, and the model directory has none")
    stop_token_ids = params.get("stop_token_ids") or []
    if not isinstance(stop_token_ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in stop_token_ids):
        raise ValueError(f"stop_token_ids must be a list of integers, got {params.get('stop_token_ids')!r}")
    seed = params.get("sampling_seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"sampling_seed must be an integer, got {seed!r}")
    return dict(sampling_seed=seed,
        temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, max_new_tokens=max_new_tokens, n=n,
        stop_strs=tuple(stop), stop_token_ids=frozenset(stop_token_ids),
        ignore_eos=_flag(params.get("ignore_eos"), "sampling_params.ignore_eos"),
        no_stop_trim=_flag(params.get("no_stop_trim"), "sampling_params.no_stop_trim"),
        skip_special_tokens=_flag(params.get("skip_special_tokens"), "sampling_params.skip_special_tokens", True),
    )


def _prompts(body: dict, ctx: ParseContext) -> tuple[list[list[int]], bool]:
    """Token ids of every prompt and whether the request is a batch."""
    text, input_ids = body.get("text"), body.get("input_ids")
    if (text is None) == (input_ids is None):
        raise ValueError("give exactly one of 'text' or 'input_ids'")
    if text is not None:
        if ctx.tokenizer is None:
            raise ValueError("'text' needs a tokenizer, and the model directory has none; send 'input_ids'")
        is_batch = isinstance(text, list)
        texts = text if is_batch else [text]
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("'text' must be a string or a list of strings")
        prompts = [ctx.tokenizer.encode(t) for t in texts]
    else:
        if not isinstance(input_ids, list) or not input_ids:
            raise ValueError("'input_ids' must be a non-empty list of token ids or of lists of token ids")
        is_batch = isinstance(input_ids[0], list)
        prompts = input_ids if is_batch else [input_ids]
        for prompt in prompts:
            if not isinstance(prompt, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                raise ValueError("'input_ids' must hold integers (a list, or a list of lists for a batch)")
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"prompt {i} is empty")
        bad = [t for t in prompt if not 0 <= t < ctx.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside [0, {ctx.vocab_size}): {bad[:5]}")
    if is_batch and not prompts:
        raise ValueError("the batch is empty")
    return prompts, is_batch


def parse_generate(body: Any, ctx: ParseContext) -> GenerateRequest:
    """Validate a `/generate` body into per-sample sequence requests; ValueError on bad input."""
    if not isinstance(body, dict):
        raise ValueError("the request body must be a JSON object")
    prompts, is_batch = _prompts(body, ctx)
    num = len(prompts)
    params_list = _per_item(body.get("sampling_params"), num, "sampling_params", is_batch)
    return_logprob = _per_item(body.get("return_logprob"), num, "return_logprob", is_batch)
    top_logprobs_num = _per_item(body.get("top_logprobs_num"), num, "top_logprobs_num", is_batch)
    rids = body.get("rid")
    if is_batch and isinstance(rids, list):
        rids = _per_item(rids, num, "rid", is_batch)
    elif rids is not None and not isinstance(rids, str):
        raise ValueError("'rid' must be a string (or a list of strings for a batch)")
    base_rid = rids if isinstance(rids, str) else uuid.uuid4().hex
    text_in_logprobs = _flag(body.get("return_text_in_logprobs"), "return_text_in_logprobs")
    stream = _flag(body.get("stream"), "stream")

    sequences: list[SequenceRequest] = []
    returns_list = is_batch
    for i, prompt in enumerate(prompts):
        sampling = _sampling(params_list[i], ctx)
        n = sampling.pop("n")
        returns_list = returns_list or n > 1
        max_new_tokens = sampling["max_new_tokens"]
        if len(prompt) + max_new_tokens > ctx.context_length:
            raise ValueError(f"prompt {i} has {len(prompt)} tokens and max_new_tokens={max_new_tokens}: "
                             f"more than the model's context length {ctx.context_length}")
        num_top = top_logprobs_num[i] or 0
        if isinstance(num_top, bool) or not isinstance(num_top, int) or num_top < 0:
            raise ValueError(f"top_logprobs_num must be an integer >= 0, got {num_top!r}")
        item_rid = rids[i] if isinstance(rids, list) else (base_rid if not is_batch else f"{base_rid}_{i}")
        seed = sampling.pop("sampling_seed")
        for j in range(n):
            sequences.append(SequenceRequest(
                rid=item_rid if n == 1 else f"{item_rid}_{j}", prompt_ids=list(prompt),
                return_logprob=_flag(return_logprob[i], "return_logprob"), top_logprobs_num=num_top,
                return_text_in_logprobs=text_in_logprobs, sampling_seed=None if seed is None else seed + j,
                **sampling))
    return GenerateRequest(sequences=sequences, returns_list=returns_list, stream=stream)


def build_response(seq: SequenceRequest, result: SequenceResult, *, token_text=None) -> dict[str, Any]:
    """One output object as SGLang answers it. `token_text(id) -> str` fills logprob texts when asked."""
    text_of = (lambda t: token_text(t)) if (seq.return_text_in_logprobs and token_text) else (lambda t: None)
    meta: dict[str, Any] = {
        "id": seq.rid,
        "finish_reason": result.finish_reason,
        "prompt_tokens": len(seq.prompt_ids),
        "completion_tokens": len(result.output_ids),
        "cached_tokens": 0,
        "weight_version": result.weight_version,
        "e2e_latency": result.e2e_latency,
    }
    if seq.return_logprob:
        meta["input_token_logprobs"] = []
        meta["output_token_logprobs"] = [[lp, t, text_of(t)]
                                         for lp, t in zip(result.output_logprobs, result.output_ids)]
        if seq.top_logprobs_num:
            meta["input_top_logprobs"] = []
            meta["output_top_logprobs"] = [[[v, t, text_of(t)] for v, t in zip(values, ids)]
                                           for values, ids in result.output_top_logprobs]
    return {"text": result.text, "output_ids": result.output_ids, "meta_info": meta}


# ----------------------------------------------------------------------------
# Client side
# ----------------------------------------------------------------------------


def generate_payload(*, prompt_ids: Sequence[int], sampling_params: dict[str, Any], rid: str) -> dict[str, Any]:
    """The body of a single-prompt, single-sample `/generate` request that returns log-probs."""
    return {"input_ids": list(prompt_ids), "sampling_params": {**sampling_params, "n": 1},
            "return_logprob": True, "rid": rid, "stream": False}


def response_to_sample(response: Any, *, prompt_ids: Sequence[int], group_index: int, sample_index: int) -> Sample:
    """A `Sample` from one SGLang output object; ValueError if it is not one."""
    if isinstance(response, list) and len(response) == 1:
        response = response[0]
    try:
        meta = response["meta_info"]
        token_logprobs = meta["output_token_logprobs"]
        reason = meta["finish_reason"]
        reason_type = reason["type"] if isinstance(reason, dict) else str(reason)
        response_ids = [int(entry[1]) for entry in token_logprobs]
        log_probs = [float(entry[0]) for entry in token_logprobs]
    except (KeyError, TypeError, IndexError) as err:
        raise ValueError(f"not an SGLang generate output with log-probs: {err!r}") from None
    output_ids = response.get("output_ids")
    if output_ids is not None and list(output_ids) != response_ids:
        raise ValueError("output_ids disagree with the token ids of output_token_logprobs")
    if reason_type not in ("stop", "length", "abort"):
        raise ValueError(f"unknown finish_reason {reason!r}")
    return Sample(group_index=group_index, sample_index=sample_index, prompt_ids=list(prompt_ids),
                  response_ids=response_ids, rollout_log_probs=log_probs, finish_reason=reason_type,
                  weight_version=str(meta.get("weight_version", "")), response_text=response.get("text", ""))


__all__ = [
    "DEFAULT_MAX_NEW_TOKENS", "GenerateRequest", "ParseContext", "SequenceRequest", "SequenceResult",
    "build_response", "generate_payload", "parse_generate", "response_to_sample",
]
