"""SGLang's HTTP request bodies as pydantic models, field for field.

Each model mirrors one request class of SGLang 0.5.23 (`pip download
--no-deps sglang==0.5.23`): `GenerateReqInput` and the control requests of
`sglang/srt/managers/io_struct.py`, and the API fields of `SamplingParams`
in `sglang/srt/sampling/sampling_params.py`: same names, same defaults
(`tests/unit/test_sglang_requests.py` compares them with the released wheel).
`serve` validates what it receives with them, and the client builds what it
sends with them, so both ends speak one schema.

What SGLang does and this CPU server does not (images, LoRA, grammars,
penalties, ...) is declared too, so a request that uses it is refused with
a clear message instead of being silently half-served: such fields must keep
their default (`unsupported_fields`). Values are checked strictly (no `"3"`
for 3, no `"yes"` for true), as the JSON an SGLang client sends is typed.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, model_validator

# SGLang's default for a request that does not say how long to generate.
DEFAULT_MAX_NEW_TOKENS = 128


def check_top_k(top_k: int) -> int:
    """SGLang's rule for top_k; raises with what it allows."""
    if not (top_k == -1 or top_k >= 1):
        raise ValueError("-1 (disable) or at least 1")
    return top_k


def _token_ids(value: Any) -> Any:
    """SGLang checks `input_ids` with its own validator; so do we, with messages that say what is wrong."""
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise ValueError("'input_ids' must be a non-empty list of token ids or of lists of token ids")
    prompts = value if isinstance(value[0], list) else [value]
    if not all(isinstance(p, list) and all(type(t) is int for t in p) for p in prompts):
        raise ValueError("'input_ids' must hold integers (a list, or a list of lists for a batch)")
    return value


