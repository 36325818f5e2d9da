"""The CE-GPPO training loop.

One step, on every rank of the job:

    rollout -> reward -> group advantages -> dynamic sampling   (driver, rank 0)
    -> broadcast the batch -> old log-prob recompute -> CE-GPPO update(s)
    -> weight sync to the rollout servers -> metrics, eval, checkpoint

The driver (global rank 0) owns the prompts, the rollout engine, the reward
and the logs (`Driver` in driver.py); every rank holds its part of the Megatron
policy. Restarted on the same `train.output_dir`, a run resumes from its
latest complete checkpoint. A local rollout server that died is restarted and
gets the current weights before it generates again; a fault the run cannot
get past (a server that does not come back, non-finite steps in a row)
checkpoints the last finished step and ends the run with one line
(`errors.RunAborted`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, NoReturn

import torch
import torch.distributed as dist

from megatron_gppo.algorithm import combine_metrics, loss_kwargs
from megatron_gppo.batching import PolicyBatch
from megatron_gppo.config import RunConfig
from megatron_gppo.driver import SERVERS_RESTARTED, Driver, RolloutBatch, setup_policy
from megatron_gppo.errors import RunAborted
from megatron_gppo.model.arch import ModelArch
from megatron_gppo.model.policy import Policy
from megatron_gppo.model.rewind import TrainingSnapshot
from megatron_gppo.packing import rank_batch

logger = logging.getLogger(__name__)

# Weight syncs in a row that may find a rollout server died (and restart it) before the run gives up.
MAX_SYNC_ATTEMPTS = 3


def loss_hparams(config: RunConfig, *, beta1: float, beta2: float) -> dict:
    """Keyword arguments of `compute_policy_loss` for the configured loss (null keys keep its defaults)."""
    alg = config.algorithm
    return loss_kwargs(alg.loss, aggregation=alg.aggregation, entropy_coef=alg.entropy_coef, nll_coef=alg.nll_coef,
                       tis_cap=alg.tis_cap, eps_low=alg.eps_low, eps_high=alg.eps_high,
                       dual_clip_c=alg.dual_clip_c, beta1=beta1, beta2=beta2)


def rank_layout(policy: Policy, config: RunConfig) -> dict:
    """`rank_batch`'s keyword arguments for this rank (all but num_minibatches)."""
    from megatron.core import parallel_state

    train = config.train
    return {"dp_rank": parallel_state.get_data_parallel_rank(), "dp_size": policy.dims.dp,
            "micro_batch_size": train.micro_batch_size, "pack": train.pack_sequences,
            "max_tokens_per_micro_batch": train.max_tokens_per_micro_batch,
            # Sequence parallelism splits every row's tokens over the TP ranks.
            "seq_multiple": policy.dims.tp if policy.dims.sequence_parallel else 1}


def _sum_over_dp(values: list[float], policy: Policy) -> list[float]:
    from megatron.core import parallel_state

    tensor = torch.tensor(values, dtype=torch.float64, device=policy.device)
    dist.all_reduce(tensor, group=parallel_state.get_data_parallel_group())
    return tensor.tolist()


def rollout_mismatch(batch: PolicyBatch, *, train_log_probs: torch.Tensor, policy: Policy) -> dict[str, float]:
    """How far the trainer's log-probs are from the rollout engine's on the same tokens (global over DP)."""
    mask = batch.loss_mask.to(train_log_probs.device)
    diff = (train_log_probs - batch.rollout_log_probs.to(train_log_probs.device))[mask]
    # k3 estimator of KL(rollout || train): non-negative, low variance.
    kl = (torch.exp(diff) - 1 - diff).sum()
    total_abs, total_kl, count = _sum_over_dp([float(diff.abs().sum()), float(kl), float(mask.sum())], policy)
    count = max(count, 1.0)
    return {"rollout_logprob_abs_diff": total_abs / count, "rollout_kl": total_kl / count}


def masked_mean_over_dp(values: torch.Tensor, mask: torch.Tensor, policy: Policy) -> float:
    total, count = _sum_over_dp([float(values[mask].sum()), float(mask.sum())], policy)
    return total / max(count, 1.0)


