"""Run configuration: typed dataclasses, YAML loading, dotted overrides, validation.

A run is described by one `RunConfig` whose sections (`model`, `parallel`,
`rollout`, `algorithm`, `data`, `reward`, `train`, `checkpoint`, `logging`) are plain
keyword-only dataclasses. Every field is documented by the string literal
under it; `describe_fields()` reads those docstrings back for `megatron-gppo
config --reference` and the README.

Loading order: dataclass defaults < YAML file < `dotted.key=value` overrides.
Values are coerced to the field's annotated type; anything wrong raises
`ConfigError` (a `ValueError`) with one line naming the key, the bad value and
what is allowed.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import os
import tempfile
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A user error in the configuration: one line, names the key."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.detail = message
        super().__init__(f"config key '{key}': {message}")

    def under(self, section: str) -> "ConfigError":
        return ConfigError(f"{section}.{self.key}", self.detail)


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(key, f"got {value!r}, expected {allowed}")


# ----------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------


@dataclass(kw_only=True)
class ModelConfig:
    hf_path: str = ""
    """Hugging Face model directory (config.json, tokenizer, safetensors) the policy starts from."""

    megatron_checkpoint: str = ""
    """Optional Megatron checkpoint (from tools/convert_hf_to_megatron.py) to load instead of the HF weights."""

    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    """Parameter and activation dtype of the Megatron policy (optimizer state stays fp32)."""

    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recomputation: none, selective (core attention) or full (whole layers)."""


@dataclass(kw_only=True)
class ParallelConfig:
    tensor_parallel: int = 1
    """Tensor-parallel size (TP). Must divide the attention heads and query groups."""

    pipeline_parallel: int = 1
    """Pipeline-parallel size (PP). Must divide the layers unless a first/last stage split is given."""

    virtual_pipeline: int = 1
    """Virtual pipeline stages per pipeline rank (interleaved schedule); 1 disables it."""

    sequence_parallel: bool = False
    """Megatron sequence parallelism (only meaningful with tensor_parallel > 1)."""

    data_parallel: int = 0
    """Data-parallel size; 0 infers world_size / (TP x PP). Sets the process count of local CPU runs."""

    num_layers_in_first_stage: int = 0
    """Explicit layer count of the first pipeline stage; 0 splits evenly."""

    num_layers_in_last_stage: int = 0
    """Explicit layer count of the last pipeline stage; 0 splits evenly."""

    def __post_init__(self) -> None:
        for key in ("tensor_parallel", "pipeline_parallel", "virtual_pipeline"):
            value = getattr(self, key)
            _require(value >= 1, key, value, "an integer >= 1")
        for key in ("data_parallel", "num_layers_in_first_stage", "num_layers_in_last_stage"):
            value = getattr(self, key)
            _require(value >= 0, key, value, "an integer >= 0")
        if self.sequence_parallel and self.tensor_parallel == 1:
            raise ConfigError("sequence_parallel", "needs tensor_parallel > 1")


