"""Setting up a run: the policy on every rank, and the driver on rank 0.

The driver owns everything that is not the Megatron model: prompts and their
sampler, the rollout engine (local servers or SGLang URLs), the reward, the
beta schedule and the logs. The trainer asks it for each step's rollouts
(`collect_rollouts`) and hands back the step's metrics (`finish_step`).

With `rollout.mode=async` a producer thread generates step k+1's rollouts,
from the weights before step k's update, while every rank trains step k; the
weight sync waits for it, so the schedule is fixed and a resumed run repeats
it (a finished batch waiting for its step is saved in the checkpoint). With
`rollout.partial` the sync does not wait: it aborts what is still being
generated, and the client continues it on the new weights.
"""

from __future__ import annotations

import logging
import os
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_gppo.algorithm import make_beta_schedule
from megatron_gppo.algorithm.schedules import EntropyTargetController, sensitivities_from
from megatron_gppo.batching import PolicyBatch, pack_samples
from megatron_gppo.config import RunConfig, save_config, to_dict
from megatron_gppo.data import PromptSampler, encode_prompt, load_prompts, pad_token_id
from megatron_gppo.experience import Experience, collect_experience, evaluate
from megatron_gppo.metrics import MetricsLogger
from megatron_gppo.model.arch import ModelArch
from megatron_gppo.rollout.client import RolloutError
from megatron_gppo.rollout.engine import mix_seed
from megatron_gppo.rollout.sglang_engine import RolloutServerLost
from megatron_gppo.types import Sample

logger = logging.getLogger(__name__)

# Evaluation draws its sampling seeds from a stream of its own, apart from the training steps'.
_EVAL_SEED_OFFSET = 500_009


# What the driver answers instead of rollouts or a sync when a local server died and was started again.
SERVERS_RESTARTED = "servers-restarted"

# The entropy controller says once that it cannot reach its band after this many saturated steps.
SATURATION_WARNING_STEPS = 10


@dataclass(frozen=True, kw_only=True)
class RolloutBatch:
    """One step's rollouts, scored, with the betas to train them with; the driver broadcasts it to every rank."""

    batch: PolicyBatch
    """Prompt + response tokens with advantages and rollout log-probs, `[num_samples, T]`."""
    beta1: float
    beta2: float
    metrics: dict[str, float]
    """Rollout metrics: reward, response lengths, dynamic-sampling counts, betas."""


@dataclass(frozen=True, kw_only=True)
class StepRollouts:
    """One step's scored samples before packing, with the betas they were drawn for."""

    step: int
    experience: Experience
    beta1: float
    beta2: float
    seconds: float
    """Wall time of generating and scoring them."""

    def to_state(self) -> dict[str, Any]:
        """JSON-able, for a checkpoint taken while they wait for their step."""
        return {"step": self.step, "beta1": self.beta1, "beta2": self.beta2, "seconds": self.seconds,
                "metrics": self.experience.metrics, "samples": [asdict(s) for s in self.experience.samples]}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> StepRollouts:
        experience = Experience(samples=[Sample(**s) for s in state["samples"]], metrics=state["metrics"])
        return cls(step=state["step"], experience=experience, beta1=state["beta1"], beta2=state["beta2"],
                   seconds=state["seconds"])


def policy_version(weight_version: str) -> int | None:
    """N of the trainer's weight version 'step-N' (the weights after step N); None for any other version."""
    match = re.fullmatch(r"step-(\d+)", weight_version)
    return int(match.group(1)) if match else None


def staleness(sample: Sample, *, step: int) -> float:
    """Policy versions between the oldest weights that generated some of `sample` and those that train on it
    at `step` (the weights after step - 1); infinite for weights of unknown version."""
    versions = [policy_version(version) for version in sample.versions]
    return float("inf") if None in versions else float(step - 1 - min(versions))


def beta_schedule_from_config(config: RunConfig):
    alg, sched = config.algorithm, config.algorithm.beta_schedule
    start, after = (alg.beta1, alg.beta2), (sched.beta1_after, sched.beta2_after)
    if sched.kind == "constant":
        return make_beta_schedule("constant", beta1=alg.beta1, beta2=alg.beta2)
    if sched.kind == "step":
        return make_beta_schedule("step", switch_step=sched.switch_step, before=start, after=after)
    if sched.kind == "linear":
        return make_beta_schedule("linear", start_step=sched.switch_step, end_step=sched.switch_step + sched.ramp_steps,
                                  start=start, end=after)
    bounds = (sched.beta_min, sched.beta_max)
    return make_beta_schedule("entropy_target", low=sched.entropy_low, high=sched.entropy_high, initial=start,
                              proportional_gain=sched.proportional_gain, integral_gain=sched.integral_gain,
                              sign=sched.sign, beta1_bounds=bounds, beta2_bounds=bounds)