def train_on_batch(policy: Policy, rollouts: RolloutBatch, *, config: RunConfig) -> dict[str, float]:
    """Old log-prob recompute, then `num_epochs` x `num_minibatches` optimizer steps; returns metrics."""
    mine = rank_batch(rollouts.batch, num_minibatches=config.train.num_minibatches, **rank_layout(policy, config))
    batch, micro_batch_size = mine.batch, mine.rows_per_micro_batch
    temperature = config.rollout.temperature

    old_log_probs, entropy, sensitivity = policy.compute_token_stats(batch, temperature=temperature,
                                                                     micro_batch_size=micro_batch_size)
    # What the sampling policy was like, measured on its own samples before the update.
    sampled = rollout_mismatch(batch, train_log_probs=old_log_probs, policy=policy)
    sampled["entropy"] = masked_mean_over_dp(entropy, batch.loss_mask.to(entropy.device), policy)

    batch = replace(batch, old_log_probs=old_log_probs.cpu(), entropy_sensitivity=sensitivity.cpu(),
                    rollout_log_probs=batch.rollout_log_probs if config.algorithm.tis_cap is not None else None)

    def update(hparams: dict) -> list:
        return [policy.forward_backward_step(batch.rows(minibatch), loss_name=config.algorithm.loss,
                                             loss_hparams=hparams, temperature=temperature,
                                             micro_batch_size=micro_batch_size)
                for _ in range(config.train.num_epochs) for minibatch in mine.minibatches]

    def entropy_now() -> float:
        _, values = policy.compute_log_probs(batch, temperature=temperature, micro_batch_size=micro_batch_size)
        return masked_mean_over_dp(values, batch.loss_mask.to(values.device), policy)

    hparams = loss_hparams(config, beta1=rollouts.beta1, beta2=rollouts.beta2)
    beta_step = config.logging.realized_sensitivity_beta_step
    what_if = realized_entropy_after(policy, update=update, entropy_now=entropy_now, hparams=hparams,
                                     beta_step=beta_step) if beta_step else {}
    updates = update(hparams)
    if config.logging.realized_entropy_change or what_if:
        after = entropy_now()
        sampled["realized_entropy_change"] = after - sampled["entropy"]
        for beta, entropy_with_more in what_if.items():
            sampled[f"realized_entropy_sensitivity_{beta}"] = (entropy_with_more - after) / beta_step
    applied = [r for r in updates if r.update_successful] or updates
    return {
        **combine_metrics(result.metrics for result in updates),
        # After the loss's metrics: with an entropy bonus the loss also reports the entropy it saw
        # mid-update, and the step's `entropy` is the sampling policy's.
        **sampled,
        "loss": sum(r.loss for r in applied) / len(applied),
        "grad_norm": sum(r.grad_norm for r in applied) / len(applied),
        "lr": updates[-1].lr,
        "num_updates": float(len(updates)),
        "skipped_steps": float(len(updates) - sum(r.update_successful for r in updates)),
    }


def realized_entropy_after(policy: Policy, *, update: Callable[[dict], list], entropy_now: Callable[[], float],
                           hparams: dict, beta_step: float) -> dict[str, float]:
    """The entropy the step's samples would have after its updates with beta1 (then beta2) raised by `beta_step`.

    Each what-if runs the step's real updates (same batch, optimizer, clipping,
    lr schedule) from a snapshot of the weights and optimizer state, which is
    restored afterwards, so the real updates that follow are unchanged. Where
    `predicted_entropy_change` is first order in a step on the logits, this
    sees what a beta does through shared weights, Adam and gradient clipping,
    for this step's samples. Collective over the job.
    """
    snapshot = TrainingSnapshot.take(chunks=policy.model, optimizer=policy.optimizer, scheduler=policy.scheduler)
    entropy_after = {}
    for beta in ("beta1", "beta2"):
        update({**hparams, beta: hparams[beta] + beta_step})
        entropy_after[beta] = entropy_now()
        snapshot.restore(scheduler=policy.scheduler)
    return entropy_after


