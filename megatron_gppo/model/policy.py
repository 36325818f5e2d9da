"""The Megatron policy: RL forward-backward through the pipeline schedule, optimizer step, log-probs.

Every rank of a model-parallel group (all TP and PP ranks of one data-parallel
replica) calls the same method with the same `PolicyBatch`: the sequences of
its data-parallel rank. Per-token tensors are `[B, T]` and aligned with
`tokens`: entry `t` is about token `t`, predicted from `tokens[:, :t]`.

One training step (`forward_backward_step`):

1. Count the loss normalisers (mask tokens, sequences, positive ones) of the
   local batch and all-reduce them over data-parallel ranks, so every
   micro-batch loss is `sum(micro-batch) / global count`: the exact
   whole-batch token mean however the batch is split.
2. Split the batch into equal micro-batches (padding with fully masked rows)
   and run megatron's schedule (`get_forward_backward_func`: no pipelining,
   1F1B or interleaved). `forward_step` runs a model chunk; on the last stage
   its `loss_func` turns final hidden states into per-token log-probs and
   entropy (fused vocab-parallel kernel, or the unfused reference) and calls
   the policy-loss registry.
3. megatron's optimizer step (grad clipping, AdamW, lr schedule).

`compute_log_probs` runs the same forward without gradients (old-policy
recompute) and gives every rank of the pipeline the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.utils import get_attr_wrapped_model

from megatron_gppo import packing
from megatron_gppo.algorithm import diagnostics
from megatron_gppo.algorithm.losses import compute_policy_loss, loss_normalizers
from megatron_gppo.batching import PolicyBatch
from megatron_gppo.config import ModelConfig, TrainConfig
from megatron_gppo.model.arch import ModelArch
from megatron_gppo.model.logprobs import vocab_parallel_log_probs, vocab_parallel_softmax_moments
from megatron_gppo.model.optimizer import (
    StepStats,
    build_optimizer,
    build_scheduler,
    optimizer_step,
    wrap_ddp,
    zero_grads,
)
from megatron_gppo.model.parallel import ParallelDims
from megatron_gppo.model.provider import PolicyGPTModel, build_model_chunks, has_transformer_engine
from megatron_gppo.model.unfused_logprobs import unfused_vocab_parallel_log_probs
from megatron_gppo.model.weights import load_full_state_dict

LogProbFn = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


_CPU = torch.device("cpu")


@dataclass(frozen=True, kw_only=True)
class TrainStepResult:
    loss: float
    """The global loss: sum over all micro-batches and data-parallel ranks."""
    grad_norm: float
    """Global gradient norm before clipping."""
    lr: float
    """Learning rate this step used."""
    update_successful: bool
    metrics: dict[str, float] = field(default_factory=dict)
    """compute_policy_loss metrics combined exactly over micro-batches and ranks."""


def _place(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`[n]` values of the mask tokens -> `[b, T]`, 0 elsewhere."""
    return torch.zeros(mask.shape, dtype=values.dtype, device=values.device).masked_scatter(mask.bool(), values)