class _Request(BaseModel):
    """A JSON body: typed strictly; unknown fields are ignored, as SGLang's HTTP layer does."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


def unsupported_fields(request: BaseModel, names: tuple[str, ...]) -> list[str]:
    """Which of `names` hold something other than their default."""
    fields = type(request).model_fields
    return [name for name in names if getattr(request, name) != fields[name].get_default(call_default_factory=True)]


class SamplingParams(_Request):
    """`sampling_params` of a generate request; null means the default, as in SGLang."""

    model_config = ConfigDict(extra="forbid")  # SGLang builds SamplingParams(**params): unknown keys fail there

    max_new_tokens: int | None = DEFAULT_MAX_NEW_TOKENS
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    stop_regex: str | list[str] | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0
    n: int = 1
    beam_width: int | None = None
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    structural_tag: str | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    stream_interval: int | None = None
    logit_bias: dict[str, float] | None = None
    sampling_seed: int | None = None
    custom_params: dict[str, Any] | None = None
    watermark: Any = None

    # Accepted at their defaults only (`spaces_between_special_tokens` and
    # `stream_interval` shape text and streaming, and are ignored here).
    UNSUPPORTED: ClassVar[tuple[str, ...]] = (
        "stop_regex", "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "beam_width",
        "json_schema", "regex", "ebnf", "structural_tag", "logit_bias", "custom_params", "watermark")

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        return {key: value for key, value in data.items()
                if value is not None or key not in cls.model_fields or cls.model_fields[key].default is None}

    @model_validator(mode="after")
    def verify(self) -> SamplingParams:
        """SGLang's `SamplingParams.verify`, plus what this server does not implement."""
        for name in unsupported_fields(self, self.UNSUPPORTED):
            raise ValueError(f"sampling_params.{name}={getattr(self, name)!r} is not supported by this server")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        try:
            check_top_k(self.top_k)
        except ValueError as err:
            raise ValueError(f"top_k must be {err}, got {self.top_k}") from None
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.max_new_tokens is not None and self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be at least 0, got {self.max_new_tokens}")
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if not all(stops):
            raise ValueError(f"stop must be a string or a list of non-empty strings, got {self.stop!r}")
        return self

    @property
    def stop_strs(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class GenerateReqInput(_Request):
    """The body of `/generate`. A list in a per-prompt field holds one entry per prompt of a batch."""

    rid: str | list[str] | None = None
    session_id: str | None = None
    text: str | list[str] | None = None
    input_ids: Annotated[list[int] | list[list[int]] | None, BeforeValidator(_token_ids)] = None
    input_embeds: Any = None
    image_data: Any = None
    video_data: Any = None
    audio_data: Any = None
    mm_hashes: Any = None
    mm_content_hashes: Any = None
    use_audio_in_video: bool = False
    video_config: dict[str, Any] | None = None
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    watermark: Any = None
    return_logprob: bool | list[bool] | None = None
    logprob_start_len: int | list[int] | None = None
    top_logprobs_num: int | list[int] | None = None
    token_ids_logprob: Any = None
    return_sampling_mask: bool | list[bool] | None = None
    sampling_logprobs_mode: Any = None
    return_text_in_logprobs: bool = False
    return_flat_raw_top_logprobs: bool = False
    return_flat_raw_output_top_logprobs: bool = False
    return_flat_raw_top_logprobs_b64: bool = False
    stream: bool = False
    log_metrics: bool = True
    return_hidden_states: Any = False
    return_routed_experts: bool = False
    routed_experts_start_len: int = 0
    return_indexer_topk: bool = False
    modalities: list[str] | None = None
    session_params: dict[str, Any] | None = None
    lora_path: Any = None
    lora_id: Any = None
    custom_logit_processor: Any = None
    positional_embed_overrides: Any = None
    bootstrap_host: Any = None
    bootstrap_port: Any = None
    bootstrap_room: Any = None
    bootstrap_pair_key: Any = None
    decode_tp_size: Any = None
    routed_dp_rank: int | None = None
    data_parallel_rank: int | None = None
    disagg_prefill_dp_rank: int | None = None
    routing_key: str | None = None
    conversation_id: str | None = None
    http_worker_ipc: str | None = None
    background: bool = False
    require_reasoning: bool = False
    max_thinking_tokens: int | None = None
    priority: int | None = None
    extra_key: str | list[str] | None = None
    no_logs: bool = False
    custom_labels: dict[str, str] | None = None
    return_bytes: bool = False
    return_entropy: bool = False
    return_prompt_token_ids: bool = False
    external_trace_header: dict[str, Any] | None = None
    received_time: float | None = None
    need_wait_for_mm_inputs: bool | None = None
    num_items_assigned: Any = None
    encoder_urls: list[str] | None = None
    max_dynamic_patch: int | None = None
    min_dynamic_patch: int | None = None
    image_max_dynamic_patch: int | None = None
    video_max_dynamic_patch: int | None = None
    images_config: dict[str, Any] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    multi_item_delimiter_indices: Any = None
    token_indices_to_pool: Any = None
    cache_salt: str | list[str] | None = None
    kv_hints: Any = None

    # Features of SGLang this server does not have; routing, logging and
    # disaggregation hints are accepted and ignored.
    UNSUPPORTED: ClassVar[tuple[str, ...]] = (
        "input_embeds", "image_data", "video_data", "audio_data", "mm_hashes", "mm_content_hashes",
        "use_audio_in_video", "video_config", "watermark", "token_ids_logprob", "return_sampling_mask",
        "sampling_logprobs_mode", "return_flat_raw_top_logprobs", "return_flat_raw_output_top_logprobs",
        "return_flat_raw_top_logprobs_b64", "return_hidden_states", "return_routed_experts", "return_indexer_topk",
        "session_params", "lora_path", "lora_id", "custom_logit_processor", "positional_embed_overrides",
        "require_reasoning", "max_thinking_tokens", "return_entropy", "return_prompt_token_ids", "max_dynamic_patch",
        "min_dynamic_patch", "image_max_dynamic_patch", "video_max_dynamic_patch", "images_config",
        "mm_processor_kwargs", "multi_item_delimiter_indices", "token_indices_to_pool")


# ----------------------------------------------------------------------------
# Control requests (SGLang's `BaseReq` subclasses carry `rid` and `http_worker_ipc`)
# ----------------------------------------------------------------------------


class _BaseReq(_Request):
    rid: str | None = None
    http_worker_ipc: str | None = None


class AbortReq(_BaseReq):
    abort_all: bool = False
    finished_reason: dict[str, Any] | None = None
    abort_message: str | None = None
    weight_versions: Any = None


class PauseGenerationReqInput(_BaseReq):
    mode: Literal["abort", "retract", "in_place"] = "abort"


class ContinueGenerationReqInput(_BaseReq):
    torch_empty_cache: bool = True


class ReleaseMemoryOccupationReqInput(_BaseReq):
    tags: list[str] | None = None


class ResumeMemoryOccupationReqInput(_BaseReq):
    tags: list[str] | None = None


class UpdateWeightFromDiskReqInput(_BaseReq):
    model_path: str
    load_format: str | None = None
    abort_all_requests: bool = False
    weight_version: str | None = None
    is_async: bool = False
    torch_empty_cache: bool = False
    keep_pause: bool = False
    recapture_cuda_graph: bool = False
    token_step: int = 0
    flush_cache: bool = True
    manifest: dict[str, Any] | None = None


class InitWeightsUpdateGroupReqInput(_BaseReq):
    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    group_name: str = "weight_update_group"
    backend: str = "nccl"


class UpdateWeightsFromDistributedReqInput(_BaseReq):
    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]
    group_name: str = "weight_update_group"
    flush_cache: bool = True
    abort_all_requests: bool = False
    weight_version: str | None = None
    load_format: str | None = None
    selector: Literal["target", "draft", "all"] = "all"
    torch_empty_cache: bool = False