def from_driver(value):
    """The driver's (rank 0's) `value` on every rank (pickled; rollout batches are small next to weights)."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run(config: RunConfig) -> None:
    """Train until `train.max_steps` or a stop request; the whole job calls this (torchrun, srun or one process)."""
    started = time.monotonic()
    policy, arch, start_step, extra = setup_policy(config, resume=config.checkpoint.resume)
    driver = (Driver(config, arch=arch, start_step=start_step, extra=extra, started=started)
              if dist.get_rank() == 0 else None)
    try:
        # The servers start from the HF weights on disk; after a resume (or from a
        # megatron checkpoint) they must get the policy's actual weights first.
        if failure := sync_weights(policy, driver, arch=arch, version=f"step-{start_step}"):
            raise RunAborted(failure)
        if driver is not None and start_step == 0:
            driver.maybe_evaluate(0, force=True)  # the starting point; a resumed run logged its evals already
        saved_step, step_time_s = start_step, 0.0
        for step in range(start_step + 1, config.train.max_steps + 1):
            # Every rank must leave the loop at the same boundary, so the driver decides for all.
            failure, reason = from_driver((driver.failure(), driver.stop_reason(next_step_s=step_time_s))
                                          if driver is not None else None)
            if failure:
                abort(policy, driver, config=config, step=step - 1, saved_step=saved_step, reason=failure)
            if reason:
                if saved_step < step - 1:
                    save(policy, driver, config=config, step=step - 1)
                if driver is not None:
                    logger.info("stopped after step %d (%s); checkpoint saved. To resume, delete %s and rerun the "
                                "same command (the Slurm launchers do both)", step - 1, reason, driver.stop_file)
                break
            step_started = time.monotonic()
            rollouts = from_driver(driver.collect_rollouts(step) if driver is not None else None)
            while rollouts == SERVERS_RESTARTED:  # they serve the initial weights: sync, then ask again
                failure = sync_weights(policy, driver, arch=arch, version=f"step-{step - 1}")
                rollouts = failure or from_driver(driver.collect_rollouts(step) if driver is not None else None)
            if isinstance(rollouts, str):
                abort(policy, driver, config=config, step=step - 1, saved_step=saved_step, reason=rollouts)
            metrics = {**rollouts.metrics, **train_on_batch(policy, rollouts, config=config)}
            if config.rollout.colocate and torch.cuda.is_available():
                torch.cuda.empty_cache()  # give cached training memory back before the servers resume theirs
            failure = sync_weights(policy, driver, arch=arch, version=f"step-{step}")
            metrics["step_time_s"] = time.monotonic() - step_started
            if driver is not None:
                driver.finish_step(step, metrics)
            if failure:
                abort(policy, driver, config=config, step=step, saved_step=saved_step, reason=failure)
            last = step == config.train.max_steps
            if last and config.train.export_hf:
                # Before the final checkpoint: a run stopped in between redoes its last steps and this export.
                export_policy(policy, arch=arch, config=config)
            if last or (config.checkpoint.save_every and step % config.checkpoint.save_every == 0):
                save(policy, driver, config=config, step=step)
                saved_step = step
            step_time_s = time.monotonic() - step_started
    finally:
        if driver is not None:
            driver.close()


def sync_weights(policy: Policy, driver: Driver | None, *, arch: ModelArch, version: str) -> str:
    """Stream the policy's weights, Hugging Face-named, to the rollout servers (collective over the job).

    Again when a local server died during it and was restarted. Returns '' or, on every rank, why it failed.
    """
    from megatron_gppo.checkpoint.live import iter_hf_tensors

    for _attempt in range(MAX_SYNC_ATTEMPTS):
        tensors = iter_hf_tensors(policy.chunks, arch=arch, all_stages=True)
        if driver is not None:
            status = driver.update_weights(tensors, version=version)
        else:
            for _ in tensors:  # take part in the gathers; only rank 0 sends
                pass
            status = None
        status = from_driver(status)
        if status != SERVERS_RESTARTED:
            return status
    return f"weight sync {version}: rollout servers kept dying ({MAX_SYNC_ATTEMPTS} attempts)"


def abort(policy: Policy, driver: Driver | None, *, config: RunConfig, step: int, saved_step: int,
          reason: str) -> NoReturn:
    """Checkpoint `step` (unless it is already saved) and stop the run, on every rank, with one line."""
    if saved_step < step:
        save(policy, driver, config=config, step=step)
    raise RunAborted(f"stopped after step {step}: {reason}; its checkpoint is saved")


def export_policy(policy: Policy, *, arch: ModelArch, config: RunConfig) -> None:
    """The trained policy as a Hugging Face model in `train.output_dir/hf` (collective over the job)."""
    from megatron_gppo.checkpoint.live import export_hf

    hf_dir = export_hf(policy.chunks, arch=arch, output_dir=Path(config.train.output_dir) / "hf",
                       copy_files_from=config.model.hf_path)
    logger.info("policy written as a Hugging Face model to %s (try: megatron-gppo serve --model-path %s)",
                hf_dir, hf_dir)


def save(policy: Policy, driver: Driver | None, *, config: RunConfig, step: int) -> None:
    from megatron_gppo.checkpoint.training import save_training_checkpoint

    save_training_checkpoint(
        config.train.output_dir, step=step, model=policy.model, optimizer=policy.optimizer,
        scheduler=policy.scheduler, extra=driver.state_dict() if driver is not None else {},
        config=config, hf_dir=config.model.hf_path, keep_last=config.checkpoint.keep_last,
    )
