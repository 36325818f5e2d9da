"""Run configuration: typed sections, YAML loading, dotted overrides, one-line errors.

A run is described by one `RunConfig` whose sections (`model`, `parallel`,
`rollout`, `algorithm`, `data`, `reward`, `train`, `checkpoint`, `logging`)
are pydantic models. Each field states its type, default and allowed range
once, on its own line, and is documented by the string literal under it;
`describe_fields()` reads those back for `megatron-gppo config --reference`
and the README. The policy-loss hyperparameters take their defaults and ranges
from the loss registry (`algorithm/losses.py`), the choices of `algorithm.loss`
and `algorithm.beta_schedule.kind` from their registries.

Loading order: defaults < YAML file < `dotted.key=value` overrides. pydantic
coerces each value to its field's type (`"3"` -> 3, `yes` -> true) and checks
it; the first problem becomes a `ConfigError` (a `ValueError`) with one line
naming the key, the bad value and what is allowed, with a "did you mean" for
misspelt keys and choices.

Why pydantic v2 rather than OmegaConf structured configs: ranges (`ge=1`) and
`Literal` choices are checked by the library, field docstrings become field
descriptions, and the same library validates the SGLang requests `serve`
answers (rollout/protocol.py). OmegaConf would give dotted overrides but no
range or `Literal` checks, so those would stay hand-written.
"""

from __future__ import annotations

import difflib
import os
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, SecretStr, model_validator

from megatron_gppo.algorithm.losses import AGGREGATIONS, HPARAM_BOUNDS, RL_LOSSES, hparam_default
from megatron_gppo.algorithm.schedules import BETA_SCHEDULES, EntropyTargetController
from megatron_gppo.atomic import write_text_atomic
from megatron_gppo.rollout.sglang_requests import check_top_k
from megatron_gppo.validation import BOUND_ERRORS, describe_field, locate


# algorithm.tis_cap when rollout.mode=async and the config does not set it.
ASYNC_TIS_CAP = 2.0


class ConfigError(ValueError):
    """A user error in the configuration: one line, names the key."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.detail = message
        super().__init__(f"config key '{key}': {message}")


class Section(BaseModel):
    """A config section: unknown keys are errors; the docstring under a field is its description."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, coerce_numbers_to_str=True)


def _loss_hparam(key: str, *, default: Any, null: str = "") -> Any:
    """A field with the range the policy-loss registry gives hyperparameter `key`."""
    return Field(default, json_schema_extra={"null": null} if null else None, **HPARAM_BOUNDS[key].limits())


def _split_commas(value: Any) -> Any:
    """`a,b,c` from the command line is a list."""
    return [item for item in value.split(",") if item] if isinstance(value, str) else value


CommaList = Annotated[list[str], BeforeValidator(_split_commas)]


# ----------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------