def cpu_threads_per_process(config: RunConfig) -> int:
    """Threads for each trainer process and local server on a CPU machine.

    They share the cores; oversubscribing them was measured ~10x slower. `train.cpu_threads` overrides it.
    """
    if config.train.cpu_threads:
        return config.train.cpu_threads
    num_local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    num_servers = config.rollout.num_local_servers if config.rollout.backend == "local" else 0
    return max(1, (os.cpu_count() or 1) // (num_local_ranks + num_servers))


def setup_policy(config: RunConfig, *, resume: bool):
    """Every rank: validate the layout, build the policy, then resume (when `resume` and a checkpoint
    exists) or load the initial weights.

    Returns `(policy, arch, start_step, driver_state)`.
    """
    from megatron_gppo.checkpoint.convert import convert_hf_to_megatron
    from megatron_gppo.checkpoint.live import load_megatron_weights
    from megatron_gppo.checkpoint.training import resume as resume_checkpoint
    from megatron_gppo.model.parallel import init_distributed
    from megatron_gppo.model.policy import Policy

    if not config.model.hf_path:
        raise ValueError("config key 'model.hf_path' is empty: point it at a Hugging Face model directory")
    arch = ModelArch.from_hf_config(config.model.hf_path)
    if not torch.cuda.is_available():
        torch.set_num_threads(cpu_threads_per_process(config))
    dims = init_distributed(config.parallel, arch=arch, seed=config.train.seed)
    policy = Policy(arch=arch, dims=dims, model=config.model, train=config.train)
    state = resume_checkpoint(config.train.output_dir, model=policy.model, optimizer=policy.optimizer,
                              scheduler=policy.scheduler) if resume else None
    if state is not None:
        return policy, arch, state.step, state.extra

    weights_dir = Path(config.model.megatron_checkpoint) if config.model.megatron_checkpoint else None
    if weights_dir is None:
        # One conversion per run directory, then every rank loads its own shards.
        weights_dir = Path(config.train.output_dir) / "initial_megatron"
        if dist.get_rank() == 0 and not weights_dir.exists():
            convert_hf_to_megatron(config.model.hf_path, weights_dir, progress=config.logging.progress)
        dist.barrier()
    load_megatron_weights(policy.chunks, weights_dir)
    policy.optimizer.reload_model_params()
    return policy, arch, 0, {}


class Driver:
    """Rank 0's side of the run: prompts, rollouts, rewards, betas, logs."""

    def __init__(self, config: RunConfig, *, arch: ModelArch, start_step: int, extra: dict[str, Any],
                 started: float):
        """`started`: `time.monotonic()` when the run began, the origin of `train.deadline_minutes`."""
        from transformers import AutoTokenizer

        from megatron_gppo.reward.math import MathReward
        from megatron_gppo.rollout.engine import SamplingParams
        from megatron_gppo.rollout.sglang_engine import SGLangEngine

        self.config = config
        self.started = started
        self.run_dir = Path(config.train.output_dir)
        self.stop_file = self.run_dir / config.train.stop_file
        save_config(config, self.run_dir / "config.yaml")
        self.tokenizer = AutoTokenizer.from_pretrained(config.model.hf_path)
        self.pad_id = pad_token_id(self.tokenizer)
        self.train_prompts, self.train_ids = self._load(config.data.train_path, "data.train_path")
        self.eval_prompts, self.eval_ids = (self._load(config.data.eval_path, "data.eval_path")
                                            if config.data.eval_path else ([], []))
        self.sampler = PromptSampler(len(self.train_prompts), seed=config.train.seed, shuffle=config.data.shuffle)
        self.betas = beta_schedule_from_config(config)
        if extra:
            self.sampler.load_state_dict(extra["sampler"])
            self.betas.load_state_dict(extra["beta_schedule"])
        # What the beta schedule steers by: the last step's entropy and the betas' measured effect on it.
        self.last_entropy = extra.get("last_entropy")
        self.last_sensitivities = extra.get("last_sensitivities")
        # Steps in a row with an optimizer update skipped for a non-finite loss or gradient.
        self.num_skipping_steps = extra.get("num_skipping_steps", 0)
        self.reward = MathReward(num_workers=config.reward.num_workers, timeout_s=config.reward.timeout_s,
                                 format_penalty=config.reward.format_penalty)
        self.sampling = SamplingParams.from_config(config.rollout)
        self.eval_sampling = SamplingParams.from_config(config.rollout, temperature=config.train.eval_temperature)
        self.logger = MetricsLogger(run_dir=self.run_dir, config=config.logging, run_config=to_dict(config),
                                    max_steps=config.train.max_steps, start_step=start_step)
        self.engine = SGLangEngine.from_config(config.rollout, model_path=config.model.hf_path,
                                               work_dir=self.run_dir / "rollout", progress=False,
                                               num_threads=cpu_threads_per_process(config))
        self.memory_released = False
        # Local servers restarted since the last weight sync (they serve stale weights until it), the
        # engine's running counts as of the last metrics line, and why a server could not be brought back.
        self.num_unsynced_restarts = 0
        self.num_overstale = 0  # samples older than rollout.max_staleness, regenerated, over the run
        self.counts_logged = self._engine_counts()
        self.lost = ""
        # async: the producer thread and the next step's rollouts it is making (or made).
        self.lookahead = config.rollout.mode == "async" and config.rollout.max_staleness > 0
        self.producer = ThreadPoolExecutor(1, thread_name_prefix="rollout-producer") if self.lookahead else None
        self.ahead: Future | None = None
        if extra.get("rollouts_ahead"):
            self.ahead = Future()
            self.ahead.set_result(StepRollouts.from_state(extra["rollouts_ahead"]))
        self.rollout_wait_s = 0.0  # how long rank 0 waited for rollouts during the current step

    def _load(self, path: str, key: str) -> tuple[list, list[list[int]]]:
        if not path:
            raise ValueError(f"config key '{key}' is empty: point it at a .jsonl / .parquet / datasets path")
        data = self.config.data
        prompts = load_prompts(path, prompt_key=data.prompt_key, answer_key=data.answer_key)
        kept, ids = [], []
        for prompt in prompts:
            token_ids = encode_prompt(prompt.text, tokenizer=self.tokenizer, template=data.prompt_template)
            if len(token_ids) <= data.max_prompt_tokens:
                kept.append(prompt)
                ids.append(token_ids)
        if not kept:
            raise ValueError(f"{path}: every prompt is longer than data.max_prompt_tokens={data.max_prompt_tokens}")
        if len(kept) < len(prompts):
            logger.warning("%s: skipped %d prompts longer than %d tokens", path, len(prompts) - len(kept),
                           data.max_prompt_tokens)
        return kept, ids

    def collect_rollouts(self, step: int) -> RolloutBatch | str:
        """This step's scored and filtered samples (seeded by the step, so a resume repeats them): made now,
        or (async) made by the producer during the last step, which then starts on the next step's.

        Or, as a string: `SERVERS_RESTARTED` when a local server died and was started again (the
        caller syncs the weights and asks again: the same prompts and seeds), or why the rollout failed.
        """
        if self._restart_dead_servers():
            return SERVERS_RESTARTED
        if self.lost:
            return self.lost
        started = time.monotonic()
        rollouts = self._take_ahead(step) or self._produce(step)
        if isinstance(rollouts, StepRollouts) and (stale := self._overstale(rollouts)):
            self.num_overstale += stale
            logger.warning("step %d: %d samples are more than rollout.max_staleness=%d policy versions old; "
                           "generating the step's rollouts again", step, stale, self.config.rollout.max_staleness)
            rollouts = self._produce(step)
        self.rollout_wait_s += time.monotonic() - started
        if isinstance(rollouts, str):
            return rollouts
        if self.lookahead:
            # Also after the last step: the checkpoint keeps that batch, so a run continued past max_steps
            # trains what an uninterrupted longer run would have.
            self.ahead = self.producer.submit(self._produce, step + 1)
        return self._batch(rollouts)

    def _take_ahead(self, step: int) -> StepRollouts | str | None:
        """What the producer made for `step` (waiting for it), or None when it made nothing."""
        if self.ahead is None:
            return None
        rollouts, self.ahead = self.ahead.result(), None
        assert not isinstance(rollouts, StepRollouts) or rollouts.step == step, (rollouts.step, step)
        return rollouts

    def _produce(self, step: int) -> StepRollouts | str:
        """Generate and score `step`'s rollouts; on failure, the prompt sampler and betas are as before."""
        sampler_state, betas_state = self.sampler.state_dict(), self.betas.state_dict()
        try:
            return self._collect_rollouts(step)
        except RolloutError as err:
            self.sampler.load_state_dict(sampler_state)
            self.betas.load_state_dict(betas_state)
            if self._restart_dead_servers():
                return SERVERS_RESTARTED
            return self.lost or f"rollout failed: {str(err).splitlines()[0]}"

    def _overstale(self, rollouts: StepRollouts) -> int:
        """How many samples lag the policy that trains on them by more than allowed (0 in sync mode)."""
        rollout = self.config.rollout
        limit = rollout.max_staleness if rollout.mode == "async" else 0
        return sum(staleness(s, step=rollouts.step) > limit for s in rollouts.experience.samples)

    def _batch(self, rollouts: StepRollouts) -> RolloutBatch:
        samples = rollouts.experience.samples
        lags = [staleness(s, step=rollouts.step) for s in samples]
        continued = sum(len(set(s.versions)) > 1 for s in samples)
        metrics = {**rollouts.experience.metrics, "beta1": rollouts.beta1, "beta2": rollouts.beta2,
                   "rollout_s": rollouts.seconds, "staleness_mean": sum(lags) / len(lags),
                   "staleness_max": max(lags), "partial_frac": continued / len(samples)}
        return RolloutBatch(batch=pack_samples(samples, pad_id=self.pad_id), beta1=rollouts.beta1,
                            beta2=rollouts.beta2, metrics=metrics)

    def _restart_dead_servers(self) -> bool:
        """Restart dead local servers; whether some restarted server still lacks the current weights."""
        try:
            self.num_unsynced_restarts += self.engine.restart_dead_servers()
        except RolloutServerLost as err:
            self.lost = str(err)
        return self.num_unsynced_restarts > 0 and not self.lost

    def _collect_rollouts(self, step: int) -> StepRollouts:
        started = time.monotonic()
        beta1, beta2 = self.betas.betas(step, entropy=self.last_entropy, sensitivities=self.last_sensitivities)
        if isinstance(self.betas, EntropyTargetController) and self.betas.saturated_steps == SATURATION_WARNING_STEPS:
            logger.warning("entropy_target: entropy %.4f has been outside [%g, %g] for %d steps with both betas at "
                           "their bounds (%g, %g): the clipped tokens cannot move it enough here (compare "
                           "predicted_entropy_change_low/_high with _inside in metrics.jsonl); widen "
                           "beta_min/beta_max or move the band", self.last_entropy, self.betas.low, self.betas.high,
                           SATURATION_WARNING_STEPS, beta1, beta2)
        alg = self.config.algorithm
        sampling = replace(self.sampling, seed=mix_seed(self.config.train.seed, step))
        experience = collect_experience(
            engine=self.engine, prompts=self.train_prompts, encoded_prompts=self.train_ids, sampler=self.sampler,
            reward_fn=self.reward, sampling=sampling, num_groups=self.config.train.prompts_per_step,
            group_size=self.config.rollout.num_samples_per_prompt, normalize_std=alg.normalize_advantage_std,
            dynamic_sampling=alg.dynamic_sampling, max_refill_rounds=alg.max_refill_rounds,
        )
        if self.config.rollout.colocate:
            self.engine.release_memory()  # the trainer needs the accelerators until the next weight sync
            self.memory_released = True
        return StepRollouts(step=step, experience=experience, beta1=beta1, beta2=beta2,
                            seconds=time.monotonic() - started)

    def update_weights(self, named_tensors, *, version: str) -> str:
        """Send the weights to every server: '' when they all have them, `SERVERS_RESTARTED` when one died
        during the sync and was started again (sync again), or why it failed. Always consumes
        `named_tensors`, whose gathers the other ranks take part in."""
        if self.ahead is not None and not self.config.rollout.partial:
            # The servers finish the next step's rollouts on the old weights first; with partial rollouts
            # the sync aborts them instead and the client continues them on the new weights.
            started = time.monotonic()
            wait([self.ahead])
            self.rollout_wait_s += time.monotonic() - started
        self._restart_dead_servers()  # servers that died since the last sync get the weights now
        try:
            if self.lost:
                return self.lost
            if self.memory_released:
                self.engine.resume_memory()
                self.memory_released = False
            self.engine.update_weights(named_tensors, version=version)
        except RolloutError as err:
            if self._restart_dead_servers():
                return SERVERS_RESTARTED
            return self.lost or f"weight sync {version} failed: {str(err).splitlines()[0]}"
        finally:
            for _ in named_tensors:  # the rest of a sync that stopped early
                pass
        self.num_unsynced_restarts = 0
        return ""

    def maybe_evaluate(self, step: int, *, force: bool = False) -> dict[str, float]:
        """Evaluate on the held-out prompts when due; step 0 is logged on its own."""
        every = self.config.train.eval_every
        due = force or step == self.config.train.max_steps or (every and step % every == 0)
        if not self.eval_prompts or not due:
            return {}
        sampling = replace(self.eval_sampling, seed=mix_seed(self.config.train.seed, _EVAL_SEED_OFFSET + step))
        try:
            metrics = evaluate(engine=self.engine, prompts=self.eval_prompts, encoded_prompts=self.eval_ids,
                               reward_fn=self.reward, sampling=sampling,
                               num_samples=self.config.train.eval_samples_per_prompt)
        except RolloutError as err:
            # The next rollout restarts the dead server and syncs it first.
            logger.warning("step %d: evaluation skipped, a rollout server failed (%s)", step,
                           str(err).splitlines()[0])
            return {}
        if step == 0:
            self.logger.log(0, metrics)
        return metrics

    def finish_step(self, step: int, metrics: dict[str, float]) -> None:
        metrics.update(self.maybe_evaluate(step))
        self.last_entropy = metrics.get("entropy")
        self.last_sensitivities = sensitivities_from(metrics)
        counts = self._engine_counts()
        metrics.update({key: float(count - self.counts_logged[key]) for key, count in counts.items()})
        self.counts_logged = counts
        metrics["rollout_wait_s"], self.rollout_wait_s = self.rollout_wait_s, 0.0
        self.num_skipping_steps = self.num_skipping_steps + 1 if metrics["skipped_steps"] else 0
        if metrics["skipped_steps"]:
            logger.warning("step %d: %d of %d optimizer updates skipped (non-finite loss or gradient; weights "
                           "unchanged by them)", step, metrics["skipped_steps"], metrics["num_updates"])
        self.logger.log(step, metrics)

    def _engine_counts(self) -> dict[str, int]:
        """The running counts of rollout incidents, by the name of the per-step metric they become."""
        return {"rollout_server_restarts": self.engine.num_restarts, "rollout_retries": self.engine.num_retries,
                "rollout_stale_samples": self.engine.num_stale_samples, "staleness_exceeded": self.num_overstale}

    def failure(self) -> str:
        """Why the run cannot go on ('' when it can): a rollout server lost, or too many steps in a row with
        non-finite updates."""
        if self.lost:
            return self.lost
        limit = self.config.train.max_skipped_steps
        if self.num_skipping_steps < limit:
            return ""
        return (f"{self.num_skipping_steps} steps in a row skipped optimizer updates whose loss or gradient was not "
                f"finite (train.max_skipped_steps={limit}); lower train.lr or look for non-finite rewards")

    def stop_reason(self, *, next_step_s: float) -> str:
        """Why the run should stop before its next step ('' to go on): the stop file, or the deadline."""
        if self.stop_file.exists():
            return f"found {self.stop_file}"
        minutes = self.config.train.deadline_minutes
        if minutes and time.monotonic() - self.started + next_step_s > minutes * 60:
            self.stop_file.touch()  # what a Slurm launcher looks for to requeue the job
            return f"the next step would pass train.deadline_minutes={minutes:g}"
        return ""

    def state_dict(self) -> dict[str, Any]:
        state = {"sampler": self.sampler.state_dict(), "beta_schedule": self.betas.state_dict(),
                 "last_entropy": self.last_entropy, "last_sensitivities": self.last_sensitivities,
                 "num_skipping_steps": self.num_skipping_steps}
        if self.ahead is not None:
            # The sampler has moved past the next step's prompts: keep the rollouts made from them.
            wait([self.ahead])
            if isinstance(rollouts := self.ahead.result(), StepRollouts):
                state["rollouts_ahead"] = rollouts.to_state()
        return state

    def close(self) -> None:
        from megatron_gppo.plots import write_run_plots

        try:
            if self.producer is not None:
                self.producer.shutdown(wait=True, cancel_futures=True)
            self.engine.close()
            self.reward.close()
        finally:
            self.logger.close()
            if self.config.logging.plots:
                written = write_run_plots(self.run_dir)
                logger.info("plots: %s", ", ".join(str(p) for p in written))