@dataclass(kw_only=True)
class RolloutConfig:
    backend: Literal["local", "sglang"] = "local"
    """`local`: the trainer starts `megatron-gppo serve` processes itself; `sglang`: use `server_urls` / `router_url`."""

    server_urls: list[str] = field(default_factory=list)
    """SGLang server base URLs (backend=sglang), e.g. http://node1:30000."""

    router_url: str = ""
    """sglang-router URL to send generation requests through (weights still go to every server)."""

    num_local_servers: int = 1
    """Number of `megatron-gppo serve` processes the local backend starts."""

    api_key: str = ""
    """Bearer token sent to the servers (and required by local servers when set)."""

    num_samples_per_prompt: int = 8
    """Responses sampled per prompt (the GRPO group size; the paper uses 8)."""

    temperature: float = 1.0
    """Sampling temperature; the policy log-probs use the same temperature."""

    top_p: float = 1.0
    """Nucleus sampling threshold in (0, 1]."""

    top_k: int = -1
    """Top-k sampling; -1 disables it."""

    max_new_tokens: int = 1024
    """Maximum response length in tokens."""

    max_concurrency: int = 64
    """Generation requests in flight at once across all servers."""

    request_timeout_s: float = 600.0
    """Timeout of one generation request."""

    max_retries: int = 3
    """Retries (with backoff) after connection errors and 5xx answers before a request fails."""

    weight_sync: Literal["distributed", "disk", "tensor"] = "distributed"
    """How new weights reach the servers: broadcast over a process group, a safetensors dump, or CUDA IPC (colocated GPU only)."""

    weight_sync_bucket_mb: int = 512
    """Size of one weight-sync bucket in MiB."""

    colocate: bool = False
    """The servers share the trainer's accelerators: their memory is released after each rollout and resumed before the weight sync (SGLang servers need --enable-memory-saver)."""

    weight_sync_address: str = ""
    """Trainer address the servers connect to for `distributed` weight sync; empty: 127.0.0.1 for local servers, this host's name otherwise. Set it on multi-NIC clusters."""

    weight_sync_port: int = 0
    """Port of the `distributed` weight-sync rendezvous on the trainer; 0 picks a free one."""

    def __post_init__(self) -> None:
        positive = ("num_local_servers", "num_samples_per_prompt", "max_new_tokens",
                    "max_concurrency", "weight_sync_bucket_mb")
        for key in positive:
            value = getattr(self, key)
            _require(value >= 1, key, value, "an integer >= 1")
        _require(self.temperature > 0, "temperature", self.temperature, "a number > 0")
        _require(0 < self.top_p <= 1, "top_p", self.top_p, "a number in (0, 1]")
        _require(self.top_k == -1 or self.top_k >= 1, "top_k", self.top_k, "-1 or an integer >= 1")
        _require(self.request_timeout_s > 0, "request_timeout_s", self.request_timeout_s, "a number > 0")
        _require(self.max_retries >= 0, "max_retries", self.max_retries, "an integer >= 0")
        _require(0 <= self.weight_sync_port < 65536, "weight_sync_port", self.weight_sync_port, "a port in [0, 65535]")
        if self.backend == "sglang" and not (self.server_urls or self.router_url):
            raise ConfigError("server_urls", "backend 'sglang' needs server_urls or router_url")
        for url in self.server_urls + ([self.router_url] if self.router_url else []):
            _require(url.startswith(("http://", "https://")), "server_urls", url, "URLs starting with http:// or https://")


@dataclass(kw_only=True)
class BetaScheduleConfig:
    kind: Literal["constant", "step", "linear", "entropy_target"] = "constant"
    """How beta1/beta2 evolve: constant, a switch at `switch_step`, a linear ramp, or an entropy-target controller."""

    switch_step: int = 0
    """step: the step at which (beta1_after, beta2_after) take over (the paper switches at 585)."""

    ramp_steps: int = 0
    """linear: steps over which betas move from (beta1, beta2) to (beta1_after, beta2_after)."""

    beta1_after: float = 0.5
    """step / linear: beta1 after the switch or at the end of the ramp."""

    beta2_after: float = 1.0
    """step / linear: beta2 after the switch or at the end of the ramp."""

    entropy_low: float = 0.0
    """entropy_target: lower edge of the entropy band (nats per token)."""

    entropy_high: float = 0.0
    """entropy_target: upper edge of the entropy band (nats per token)."""

    adjust_rate: float = 0.05
    """entropy_target: how much a beta moves per step while entropy is outside the band."""

    beta_min: float = 0.0
    """entropy_target: lower bound for both betas."""

    beta_max: float = 2.0
    """entropy_target: upper bound for both betas."""

    def __post_init__(self) -> None:
        for key in ("switch_step", "ramp_steps"):
            _require(getattr(self, key) >= 0, key, getattr(self, key), "an integer >= 0")
        for key in ("beta1_after", "beta2_after", "beta_min", "adjust_rate"):
            _require(getattr(self, key) >= 0, key, getattr(self, key), "a number >= 0")
        _require(self.beta_max >= self.beta_min, "beta_max", self.beta_max, f"a number >= beta_min ({self.beta_min})")
        if self.kind == "linear":
            _require(self.ramp_steps >= 1, "ramp_steps", self.ramp_steps, "an integer >= 1 for kind=linear")
        if self.kind == "entropy_target":
            _require(0 <= self.entropy_low < self.entropy_high, "entropy_high", self.entropy_high,
                     f"a number > entropy_low ({self.entropy_low}) for kind=entropy_target")