class ModelConfig(Section):
    hf_path: str = ""
    """Hugging Face model directory (config.json, tokenizer, safetensors) the policy starts from."""

    megatron_checkpoint: str = ""
    """Optional Megatron checkpoint (from tools/convert_hf_to_megatron.py) to load instead of the HF weights."""

    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    """Parameter and activation dtype of the Megatron policy (optimizer state stays fp32)."""

    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recomputation: none, selective (core attention) or full (whole layers)."""


class ParallelConfig(Section):
    tensor_parallel: int = Field(1, ge=1)
    """Tensor-parallel size (TP). Must divide the attention heads and query groups."""

    pipeline_parallel: int = Field(1, ge=1)
    """Pipeline-parallel size (PP). Must divide the layers unless a first/last stage split is given."""

    virtual_pipeline: int = Field(1, ge=1)
    """Virtual pipeline stages per pipeline rank (interleaved schedule); 1 disables it."""

    sequence_parallel: bool = False
    """Megatron sequence parallelism (only meaningful with tensor_parallel > 1)."""

    data_parallel: int = Field(0, ge=0)
    """Data-parallel size; 0 infers world_size / (TP x PP). Sets the process count of local CPU runs."""

    num_layers_in_first_stage: int = Field(0, ge=0)
    """Explicit layer count of the first pipeline stage; 0 splits evenly."""

    num_layers_in_last_stage: int = Field(0, ge=0)
    """Explicit layer count of the last pipeline stage; 0 splits evenly."""

    @model_validator(mode="after")
    def _check(self) -> ParallelConfig:
        if self.sequence_parallel and self.tensor_parallel == 1:
            raise ConfigError("sequence_parallel", "needs tensor_parallel > 1")
        return self


class RolloutConfig(Section):
    backend: Literal["local", "sglang"] = "local"
    """`local`: the trainer starts `megatron-gppo serve` processes itself; `sglang`: use `server_urls` / `router_url`."""

    server_urls: CommaList = []
    """SGLang server base URLs (backend=sglang), e.g. http://node1:30000."""

    router_url: str = ""
    """sglang-router URL to send generation requests through (weights still go to every server)."""

    num_local_servers: int = Field(1, ge=1)
    """Number of `megatron-gppo serve` processes the local backend starts."""

    mode: Literal["sync", "async"] = "sync"
    """sync: generate, then train, then sync the weights, one after the other. async: the next step's rollouts are generated (from the weights before this step's update) while this step trains, so servers and trainer work at once; samples are then one policy version old, which the loss corrects (algorithm.tis_cap, on by default here)."""

    partial: bool = False
    """async: at each weight sync, abort the rollouts still being generated and continue them on the new weights (each token keeps the version that produced it) instead of waiting for them to finish."""

    max_staleness: int = Field(1, ge=0)
    """async: policy versions a trained sample may lag behind the policy that trains on it (checked per sample; a batch with an older sample is regenerated). 0 makes async equal sync; the producer runs one batch ahead, so 1 is the most the schedule produces."""

    api_key: SecretStr = SecretStr("")
    """Bearer token sent to the servers (and required by local servers when set); written as '**********' wherever the config is saved or logged."""

    num_samples_per_prompt: int = Field(8, ge=1)
    """Responses sampled per prompt (the GRPO group size; the paper uses 8)."""

    temperature: float = Field(1.0, gt=0)
    """Sampling temperature; the policy log-probs use the same temperature."""

    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling threshold."""

    top_k: Annotated[int, AfterValidator(check_top_k)] = -1
    """Top-k sampling; -1 disables it."""

    max_new_tokens: int = Field(1024, ge=1)
    """Maximum response length in tokens."""

    max_concurrency: int = Field(64, ge=1)
    """Generation requests in flight at once across all servers."""

    request_timeout_s: float = Field(600.0, gt=0)
    """Timeout of one generation request."""

    max_retries: int = Field(3, ge=0)
    """Retries (with backoff) after connection errors and 5xx answers before a request fails."""

    weight_sync: Literal["distributed", "disk", "tensor"] = "distributed"
    """How new weights reach the servers: broadcast over a process group, a safetensors dump, or shared memory (`tensor`: CUDA IPC on GPUs, shared CPU memory otherwise; colocated servers only, and what they need)."""

    weight_sync_bucket_mb: int = Field(512, ge=1)
    """Size of one weight-sync bucket in MiB."""

    colocate: bool = False
    """The servers share the trainer's accelerators: their memory is released after each rollout and resumed before the weight sync (SGLang servers need --enable-memory-saver). Needs weight_sync=tensor."""

    record_requests: bool = False
    """Local servers log every request they receive (method, path, JSON body) to server_logs/requests-<i>.jsonl in the run's rollout directory: what the trainer sends, to debug the protocol."""

    weight_sync_address: str = ""
    """Trainer address the servers connect to for `distributed` weight sync; empty: 127.0.0.1 for local servers, this host's name otherwise. Set it on multi-NIC clusters."""

    weight_sync_port: int = Field(0, ge=0, le=65535)
    """Port of the `distributed` weight-sync rendezvous on the trainer; 0 picks a free one."""

    @model_validator(mode="after")
    def _check(self) -> RolloutConfig:
        if self.backend == "sglang" and not (self.server_urls or self.router_url):
            raise ConfigError("server_urls", "backend 'sglang' needs server_urls or router_url")
        for url in self.server_urls + ([self.router_url] if self.router_url else []):
            if not url.startswith(("http://", "https://")):
                raise ConfigError("server_urls", f"got {url!r}, expected URLs starting with http:// or https://")
        if self.partial and not (self.mode == "async" and self.max_staleness > 0):
            raise ConfigError("partial", "partial rollouts continue the next step's rollouts across a weight sync, "
                                         "which only async mode overlaps; set rollout.mode=async (max_staleness >= 1)")
        if self.colocate and self.mode == "async":
            raise ConfigError("mode", "'async' generates while the trainer trains, and colocated servers share the "
                                      "trainer's accelerators; set rollout.mode=sync or rollout.colocate=false")
        if self.colocate and self.weight_sync == "distributed":
            # NCCL refuses a group with two ranks on one GPU: trainer rank 0 and the server sharing it.
            raise ConfigError("weight_sync", "'distributed' cannot sync colocated servers (their process group "
                                             "would hold two ranks on one GPU); set rollout.weight_sync=tensor")
        return self


