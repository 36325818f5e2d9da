"""The SGLang `/generate` wire format, in one place for the server and the client.

Requests are validated with the models of `sglang_requests.py` (SGLang's
`GenerateReqInput` and `SamplingParams`, field for field) and expanded into
one `SequenceRequest` per (prompt, sample). Answers carry the `meta_info`
SGLang's tokenizer manager builds for every output:
`id`, `finish_reason` (`{"type": "stop", "matched": token_id_or_str}`,
`{"type": "length", "length": n}`, `{"type": "abort", "message": ...}`),
`prompt_tokens`, `completion_tokens`, `cached_tokens`, `weight_version`,
`weight_versions` (`[{"version", "start", "end"}, ...]` over output tokens),
`output_token_logprobs` (`[[logprob, token_id, text_or_null], ...]`).

A request with a batch of prompts, or with `n > 1`, answers a list with one
entry per (prompt, sample), prompt-major; otherwise a single object.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Sequence, TypeVar

from pydantic import BaseModel, ValidationError

from megatron_gppo.rollout.sglang_requests import GenerateReqInput, SamplingParams, body, unsupported_fields
from megatron_gppo.types import Sample
from megatron_gppo.validation import describe_field, locate

RequestModel = TypeVar("RequestModel", bound=BaseModel)


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


def request_error(error: ValidationError, model: type[BaseModel], *, prefix: str = "") -> str:
    """A request model's first problem as one line: `sampling_params.n must be an integer, got 1.5`."""
    problems = error.errors()
    unknown = [str(p["loc"][-1]) for p in problems if p["type"] == "extra_forbidden"]
    if unknown:
        return f"unknown {prefix.rstrip('.') or 'fields'}: {', '.join(unknown)}"
    problem = problems[0]
    cause = (problem.get("ctx") or {}).get("error")
    if isinstance(cause, ValueError):  # a check that words the whole problem
        return str(cause)
    where = locate(model, problem["loc"])
    key = prefix + ".".join(where.names)
    if where.field is None:
        return f"{key or 'the request'}: {problem['msg']}"
    if problem["type"] == "missing":
        return f"missing required field '{key}'"
    # Null means "the default" in SGLang's requests: not worth saying.
    expected = describe_field(where.field, with_bound=False, with_null=False, finite=True)
    return f"{key} must be {expected}, got {problem['input']!r}"


def validate(model: type[RequestModel], body: Any, *, prefix: str = "") -> RequestModel:
    """`model` from a JSON body; ValueError with one line on bad input."""
    if not isinstance(body, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'the request body'} must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as error:
        raise ValueError(request_error(error, model, prefix=prefix)) from None


def _per_item(value: Any, num_items: int, name: str, is_batch: bool) -> list[Any]:
    """Broadcast a scalar field over the batch, or check a per-item list's length."""
    if is_batch and isinstance(value, list):
        if len(value) != num_items:
            raise ValueError(f"'{name}' has {len(value)} entries for a batch of {num_items}")
        return value
    return [value] * num_items