class UpdateWeightsFromTensorReqInput(_BaseReq):
    serialized_named_tensors: list[str]
    """Base64 strings over HTTP (SGLang decodes them to bytes), one per tensor-parallel rank."""
    load_format: str | None = None
    flush_cache: bool = True
    abort_all_requests: bool = False
    weight_version: str | None = None
    selector: Literal["target", "draft", "all"] = "all"
    torch_empty_cache: bool = False


class DestroyWeightsUpdateGroupReqInput(_BaseReq):
    group_name: str = "weight_update_group"


class BeginWeightUpdateReqInput(_BaseReq):
    """Opens a weight-update session (SGLang >= 0.5.21): tensor and distributed updates are refused outside one."""
    selector: Literal["target", "draft", "all"] = "all"


class EndWeightUpdateReqInput(_BaseReq):
    """Closes the session `BeginWeightUpdateReqInput` opened."""


class UpdateWeightVersionReqInput(_BaseReq):
    new_version: str
    abort_all_requests: bool = True


def body(request: BaseModel) -> dict[str, Any]:
    """The JSON body a client sends for `request`: the fields it set (SGLang fills in the rest)."""
    return request.model_dump(exclude_unset=True)


__all__ = [
    "AbortReq", "BeginWeightUpdateReqInput", "ContinueGenerationReqInput", "DEFAULT_MAX_NEW_TOKENS", "DestroyWeightsUpdateGroupReqInput",
    "EndWeightUpdateReqInput", "GenerateReqInput", "InitWeightsUpdateGroupReqInput", "PauseGenerationReqInput",
    "ReleaseMemoryOccupationReqInput", "ResumeMemoryOccupationReqInput", "SamplingParams",
    "UpdateWeightFromDiskReqInput", "UpdateWeightVersionReqInput", "UpdateWeightsFromDistributedReqInput",
    "UpdateWeightsFromTensorReqInput", "body", "check_top_k", "unsupported_fields",
]