class BetaScheduleConfig(Section):
    kind: Literal[tuple(BETA_SCHEDULES)] = "constant"
    """How beta1/beta2 evolve: constant, a switch at `switch_step`, a linear ramp, or an entropy-target controller."""

    switch_step: int = Field(0, ge=0)
    """step: the step at which (beta1_after, beta2_after) take over (the paper switches at 585)."""

    ramp_steps: int = Field(0, ge=0)
    """linear: steps over which betas move from (beta1, beta2) to (beta1_after, beta2_after)."""

    beta1_after: float = _loss_hparam("beta1", default=hparam_default("beta1"))
    """step / linear: beta1 after the switch or at the end of the ramp."""

    beta2_after: float = _loss_hparam("beta2", default=hparam_default("beta2"))
    """step / linear: beta2 after the switch or at the end of the ramp."""

    entropy_low: float = Field(0.0, ge=0)
    """entropy_target: lower edge of the entropy band (nats per token)."""

    entropy_high: float = Field(0.0, ge=0)
    """entropy_target: upper edge of the entropy band (nats per token)."""

    proportional_gain: float = Field(EntropyTargetController.proportional_gain, ge=0)
    """entropy_target: beta moved per nat of change in the entropy's distance from the band."""

    integral_gain: float = Field(EntropyTargetController.integral_gain, ge=0)
    """entropy_target: beta moved per step per nat of distance from the band."""

    sign: Literal["measured", "paper"] = "measured"
    """entropy_target: which way each beta moves the entropy: measured every step (entropy_sensitivity_beta1/2, or realized_entropy_sensitivity_beta1/2 with logging.realized_sensitivity_beta_step), or the paper's (beta1 lowers it, beta2 raises it) for comparison."""

    beta_min: float = _loss_hparam("beta1", default=EntropyTargetController.beta1_bounds[0])
    """entropy_target: lower bound for both betas."""

    beta_max: float = _loss_hparam("beta1", default=EntropyTargetController.beta1_bounds[1])
    """entropy_target: upper bound for both betas."""

    @model_validator(mode="after")
    def _check(self) -> BetaScheduleConfig:
        if self.beta_max < self.beta_min:
            raise ConfigError("beta_max", f"got {self.beta_max!r}, expected a number >= beta_min ({self.beta_min})")
        if self.kind == "linear" and self.ramp_steps < 1:
            raise ConfigError("ramp_steps", f"got {self.ramp_steps!r}, expected an integer >= 1 for kind=linear")
        if self.kind == "entropy_target" and not self.entropy_low < self.entropy_high:
            raise ConfigError("entropy_high", f"got {self.entropy_high!r}, expected a number > entropy_low "
                                              f"({self.entropy_low}) for kind=entropy_target")
        return self