@dataclass(kw_only=True)
class AlgorithmConfig:
    loss: Literal["ce_gppo", "ppo", "grpo", "dapo", "cispo", "gspo"] = "ce_gppo"
    """Policy loss from the registry in megatron_gppo/algorithm/losses.py."""

    eps_low: float | None = None
    """Lower clip range: ratios below 1 - eps_low are clipped (CE-GPPO: they get the beta1 gradient). null: the loss's own default (0.2; gspo 3e-4)."""

    eps_high: float | None = None
    """Upper clip range: ratios above 1 + eps_high are clipped (CE-GPPO: they get the beta2 gradient). null: the loss's own default (0.2; dapo 0.28; gspo 4e-4)."""

    beta1: float = 0.5
    """CE-GPPO gradient scale for clipped negative-advantage, low-ratio tokens. Larger lowers entropy."""

    beta2: float = 1.0
    """CE-GPPO gradient scale for clipped positive-advantage, high-ratio tokens. Larger raises entropy."""

    beta_schedule: BetaScheduleConfig = field(default_factory=BetaScheduleConfig)
    """How beta1/beta2 change during training."""

    dual_clip_c: float | None = None
    """Dual-clip bound c > 1 for negative advantages (ce_gppo, ppo, grpo, dapo); null disables it."""

    nll_coef: float = 0.0
    """Coefficient of an NLL (SFT) term on positive-advantage tokens; 0 disables it."""

    entropy_coef: float = 0.0
    """Entropy-bonus coefficient; 0 disables it."""

    aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"] = "token_mean"
    """How per-token losses become one number; token_mean is exact over the global batch."""

    normalize_advantage_std: bool = True
    """Divide group-centred rewards by the group's standard deviation (GRPO)."""

    dynamic_sampling: bool = True
    """Drop groups whose rewards are all equal and sample more prompts to refill the batch (DAPO)."""

    max_refill_rounds: int = 3
    """Upper bound on extra rollout rounds dynamic sampling may spend refilling one batch."""

    tis_cap: float | None = None
    """Truncated importance-sampling cap for the train/rollout log-prob mismatch; null disables the correction."""

    def __post_init__(self) -> None:
        for key in ("eps_low", "eps_high"):
            value = getattr(self, key)
            _require(value is None or 0 <= value < 1, key, value, "null or a number in [0, 1)")
        for key in ("beta1", "beta2", "nll_coef", "entropy_coef"):
            value = getattr(self, key)
            _require(value >= 0, key, value, "a number >= 0")
        _require(self.dual_clip_c is None or self.dual_clip_c > 1, "dual_clip_c", self.dual_clip_c, "null (off) or a number > 1")
        _require(self.tis_cap is None or self.tis_cap >= 1, "tis_cap", self.tis_cap, "null (off) or a number >= 1")
        _require(self.max_refill_rounds >= 0, "max_refill_rounds", self.max_refill_rounds, "an integer >= 0")