def _prompts(request: GenerateReqInput, ctx: ParseContext) -> tuple[list[list[int]], bool]:
    """Token ids of every prompt and whether the request is a batch."""
    if (request.text is None) == (request.input_ids is None):
        raise ValueError("give exactly one of 'text' or 'input_ids'")
    if request.text is not None:
        if ctx.tokenizer is None:
            raise ValueError("'text' needs a tokenizer, and the model directory has none; send 'input_ids'")
        is_batch = isinstance(request.text, list)
        prompts = [ctx.tokenizer.encode(t) for t in (request.text if is_batch else [request.text])]
    else:
        is_batch = isinstance(request.input_ids[0], list)
        prompts = request.input_ids if is_batch else [request.input_ids]
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
    request = validate(GenerateReqInput, body)
    for name in unsupported_fields(request, GenerateReqInput.UNSUPPORTED):
        raise ValueError(f"'{name}' is not supported by this server")
    prompts, is_batch = _prompts(request, ctx)
    num = len(prompts)
    params_list = _per_item(request.sampling_params, num, "sampling_params", is_batch)
    return_logprob = _per_item(request.return_logprob, num, "return_logprob", is_batch)
    top_logprobs_num = _per_item(request.top_logprobs_num, num, "top_logprobs_num", is_batch)
    rids = request.rid
    if is_batch and isinstance(rids, list):
        rids = _per_item(rids, num, "rid", is_batch)
    base_rid = rids if isinstance(rids, str) else uuid.uuid4().hex

    sequences: list[SequenceRequest] = []
    returns_list = is_batch
    for i, prompt in enumerate(prompts):
        params = validate(SamplingParams, params_list[i] or {}, prefix="sampling_params.")
        returns_list = returns_list or params.n > 1
        if params.stop and ctx.tokenizer is None:
            raise ValueError("stop strings need a tokenizer, and the model directory has none")
        if len(prompt) + params.max_new_tokens > ctx.context_length:
            raise ValueError(f"prompt {i} has {len(prompt)} tokens and max_new_tokens={params.max_new_tokens}: "
                             f"more than the model's context length {ctx.context_length}")
        num_top = top_logprobs_num[i] or 0
        if num_top < 0:
            raise ValueError(f"top_logprobs_num must be an integer >= 0, got {num_top!r}")
        item_rid = rids[i] if isinstance(rids, list) else (base_rid if not is_batch else f"{base_rid}_{i}")
        # SGLang's normalisation: greedy is temperature 1 with top_k 1.
        greedy = params.temperature < 1e-6
        for j in range(params.n):
            sequences.append(SequenceRequest(
                rid=item_rid if params.n == 1 else f"{item_rid}_{j}", prompt_ids=list(prompt),
                max_new_tokens=params.max_new_tokens, temperature=1.0 if greedy else params.temperature,
                top_p=params.top_p, top_k=1 if greedy else params.top_k, min_p=params.min_p,
                stop_token_ids=frozenset(params.stop_token_ids or ()), stop_strs=params.stop_strs,
                ignore_eos=params.ignore_eos, no_stop_trim=params.no_stop_trim,
                skip_special_tokens=params.skip_special_tokens, return_logprob=bool(return_logprob[i]),
                top_logprobs_num=num_top, return_text_in_logprobs=request.return_text_in_logprobs,
                sampling_seed=None if params.sampling_seed is None else params.sampling_seed + j))
    return GenerateRequest(sequences=sequences, returns_list=returns_list, stream=request.stream)


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
        # Which weights produced which output tokens ([start, end) spans, SGLang >= 0.5.20). Here always one:
        # this server refuses weight updates while a request runs.
        "weight_versions": [{"version": result.weight_version, "start": 0, "end": len(result.output_ids)}],
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
    return body(GenerateReqInput(input_ids=list(prompt_ids), sampling_params={**sampling_params, "n": 1},
                                 return_logprob=True, rid=rid, stream=False))


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
    version = str(meta.get("weight_version", ""))
    # SGLang < 0.5.20 reports only the last version: then one span covers the response.
    spans = [{"version": str(span["version"]), "start": int(span["start"]), "end": int(span["end"])}
             for span in meta.get("weight_versions") or [{"version": version, "start": 0, "end": len(response_ids)}]]
    return Sample(group_index=group_index, sample_index=sample_index, prompt_ids=list(prompt_ids),
                  response_ids=response_ids, rollout_log_probs=log_probs, finish_reason=reason_type,
                  weight_version=version, weight_versions=spans, response_text=response.get("text", ""))


__all__ = [
    "GenerateRequest", "ParseContext", "SequenceRequest", "SequenceResult",
    "build_response", "generate_payload", "parse_generate", "request_error", "response_to_sample", "validate",
]