class AlgorithmConfig(Section):
    loss: Literal[RL_LOSSES] = "ce_gppo"
    """Policy loss from the registry in megatron_gppo/algorithm/losses.py."""

    eps_low: float | None = _loss_hparam("eps_low", default=None)
    """Lower clip range: ratios below 1 - eps_low are clipped (CE-GPPO: they get the beta1 gradient). null: the loss's own default (0.2; gspo 3e-4)."""

    eps_high: float | None = _loss_hparam("eps_high", default=None)
    """Upper clip range: ratios above 1 + eps_high are clipped (CE-GPPO: they get the beta2 gradient). null: the loss's own default (0.2; dapo 0.28; gspo 4e-4)."""

    beta1: float = _loss_hparam("beta1", default=hparam_default("beta1"))
    """CE-GPPO gradient scale for clipped negative-advantage, low-ratio tokens. Larger lowers entropy."""

    beta2: float = _loss_hparam("beta2", default=hparam_default("beta2"))
    """CE-GPPO gradient scale for clipped positive-advantage, high-ratio tokens. Larger raises entropy."""

    beta_schedule: BetaScheduleConfig = Field(default_factory=BetaScheduleConfig)
    """How beta1/beta2 change during training."""

    dual_clip_c: float | None = _loss_hparam("dual_clip_c", default=hparam_default("dual_clip_c"), null="off")
    """Dual-clip bound c for negative advantages (ce_gppo, ppo, grpo, dapo); null disables it."""

    nll_coef: float = _loss_hparam("nll_coef", default=hparam_default("nll_coef"))
    """Coefficient of an NLL (SFT) term on positive-advantage tokens; 0 disables it."""

    entropy_coef: float = _loss_hparam("entropy_coef", default=hparam_default("entropy_coef"))
    """Entropy-bonus coefficient; 0 disables it."""

    aggregation: Literal[AGGREGATIONS] = hparam_default("aggregation")
    """How per-token losses become one number; token_mean is exact over the global batch."""

    normalize_advantage_std: bool = True
    """Divide group-centred rewards by the group's standard deviation (GRPO)."""

    dynamic_sampling: bool = True
    """Drop groups whose rewards are all equal and sample more prompts to refill the batch (DAPO)."""

    max_refill_rounds: int = Field(3, ge=0)
    """Upper bound on extra rollout rounds dynamic sampling may spend refilling one batch."""

    tis_cap: float | None = _loss_hparam("tis_cap", default=None, null="off")
    """Truncated importance-sampling cap for the train/rollout log-prob mismatch; null disables the correction. Unset with rollout.mode=async: 2.0."""


class DataConfig(Section):
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

    max_prompt_tokens: int = Field(1024, ge=1)
    """Prompts longer than this many tokens are skipped."""

    shuffle: bool = True
    """Shuffle prompts each epoch (seeded by train.seed)."""


class RewardConfig(Section):
    format_penalty: float = Field(0.0, ge=0)
    """Reward of a response without a complete \\boxed{} answer is -format_penalty (correct: 1, wrong: 0)."""

    timeout_s: float = Field(5.0, gt=0)
    """Per-sample time limit of the math-verify check; a sample that exceeds it scores 0."""

    num_workers: int = Field(2, ge=0)
    """Processes that compute rewards in parallel; 0 computes them in the trainer process."""