class Policy:
    """This rank's part of the policy: model chunks in megatron DDP, optimizer, lr schedule.

    Build after `init_distributed`. `model` holds the DDP-wrapped chunks (one
    per virtual pipeline stage), `chunks` the bare `PolicyGPTModel`s.
    """

    def __init__(self, *, arch: ModelArch, dims: ParallelDims, model: ModelConfig, train: TrainConfig):
        self.arch = arch
        self.dims = dims
        chunks = build_model_chunks(arch, dims, model=model)
        self.config = chunks[0].config
        self.model = wrap_ddp(chunks, config=self.config, train=train)
        self.optimizer = build_optimizer(self.model, train=train, config=self.config)
        self.scheduler = build_scheduler(self.optimizer, train=train)
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else _CPU
        # How packed rows reach attention: THD sequences for Transformer Engine, else a block-diagonal mask.
        self.packed_thd = has_transformer_engine()

    @property
    def chunks(self) -> list[PolicyGPTModel]:
        return [chunk.module for chunk in self.model]

    def load_full_state_dict(self, full: Mapping[str, torch.Tensor]) -> None:
        """Load this rank's shards of a full (TP=1, global layer numbers) megatron state dict."""
        load_full_state_dict(self.chunks, full)
        # Mixed-precision / distributed optimizers keep their own fp32 copy of the weights.
        self.optimizer.reload_model_params()

    # ------------------------------------------------------------------ training

    def forward_backward_step(self, batch: PolicyBatch, **forward_backward_args: Any) -> TrainStepResult:
        """One optimizer step on `batch`: `forward_backward(batch, **forward_backward_args)`, then `step()`."""
        loss, metrics = self.forward_backward(batch, **forward_backward_args)
        stats = self.step(loss=loss)
        return TrainStepResult(loss=loss, grad_norm=stats.grad_norm, lr=stats.lr,
                               update_successful=stats.update_successful, metrics=metrics)

    def forward_backward(
        self,
        batch: PolicyBatch,
        *,
        loss_name: str,
        loss_hparams: Mapping[str, Any] | None = None,
        temperature: float = 1.0,
        micro_batch_size: int,
        fused: bool = True,
    ) -> tuple[float, dict[str, float]]:
        """Zero the grads and accumulate those of the RL loss of `batch`; no optimizer step.

        Args:
            batch: this data-parallel rank's sequences, with advantages and old log-probs.
            loss_name: a policy loss of `megatron_gppo.algorithm.losses` (e.g. "ce_gppo").
            loss_hparams: its keyword arguments (eps_low, beta1, entropy_coef, aggregation, tis_cap, ...);
                the normalisers are computed here.
            temperature: the rollout's sampling temperature (log-probs use the same one).
            micro_batch_size: sequences per micro-batch.
            fused: fused vocab-parallel log-probs (default) or the unfused reference.

        Returns:
            The global loss (over all data-parallel ranks) and combined metrics, on every rank.
        """
        if batch.advantages is None or batch.old_log_probs is None:
            raise ValueError("forward_backward needs batch.advantages and batch.old_log_probs")
        batch = batch.to(self.device)
        normalizers = self._global_normalizers(batch)
        micro_batches = self._micro_batches(batch, micro_batch_size)
        loss_func = partial(
            self._rl_loss,
            loss_name=loss_name,
            loss_kwargs={**(loss_hparams or {}), **normalizers},
            # The schedule divides each returned loss by the number of micro-batches and
            # DDP averages gradients over data-parallel ranks, while our micro-batch losses
            # are already fractions of the global normaliser: undo both.
            loss_scale=len(micro_batches) * self.dims.dp,
            temperature=temperature,
            fused=fused,
        )
        zero_grads(self.model, self.optimizer)
        for chunk in self.model:
            chunk.train()
        outputs = self._run_schedule(micro_batches, loss_func, forward_only=False)
        return self._combine_loss_outputs(outputs)

    def step(self, *, loss: float) -> StepStats:
        """Clip, apply the accumulated gradients and advance the lr schedule; on every rank nothing
        changes when `loss` or a gradient is not finite (`update_successful=False`)."""
        return optimizer_step(self.optimizer, self.scheduler, chunks=self.model, loss=loss)

    # ------------------------------------------------------------------ log-probs

    @torch.no_grad()
    def compute_log_probs(
        self,
        batch: PolicyBatch,
        *,
        temperature: float = 1.0,
        micro_batch_size: int,
        with_entropy: bool = True,
        fused: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-token log-probs (and entropy) of `batch.tokens` where `batch.loss_mask` is set.

        Returns `[B, T]` fp32 tensors (0 outside the mask) on every rank of the
        model-parallel group, for this data-parallel rank's sequences.
        """

        def per_token(hidden, *, mb, chunk):
            log_probs, entropy = self._token_log_probs(hidden, mb=mb, chunk=chunk, temperature=temperature,
                                                       with_entropy=with_entropy, fused=fused)
            return [log_probs] + ([entropy] if with_entropy else [])

        outputs = self._collect_per_token(batch, per_token, num_channels=1 + with_entropy,
                                          micro_batch_size=micro_batch_size)
        return outputs[0], (outputs[1] if with_entropy else None)

    @torch.no_grad()
    def compute_token_stats(
        self, batch: PolicyBatch, *, temperature: float = 1.0, micro_batch_size: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-token log-probs, entropy and entropy sensitivity S_t (`diagnostics.entropy_sensitivity`).

        One forward pass with the fused op's two extra vocabulary moments;
        `[B, T]` fp32 each, 0 outside the mask, on every model-parallel rank.
        """

        def per_token(hidden, *, mb, chunk):
            rows, labels = self._scored_rows(hidden, mb=mb)
            moments = vocab_parallel_softmax_moments(
                rows, chunk.output_weight(), labels, temperature=temperature, tp_group=self._tp_group(),
                vocab_size=chunk.vocab_size_unpadded)
            sensitivity = diagnostics.entropy_sensitivity(
                log_probs=moments.log_probs, entropy=moments.entropy, sum_p2=moments.sum_p2,
                sum_p2_log_p=moments.sum_p2_log_p)
            return [_place(values, mb.loss_mask) for values in (moments.log_probs, moments.entropy, sensitivity)]

        log_probs, entropy, sensitivity = self._collect_per_token(batch, per_token, num_channels=3,
                                                                  micro_batch_size=micro_batch_size)
        return log_probs, entropy, sensitivity

    # ------------------------------------------------------------------ internals

    def _global_normalizers(self, batch: PolicyBatch) -> dict[str, float]:
        samples = packing.per_sample(batch)
        local = loss_normalizers(loss_mask=samples.loss_mask, advantages=samples.advantages)
        counts = torch.tensor(list(local.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(counts, group=parallel_state.get_data_parallel_group())
        return dict(zip(local, counts.tolist(), strict=True))

    def _micro_batches(self, batch: PolicyBatch, micro_batch_size: int) -> list[PolicyBatch]:
        """Equal `[micro_batch_size, T']` micro-batches (the pipeline sends fixed shapes).

        Rows are padded to whole micro-batches, and, for the interleaved schedule,
        to a multiple of PP micro-batches; T is padded to a multiple of TP under
        sequence parallelism. Padding is masked out.
        """
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        num_rows, seq_len = batch.tokens.shape
        num_micro = max(1, -(-num_rows // micro_batch_size))
        if self.dims.vpp > 1:
            num_micro = -(-num_micro // self.dims.pp) * self.dims.pp
        if self.dims.sequence_parallel:
            seq_len = -(-seq_len // self.dims.tp) * self.dims.tp
        batch = batch.padded(num_rows=num_micro * micro_batch_size, seq_len=seq_len)
        return [batch.rows(slice(i * micro_batch_size, (i + 1) * micro_batch_size)) for i in range(num_micro)]

    def _run_schedule(self, micro_batches: list[PolicyBatch], loss_func: Callable, *, forward_only: bool) -> list:
        """megatron's pipeline schedule over `micro_batches`; returns the last stage's loss outputs."""

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            # [s, b, h] hidden states ([s/TP, b, h] under sequence parallel; s = b * T, b = 1 for THD).
            tokens, positions, attention_mask, packed_seq_params = self._model_inputs(mb)
            hidden = model(tokens, positions, attention_mask, packed_seq_params=packed_seq_params)
            chunk = get_attr_wrapped_model(model, "output_weight", return_model_obj=True)
            return hidden, partial(loss_func, mb=mb, chunk=chunk)

        # Each model chunk walks the micro-batches in order with its own iterator.
        iterators = [iter(micro_batches) for _ in self.model]
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=self.model,
            num_microbatches=len(micro_batches),
            seq_length=micro_batches[0].tokens.shape[1],
            micro_batch_size=micro_batches[0].tokens.shape[0],
            forward_only=forward_only,
        )

    def _model_inputs(self, mb: PolicyBatch) -> tuple:
        """GPTModel's tokens, position ids, attention mask and packed-sequence params (THD only)."""
        if mb.segment_ids is None:
            positions = torch.arange(mb.tokens.shape[1], device=mb.tokens.device).expand_as(mb.tokens)
            return mb.tokens, positions, None, None  # attention_mask None: the layers' causal mask type builds it
        positions = packing.segment_positions(mb.segment_ids)
        if not self.packed_thd:
            # megatron's local attention takes an explicit mask (True = masked) instead of its causal one.
            return mb.tokens, positions, packing.block_causal_mask(mb.segment_ids), None
        # Transformer Engine: the micro-batch's rows become one THD sequence of runs.
        from megatron.core.packed_seq_params import PackedSeqParams

        cu_seqlens = packing.cu_seqlens(mb.segment_ids)
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                                 max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen)
        return mb.tokens.reshape(1, -1), positions.reshape(1, -1), None, params

    def _tp_group(self):
        return parallel_state.get_tensor_model_parallel_group() if self.dims.tp > 1 else None

    def _scored_rows(self, hidden: torch.Tensor, *, mb: PolicyBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """`[n, h]` hidden states that predict the `[n]` scored tokens of `mb`, from `[s, b, h]` hidden states."""
        if self.dims.sequence_parallel:
            # The log-prob op already returns the TP-summed hidden gradient, so the
            # backward of this gather must only split it (not reduce-scatter again).
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        # Position t-1 predicts token t: only the rows feeding a masked token are scored.
        predicts = mb.loss_mask[:, 1:]  # [b, T-1]
        rows = hidden.transpose(0, 1).reshape(*mb.tokens.shape, -1)[:, :-1][predicts]  # [n, h]
        return rows, mb.tokens[:, 1:][predicts]

    def _token_log_probs(
        self, hidden: torch.Tensor, *, mb: PolicyBatch, chunk: PolicyGPTModel, temperature: float,
        with_entropy: bool, fused: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`[b, T]` log-probs and entropy at `mb.loss_mask`, 0 elsewhere, from `[s, b, h]` hidden states."""
        rows, labels = self._scored_rows(hidden, mb=mb)
        log_prob_fn: LogProbFn = vocab_parallel_log_probs if fused else unfused_vocab_parallel_log_probs
        log_probs, entropy = log_prob_fn(
            rows, chunk.output_weight(), labels, temperature=temperature, tp_group=self._tp_group(),
            with_entropy=with_entropy, vocab_size=chunk.vocab_size_unpadded,
        )
        return _place(log_probs, mb.loss_mask), (_place(entropy, mb.loss_mask) if with_entropy else None)

    def _collect_per_token(self, batch: PolicyBatch, per_token: Callable, *, num_channels: int,
                           micro_batch_size: int) -> list[torch.Tensor]:
        """`per_token(hidden, mb=, chunk=)`'s `num_channels` `[b, T]` tensors of every micro-batch, as `[B, T]`.

        On every rank of the model-parallel group (the pipeline's last stage computes them).
        """
        batch = batch.to(self.device)
        micro_batches = self._micro_batches(batch, micro_batch_size)

        def loss_func(hidden, *, mb, chunk):
            return torch.zeros((), device=hidden.device), {"values": per_token(hidden, mb=mb, chunk=chunk)}

        for chunk in self.model:
            chunk.eval()
        outputs = self._run_schedule(micro_batches, loss_func, forward_only=True)
        num_rows, seq_len = batch.tokens.shape
        shape = (len(micro_batches) * micro_batch_size, micro_batches[0].tokens.shape[1])
        result = torch.zeros((num_channels, *shape), dtype=torch.float32, device=self.device)
        if parallel_state.is_pipeline_last_stage():
            for channel in range(num_channels):
                result[channel] = torch.cat([out["values"][channel] for out in outputs])
        if self.dims.pp > 1:
            dist.broadcast(result, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                           group=parallel_state.get_pipeline_model_parallel_group())
        return list(result[:, :num_rows, :seq_len])

    def _rl_loss(
        self, hidden: torch.Tensor, *, mb: PolicyBatch, chunk: PolicyGPTModel, loss_name: str,
        loss_kwargs: dict[str, Any], loss_scale: float, temperature: float, fused: bool,
    ):
        # The entropy costs extra vocabulary reductions; compute it only for the entropy bonus.
        with_entropy = loss_kwargs.get("entropy_coef", 0) != 0
        log_probs, entropy = self._token_log_probs(
            hidden, mb=mb, chunk=chunk, temperature=temperature, with_entropy=with_entropy, fused=fused)
        if mb.segment_ids is not None:
            # The losses read rows as sequences (seq-mean aggregations, GSPO's ratio, sequence counts).
            index = packing.SampleIndex.of(mb.segment_ids)
            log_probs, mb = index.unpack(log_probs), index.unpack_batch(mb)
            entropy = index.unpack(entropy) if with_entropy else None
        loss, metrics = compute_policy_loss(
            loss_name,
            log_probs=log_probs,
            old_log_probs=mb.old_log_probs,
            advantages=mb.advantages,
            loss_mask=mb.loss_mask,
            entropy=entropy,
            rollout_log_probs=mb.rollout_log_probs,
            entropy_sensitivity=mb.entropy_sensitivity,
            **loss_kwargs,
        )
        # A new tensor: the schedule divides the returned loss in place.
        return loss * loss_scale, {"loss": loss.detach(), "metrics": metrics}

    def _combine_loss_outputs(self, outputs: list[dict]) -> tuple[float, dict[str, float]]:
        """Sum the loss and combine metrics over micro-batches and DP ranks; give them to every PP rank."""
        payload = None
        if parallel_state.is_pipeline_last_stage():
            local = (
                float(sum(out["loss"] for out in outputs)),
                diagnostics.combine_metrics(out["metrics"] for out in outputs),
            )
            gathered = [None] * self.dims.dp
            dist.all_gather_object(gathered, local, group=parallel_state.get_data_parallel_group())
            payload = [sum(loss for loss, _ in gathered), diagnostics.combine_metrics(m for _, m in gathered)]
        if self.dims.pp > 1:
            box = [payload]
            dist.broadcast_object_list(box, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                       group=parallel_state.get_pipeline_model_parallel_group())
            payload = box[0]
        loss, metrics = payload
        return loss, metrics


__all__ = ["Policy", "PolicyBatch", "TrainStepResult"]