@dataclass(kw_only=True)
class DataConfig:
    train_path: str = ""
    """Training prompts: a .jsonl, .parquet or local `datasets` directory."""

    eval_path: str = ""
    """Held-out prompts for avg@k / pass@k evaluation; empty disables evaluation."""

    prompt_key: str = "prompt"
    """Field holding the prompt text."""

    answer_key: str = "answer"
    """Field holding the reference answer the reward checks against."""

    response_key: str = "response"
    """SFT only (`megatron-gppo sft`): field holding the target response."""

    prompt_template: Literal["auto", "chat", "plain"] = "auto"
    """auto: the tokenizer's chat template when it has one, else plain text."""

    max_prompt_tokens: int = 1024
    """Prompts longer than this many tokens are skipped."""

    shuffle: bool = True
    """Shuffle prompts each epoch (seeded by train.seed)."""

    def __post_init__(self) -> None:
        _require(self.max_prompt_tokens >= 1, "max_prompt_tokens", self.max_prompt_tokens, "an integer >= 1")


@dataclass(kw_only=True)
class RewardConfig:
    format_penalty: float = 0.0
    """Reward of a response without a complete \\boxed{} answer is -format_penalty (correct: 1, wrong: 0)."""

    timeout_s: float = 5.0
    """Per-sample time limit of the math-verify check; a sample that exceeds it scores 0."""

    num_workers: int = 2
    """Processes that compute rewards in parallel; 0 computes them in the trainer process."""

    def __post_init__(self) -> None:
        _require(self.format_penalty >= 0, "format_penalty", self.format_penalty, "a number >= 0")
        _require(self.timeout_s > 0, "timeout_s", self.timeout_s, "a number > 0")
        _require(self.num_workers >= 0, "num_workers", self.num_workers, "an integer >= 0")


@dataclass(kw_only=True)
class TrainConfig:
    output_dir: str = "runs/default"
    """Run directory: metrics.jsonl, checkpoints/, plots/, the resolved config.yaml."""

    max_steps: int = 100
    """Number of RL steps (one rollout batch each)."""

    prompts_per_step: int = 32
    """Prompts per rollout batch (each sampled rollout.num_samples_per_prompt times)."""

    num_minibatches: int = 1
    """Optimizer steps per pass over a rollout batch."""

    num_epochs: int = 1
    """Passes over each rollout batch."""

    micro_batch_size: int = 8
    """Sequences per forward/backward micro-batch."""

    lr: float = 1e-6
    """Peak learning rate (the paper uses 1e-6)."""

    min_lr: float = 0.0
    """Learning rate at the end of the decay."""

    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    """Decay after warm-up."""

    warmup_steps: int = 0
    """Linear warm-up steps."""

    weight_decay: float = 0.0
    """AdamW weight decay."""

    adam_beta1: float = 0.9
    """Adam beta1 (not the CE-GPPO beta1)."""

    adam_beta2: float = 0.999
    """Adam beta2 (not the CE-GPPO beta2)."""

    adam_eps: float = 1e-8
    """Adam epsilon."""

    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables it."""

    distributed_optimizer: bool = False
    """Shard optimizer state across data-parallel ranks (megatron distributed optimizer)."""

    seed: int = 1234
    """Seed of model init, data order and sampling."""

    eval_every: int = 0
    """Evaluate every N steps (and at the end); 0 evaluates only at the end."""

    eval_samples_per_prompt: int = 8
    """k of avg@k / pass@k (the paper reports avg@32)."""

    eval_temperature: float = 1.0
    """Sampling temperature during evaluation."""

    stop_file: str = "PREEMPT"
    """Once this file exists (relative paths are in output_dir) the run checkpoints and exits 0 at the next step boundary; the Slurm launchers create it when Slurm signals the job, and requeue it."""

    deadline_minutes: float = 0.0
    """Wall-clock budget of one run attempt: checkpoint, create `stop_file` and exit 0 before the next step would overrun it (0: none). For clusters that send no signal before the time limit."""

    def __post_init__(self) -> None:
        positive = ("max_steps", "prompts_per_step", "num_minibatches", "num_epochs",
                    "micro_batch_size", "eval_samples_per_prompt")
        for key in positive:
            _require(getattr(self, key) >= 1, key, getattr(self, key), "an integer >= 1")
        _require(self.lr > 0, "lr", self.lr, "a number > 0")
        _require(0 <= self.min_lr <= self.lr, "min_lr", self.min_lr, f"a number in [0, lr={self.lr}]")
        for key in ("warmup_steps", "eval_every"):
            _require(getattr(self, key) >= 0, key, getattr(self, key), "an integer >= 0")
        for key in ("adam_beta1", "adam_beta2"):
            _require(0 <= getattr(self, key) < 1, key, getattr(self, key), "a number in [0, 1)")
        for key in ("weight_decay", "grad_clip"):
            _require(getattr(self, key) >= 0, key, getattr(self, key), "a number >= 0")
        _require(self.adam_eps > 0, "adam_eps", self.adam_eps, "a number > 0")
        _require(self.eval_temperature > 0, "eval_temperature", self.eval_temperature, "a number > 0")
        _require(self.deadline_minutes >= 0, "deadline_minutes", self.deadline_minutes, "a number >= 0")
        _require(bool(self.stop_file), "stop_file", self.stop_file, "a non-empty path")
        _require(bool(self.output_dir), "output_dir", self.output_dir, "a non-empty path")


@dataclass(kw_only=True)
class CheckpointConfig:
    save_every: int = 50
    """Save a training checkpoint every N steps (and at the end); 0 saves only at the end."""

    keep_last: int = 2
    """Complete checkpoints to keep; older ones are deleted."""

    resume: bool = True
    """Resume from the latest complete checkpoint in train.output_dir when one exists."""

    def __post_init__(self) -> None:
        _require(self.save_every >= 0, "save_every", self.save_every, "an integer >= 0")
        _require(self.keep_last >= 1, "keep_last", self.keep_last, "an integer >= 1")


@dataclass(kw_only=True)
class LoggingConfig:
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    """wandb mode; offline writes under the run directory and needs no account."""

    wandb_project: str = "megatron-gppo"
    """wandb project name."""

    run_name: str = ""
    """Run name for wandb and the summary; empty uses the output directory's name."""

    progress: bool = True
    """Show a live progress display (step, reward, entropy, ETA)."""

    plots: bool = True
    """Write PNG plots of reward, eval score, entropy, clip fractions, betas and response length to plots/."""