class TrainConfig(Section):
    output_dir: str = Field("runs/default", min_length=1)
    """Run directory: metrics.jsonl, checkpoints/, plots/, the resolved config.yaml."""

    max_steps: int = Field(100, ge=1)
    """Number of RL steps (one rollout batch each)."""

    prompts_per_step: int = Field(32, ge=1)
    """Prompts per rollout batch (each sampled rollout.num_samples_per_prompt times)."""

    num_minibatches: int = Field(1, ge=1)
    """Optimizer steps per pass over a rollout batch."""

    num_epochs: int = Field(1, ge=1)
    """Passes over each rollout batch."""

    micro_batch_size: int = Field(8, ge=1)
    """Rows per forward/backward micro-batch. A row holds one sample padded to the step's longest, or, packed, as many samples as fit in that length."""

    pack_sequences: bool = True
    """Pack several samples end to end into each row, attention kept within each sample: exactly the loss and gradients of padding every sample to the longest, without computing on the padding."""

    max_tokens_per_micro_batch: int | None = Field(None, ge=1)
    """Packed micro-batch size in tokens (replaces micro_batch_size): as many rows of the step's longest sample as fit. null: micro_batch_size rows."""

    lr: float = Field(1e-6, gt=0)
    """Peak learning rate (the paper uses 1e-6)."""

    min_lr: float = Field(0.0, ge=0)
    """Learning rate at the end of the decay (at most lr)."""

    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    """Decay after warm-up."""

    warmup_steps: int = Field(0, ge=0)
    """Linear warm-up steps."""

    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""

    adam_beta1: float = Field(0.9, ge=0, lt=1)
    """Adam beta1 (not the CE-GPPO beta1)."""

    adam_beta2: float = Field(0.999, ge=0, lt=1)
    """Adam beta2 (not the CE-GPPO beta2)."""

    adam_eps: float = Field(1e-8, gt=0)
    """Adam epsilon."""

    grad_clip: float = Field(1.0, ge=0)
    """Global gradient-norm clip; 0 disables it."""

    max_skipped_steps: int = Field(5, ge=1)
    """Stop the run (with a checkpoint) after this many consecutive steps in which an optimizer update was skipped because its loss or gradient was not finite."""

    distributed_optimizer: bool = False
    """Shard optimizer state across data-parallel ranks (megatron distributed optimizer)."""

    seed: int = 1234
    """Seed of model init, data order and sampling."""

    cpu_threads: int = Field(0, ge=0)
    """CPU machines: torch threads of each trainer process and each local rollout server; 0 splits the cores between them (oversubscribed cores were measured ~10x slower while both work at once)."""

    eval_every: int = Field(0, ge=0)
    """Evaluate every N steps (and at the end); 0 evaluates only at the end."""

    eval_samples_per_prompt: int = Field(8, ge=1)
    """k of avg@k / pass@k (the paper reports avg@32)."""

    eval_temperature: float = Field(1.0, gt=0)
    """Sampling temperature during evaluation."""

    stop_file: str = Field("PREEMPT", min_length=1)
    """Once this file exists (relative paths are in output_dir) the run checkpoints and exits 0 at the next step boundary; the Slurm launchers create it when Slurm signals the job, and requeue it."""

    export_hf: bool = True
    """When training reaches max_steps, write the policy as a Hugging Face model to output_dir/hf (safetensors, config, tokenizer): what `megatron-gppo serve` and transformers load."""

    deadline_minutes: float = Field(0.0, ge=0)
    """Wall-clock budget of one run attempt: checkpoint, create `stop_file` and exit 0 before the next step would overrun it (0: none). For clusters that send no signal before the time limit."""

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.min_lr > self.lr:
            raise ConfigError("min_lr", f"got {self.min_lr!r}, expected a number in [0, lr={self.lr}]")
        if self.max_tokens_per_micro_batch is not None and not self.pack_sequences:
            raise ConfigError("max_tokens_per_micro_batch", "is a packed micro-batch size, but pack_sequences is false; "
                              "set pack_sequences: true or use micro_batch_size")
        return self


class CheckpointConfig(Section):
    save_every: int = Field(50, ge=0)
    """Save a training checkpoint every N steps (and at the end); 0 saves only at the end."""

    keep_last: int = Field(2, ge=1)
    """Complete checkpoints to keep; older ones are deleted."""

    resume: bool = True
    """Resume from the latest complete checkpoint in train.output_dir when one exists."""


class LoggingConfig(Section):
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

    realized_entropy_change: bool = False
    """One more forward pass per step: the entropy of the step's own samples after its updates minus before (`realized_entropy_change`), to check `predicted_entropy_change` against."""

    realized_sensitivity_beta_step: float | None = Field(None, gt=0)
    """Measure what each beta does to the entropy through the real optimizer: redo every step's updates from the same weights and optimizer state with beta1 + this, then with beta2 + this, and log the entropy of the step's samples afterwards against the real step's, per unit beta (`realized_entropy_sensitivity_beta1/2`; the entropy_target controller then steers by them). Two more rounds of updates and three more forward passes per step; ce_gppo only. null: off."""


class RunConfig(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    """The policy model."""

    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    """Tensor / pipeline / data parallel layout."""

    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    """Rollout servers and sampling."""

    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    """Policy loss, advantages and beta schedule."""

    data: DataConfig = Field(default_factory=DataConfig)
    """Prompt datasets."""

    reward: RewardConfig = Field(default_factory=RewardConfig)
    """How responses are scored."""

    train: TrainConfig = Field(default_factory=TrainConfig)
    """Steps, batch sizes and optimizer."""

    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    """Training checkpoints and resume."""

    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    """Metrics, wandb, progress and plots."""

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if self.rollout.mode == "async" and "tis_cap" not in self.algorithm.model_fields_set:
            # Off-policy samples: correct the gap between the sampling and the proximal policy by default.
            self.algorithm.tis_cap = ASYNC_TIS_CAP
        if self.logging.realized_sensitivity_beta_step is not None and self.algorithm.loss != "ce_gppo":
            raise ConfigError("logging.realized_sensitivity_beta_step",
                              f"needs algorithm.loss=ce_gppo, the loss with betas (got {self.algorithm.loss}); "
                              "set it to null")
        longest = self.data.max_prompt_tokens + self.rollout.max_new_tokens
        budget = self.train.max_tokens_per_micro_batch
        if budget is not None and budget < longest:
            raise ConfigError("train.max_tokens_per_micro_batch",
                              f"got {budget}, but a rollout can be {longest} tokens long (data.max_prompt_tokens + "
                              f"rollout.max_new_tokens); raise it to at least {longest}")
        return self


# ----------------------------------------------------------------------------
# Loading: YAML + overrides -> RunConfig, with pydantic's first error on one line
# ----------------------------------------------------------------------------


def _unknown_key(key: str, known: list[str]) -> str:
    parent, _, name = key.rpartition(".")
    hint = difflib.get_close_matches(name, known, n=1)
    if hint:
        return f"unknown key; did you mean '{parent + '.' if parent else ''}{hint[0]}'?"
    return f"unknown key; known keys{' in ' + parent if parent else ''}: {', '.join(known)}"


def _config_error(error: ValidationError) -> ConfigError:
    """pydantic's first problem as one line that names the dotted key, the value and what is allowed."""
    problem = error.errors()[0]
    loc, value, kind = problem["loc"], problem["input"], problem["type"]
    where = locate(RunConfig, loc)
    key = ".".join(where.names + ([str(loc[len(where.names)])] if kind == "extra_forbidden" else []))
    cause = (problem.get("ctx") or {}).get("error")
    if isinstance(cause, ConfigError):  # a section's cross-field check
        return ConfigError(f"{key}.{cause.key}" if key else cause.key, cause.detail)
    if kind == "extra_forbidden":
        return ConfigError(key, _unknown_key(key, list(where.model.model_fields)))
    if isinstance(cause, ValueError):  # a field check that words what it expects
        return ConfigError(key, f"got {value!r}, expected {cause}")
    if kind == "literal_error":
        choices = [str(choice) for choice in typing.get_args(where.field.annotation)]
        hint = difflib.get_close_matches(str(value), choices, n=1)
        suffix = f" (did you mean {hint[0]!r}?)" if hint else ""
        return ConfigError(key, f"got {value!r}, expected {describe_field(where.field)}{suffix}")
    if kind in BOUND_ERRORS:
        limit = next(iter(problem["ctx"].values()))
        # Show the value as the field holds it: `got -1.0` for a number field given -1.
        return ConfigError(key, f"got {type(limit)(value)!r}, expected {describe_field(where.field)}")
    if kind == "string_too_short":
        return ConfigError(key, f"got {value!r}, expected a non-empty string")
    if where.field is None:  # not a field's value (e.g. a key that is no string)
        return ConfigError(".".join(map(str, loc)) or "(top level)", problem["msg"])
    return ConfigError(key, f"got {value!r}, expected {describe_field(where.field, with_bound=False)}")


def from_dict(data: dict[str, Any]) -> RunConfig:
    """Build and validate a RunConfig from a nested dict; `ConfigError` on the first problem."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as error:
        raise _config_error(error) from None


def to_dict(config: BaseModel) -> dict[str, Any]:
    """Plain values, as YAML and JSON write them; secrets (`rollout.api_key`) become '**********'."""
    return config.model_dump(mode="json")


def parse_override(text: str) -> tuple[str, Any]:
    """Split `dotted.key=value`; the value is parsed as YAML so `[a, b]` and `null` work (and `None`)."""
    if "=" not in text:
        raise ConfigError(text, "override must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # bytes the shell could not decode arrive as lone surrogates
        raise ConfigError(key.encode("utf-8", "replace").decode(), "override is not valid UTF-8") from None
    if raw.strip().lower() == "none":
        return key.strip(), None
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """tree[a][b][c] = value for `a.b.c`; names are checked when the tree is validated."""
    *sections, name = key.split(".")
    node = tree
    for depth, section in enumerate(sections):
        node = node.setdefault(section, {})
        if not isinstance(node, dict):
            raise ConfigError(".".join(sections[: depth + 1]), f"is not a section, so '{key}' does not exist")
    node[name] = value


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> RunConfig:
    """Defaults < YAML at `path` < `dotted.key=value` overrides; validated."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not UTF-8 text (byte {err.start} is {err.object[err.start]:#04x})") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ValueError(f"{path}: not valid YAML{where}") from None
        if not isinstance(tree, dict):
            raise ValueError(f"{path}: expected a mapping of sections at the top level")
    for text in overrides:
        _set_dotted(tree, *parse_override(text))
    return from_dict(tree)