@dataclass(kw_only=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy model."""

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Tensor / pipeline / data parallel layout."""

    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Rollout servers and sampling."""

    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    """Policy loss, advantages and beta schedule."""

    data: DataConfig = field(default_factory=DataConfig)
    """Prompt datasets."""

    reward: RewardConfig = field(default_factory=RewardConfig)
    """How responses are scored."""

    train: TrainConfig = field(default_factory=TrainConfig)
    """Steps, batch sizes and optimizer."""

    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Training checkpoints and resume."""

    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics, wandb, progress and plots."""


# ----------------------------------------------------------------------------
# Building a config from nested dicts, coercing values to the annotated types
# ----------------------------------------------------------------------------


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _optional_of(tp: Any) -> Any:
    """X for `X | None`, else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return None


def _describe_type(tp: Any) -> str:
    inner = _optional_of(tp)
    if inner is not None:
        return f"null or {_describe_type(inner)}"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_describe_type(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to type `tp`, or raise ConfigError naming `key`."""
    inner = _optional_of(tp)
    if inner is not None:
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        try:
            return _coerce(value, inner, key)
        except ConfigError:
            raise ConfigError(key, f"got {value!r}, expected {_describe_type(tp)}") from None
    origin = typing.get_origin(tp)
    bad = ConfigError(key, f"got {value!r}, expected {_describe_type(tp)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            suffix = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(key, f"got {value!r}, expected {_describe_type(tp)}{suffix}")
        return value
    if origin is list:
        if isinstance(value, str):  # from the command line: a,b,c
            value = [v for v in value.split(",") if v] if value else []
        if not isinstance(value, (list, tuple)):
            raise bad
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise bad from None
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if value is None:
            return ""
        raise bad
    raise AssertionError(f"unsupported config field type {tp!r} for {key}")


def _unknown_key(key: str, name: str, known: list[str]) -> ConfigError:
    parent = key.rpartition(".")[0]
    hint = difflib.get_close_matches(name, known, n=1)
    if hint:
        suffix = f"; did you mean '{parent + '.' if parent else ''}{hint[0]}'?"
    else:
        suffix = f"; known keys{' in ' + parent if parent else ''}: {', '.join(known)}"
    return ConfigError(key, f"unknown key{suffix}")


def from_dict(cls: type, data: dict[str, Any], *, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, coercing and validating every value."""
    if not isinstance(data, dict):
        raise ConfigError(prefix.rstrip(".") or "<root>", f"got {data!r}, expected a mapping")
    types_by_name = _field_types(cls)
    kwargs = {}
    for name, value in data.items():
        key = prefix + str(name)
        if name not in types_by_name:
            raise _unknown_key(key, str(name), list(types_by_name))
        tp = types_by_name[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value if value is not None else {}, prefix=key + ".")
        else:
            kwargs[name] = _coerce(value, tp, key)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise (err.under(prefix.rstrip(".")) if prefix else err) from None


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


# ----------------------------------------------------------------------------
# Files and overrides
# ----------------------------------------------------------------------------


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set tree[a][b][c] = value for dotted 'a.b.c', checking names against RunConfig."""
    parts = dotted.split(".")
    cls: Any = RunConfig
    node = tree
    for depth, name in enumerate(parts):
        key = ".".join(parts[: depth + 1])
        types_by_name = _field_types(cls)
        if name not in types_by_name:
            raise _unknown_key(key, name, list(types_by_name))
        tp = types_by_name[name]
        last = depth == len(parts) - 1
        if dataclasses.is_dataclass(tp):
            if last:
                raise ConfigError(key, "is a section; set one of its keys, e.g. " + f"{key}.{next(iter(_field_types(tp)))}=...")
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise ConfigError(key, f"got {node!r}, expected a mapping")
            cls = tp
        elif not last:
            raise ConfigError(key, f"is not a section, so '{dotted}' does not exist")
        else:
            node[name] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Split `dotted.key=value`; the value is parsed as YAML so `[a, b]` and `null` work."""
    if "=" not in text:
        raise ConfigError(text, "override must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> RunConfig:
    """Defaults < YAML at `path` < `dotted.key=value` overrides; validated."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ValueError(f"{path}: not valid YAML{where}") from None
        if not isinstance(tree, dict):
            raise ValueError(f"{path}: expected a mapping of sections at the top level")
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    return from_dict(RunConfig, tree)


def save_config(config: RunConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML atomically (temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        yaml.safe_dump(to_dict(config), tmp, sort_keys=False)
    os.replace(tmp.name, path)


# ----------------------------------------------------------------------------
# Field documentation, read from the docstrings under each field
# ----------------------------------------------------------------------------


def _field_docs(cls: type) -> dict[str, str]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for stmt, following in zip(body, body[1:]):
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            if isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant):
                docs[stmt.target.id] = " ".join(str(following.value.value).split())
    return docs


def describe_fields(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted key, type description, default, doc) for every leaf field, in declaration order."""
    rows = []
    docs = _field_docs(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        tp = _field_types(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            rows += describe_fields(tp, prefix + f.name + ".")
        else:
            rows.append((prefix + f.name, _describe_type(tp), getattr(defaults, f.name), docs.get(f.name, "")))
    return rows


__all__ = [
    "AlgorithmConfig", "BetaScheduleConfig", "CheckpointConfig", "ConfigError", "DataConfig",
    "LoggingConfig", "ModelConfig", "ParallelConfig", "RewardConfig", "RolloutConfig", "RunConfig", "TrainConfig",
    "describe_fields", "from_dict", "load_config", "parse_override", "save_config", "to_dict",
]