SECRET_KEYS = ("rollout.api_key",)
_REDACTED = "**********"


def redact_secrets(argv: list[str]) -> list[str]:
    """A command line with the values of secret overrides (and `--api-key`) replaced, for logs and run records."""
    redacted, hide_next = [], False
    for arg in argv:
        key = arg.split("=", 1)[0]
        if hide_next:
            arg, hide_next = _REDACTED, False
        elif key in SECRET_KEYS or key == "--api-key":
            if "=" in arg:
                arg = f"{key}={_REDACTED}"
            else:
                hide_next = True
        redacted.append(arg)
    return redacted


def save_config(config: RunConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML atomically (temporary name, then rename)."""
    write_text_atomic(path, yaml.safe_dump(to_dict(config), sort_keys=False))


def describe_fields(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted key, what it accepts, default, doc) for every leaf field, in declaration order."""
    rows = []
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            rows += describe_fields(field.annotation, prefix + name + ".")
        else:
            doc = " ".join((field.description or "").split())
            rows.append((prefix + name, describe_field(field), field.get_default(call_default_factory=True), doc))
    return rows


__all__ = [
    "AlgorithmConfig", "BetaScheduleConfig", "CheckpointConfig", "ConfigError", "DataConfig",
    "LoggingConfig", "ModelConfig", "ParallelConfig", "RewardConfig", "RolloutConfig", "RunConfig", "TrainConfig",
    "describe_fields", "from_dict", "load_config", "parse_override", "redact_secrets", "save_config", "to_dict",
]
