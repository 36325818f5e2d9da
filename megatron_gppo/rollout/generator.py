"""Continuous batching over a `transformers` causal LM, one thread, no HTTP.

All running sequences share one left-padded KV cache (`DynamicCache`) and
take one decode step together. New requests are prefilled in their own
padded forward and then merged into the running batch (both caches are
left-padded to a common length); finished rows are dropped and all-padding
leading columns cropped. Explicit `position_ids` and a 2-D attention mask
make every row compute exactly what an unpadded forward would.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from megatron_gppo.rollout.protocol import SequenceRequest, SequenceResult
from megatron_gppo.rollout.sampling import sample_next_tokens

logger = logging.getLogger(__name__)

ABORT_BY_REQUEST = {"type": "abort", "message": "Abort by request"}


@dataclass(eq=False)
class _Row:
    seq: SequenceRequest
    on_done: Callable[[SequenceResult], None]
    start_time: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    output_top: list[tuple[list[float], list[int]]] = field(default_factory=list)
    finish_reason: dict[str, Any] | None = None
    matched_stop_str: str | None = None
    position: int = 0
    """Number of this row's tokens in the KV cache (the position id of the next input token)."""
    rng: torch.Generator | None = None
    """The row's own generator when the request carries a `sampling_seed`."""

    def __post_init__(self) -> None:
        if self.seq.sampling_seed is not None:
            self.rng = torch.Generator().manual_seed(self.seq.sampling_seed)


def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """EOS ids from the generation config, the model config and the tokenizer."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


class Generator:
    """Schedules `SequenceRequest`s onto the model; call `step()` in a loop from a single thread."""

    def __init__(self, *, model: Any, tokenizer: Any, context_length: int, max_running: int = 128,
                 max_prefill_tokens: int = 16384, seed: int = 0, weight_version: str = "default") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.max_running = max_running
        self.max_prefill_tokens = max_prefill_tokens
        self.weight_version = weight_version
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.rng = torch.Generator().manual_seed(seed)
        self.num_generated_tokens = 0
        self._waiting: deque[_Row] = deque()
        self._running: list[_Row] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None  # [running, cache_len] int64
        self._last_tokens: torch.Tensor | None = None  # [running] int64

    # -- requests --------------------------------------------------------------

    def add(self, seq: SequenceRequest, on_done: Callable[[SequenceResult], None]) -> None:
        row = _Row(seq=seq, on_done=on_done)
        if seq.max_new_tokens == 0:
            row.finish_reason = {"type": "length", "length": 0}
            self._finish(row)
        else:
            self._waiting.append(row)

    def abort(self, *, rid_prefix: str = "", rids: set[str] | frozenset[str] = frozenset(),
              abort_all: bool = False) -> int:
        """Abort requests whose rid starts with `rid_prefix` (SGLang's matching), is in `rids`, or all.

        Aborted requests finish with reason `abort` and return their partial output.
        """
        def matches(row: _Row) -> bool:
            rid = row.seq.rid
            return abort_all or rid in rids or (bool(rid_prefix) and rid.startswith(rid_prefix))
        waiting = [row for row in self._waiting if matches(row)]
        self._waiting = deque(row for row in self._waiting if not matches(row))
        for row in waiting:
            row.finish_reason = dict(ABORT_BY_REQUEST)
            self._finish(row)
        running = [i for i, row in enumerate(self._running) if matches(row)]
        for i in running:
            self._running[i].finish_reason = dict(ABORT_BY_REQUEST)
        if running:
            self._drop_finished()
        return len(waiting) + len(running)

    def fail_all(self, message: str) -> None:
        """Finish every request with an abort carrying `message` (after an unexpected error)."""
        for row in [*self._waiting, *self._running]:
            if row.finish_reason is None:
                row.finish_reason = {"type": "abort", "message": message}
            self._finish(row)
        self._waiting.clear()
        self._reset_batch()

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    # -- stepping --------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> bool:
        """One prefill of waiting requests, else one decode step. Returns False when idle."""
        if self._waiting and len(self._running) < self.max_running and (not self._running or self._mergeable()):
            self._prefill()
            return True
        if self._running:
            self._decode()
            return True
        return False

    def _admit(self) -> list[_Row]:
        rows: list[_Row] = []
        budget = self.max_running - len(self._running)
        longest = 0
        while self._waiting and len(rows) < budget:
            longest_next = max(longest, len(self._waiting[0].seq.prompt_ids))
            # Bound the padded prefill size, but always admit at least one request.
            if rows and longest_next * (len(rows) + 1) > self.max_prefill_tokens:
                break
            longest = longest_next
            rows.append(self._waiting.popleft())
        return rows

    def _prefill(self) -> None:
        rows = self._admit()
        lengths = [len(row.seq.prompt_ids) for row in rows]
        width = max(lengths)
        input_ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, width - lengths[i]:] = torch.tensor(row.seq.prompt_ids)
            mask[i, width - lengths[i]:] = 1
            row.position = lengths[i]
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        from transformers import DynamicCache

        cache = DynamicCache()
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True, logits_to_keep=1)
        new_tokens = self._sample(rows, out.logits[:, -1, :])
        self._merge(rows, out.past_key_values, mask, new_tokens)
        self._drop_finished()

    def _decode(self) -> None:
        assert self._mask is not None and self._last_tokens is not None
        rows = self._running
        self._mask = torch.cat([self._mask, torch.ones(len(rows), 1, dtype=torch.long)], dim=1)
        position_ids = torch.tensor([[row.position] for row in rows])
        out = self.model(input_ids=self._last_tokens[:, None], attention_mask=self._mask, position_ids=position_ids,
                         past_key_values=self._cache, use_cache=True)
        self._cache = out.past_key_values
        for row in rows:
            row.position += 1
        self._last_tokens = self._sample(rows, out.logits[:, -1, :])
        self._drop_finished()

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> torch.Tensor:
        """Sample for `rows` from `logits [rows, vocab]`, record tokens and finish checks; returns the tokens."""
        def column(values, dtype):
            return torch.tensor(values, dtype=dtype)
        vocab = logits.shape[-1]
        num_top = max(row.seq.top_logprobs_num for row in rows)
        params = dict(
            temperature=column([row.seq.temperature for row in rows], torch.float32),
            top_p=column([row.seq.top_p for row in rows], torch.float32),
            top_k=column([row.seq.top_k if row.seq.top_k > 0 else vocab for row in rows], torch.long),
            min_p=column([row.seq.min_p for row in rows], torch.float32),
        )
        tokens, log_probs, top = sample_next_tokens(logits, **params, generator=self.rng,
                                                    num_top_logprobs=min(num_top, vocab))
        for i, row in enumerate(rows):
            if row.rng is not None:
                # Seeded rows draw from their own generator, so their samples do not
                # depend on which other requests share the batch.
                one = {name: value[i : i + 1] for name, value in params.items()}
                token, log_prob, _ = sample_next_tokens(logits[i : i + 1], **one, generator=row.rng)
                tokens[i], log_probs[i] = token[0], log_prob[0]
        token_list, log_prob_list = tokens.tolist(), log_probs.tolist()
        for i, row in enumerate(rows):
            row.output_ids.append(token_list[i])
            row.output_logprobs.append(log_prob_list[i])
            if row.seq.top_logprobs_num and top is not None:
                k = row.seq.top_logprobs_num
                row.output_top.append((top[0][i, :k].tolist(), top[1][i, :k].tolist()))
            self._check_finished(row)
        self.num_generated_tokens += len(rows)
        return tokens

    def _check_finished(self, row: _Row) -> None:
        """SGLang's order: length first, then stop tokens, then stop strings."""
        seq, last = row.seq, row.output_ids[-1]
        if (len(row.output_ids) >= seq.max_new_tokens
                or len(seq.prompt_ids) + len(row.output_ids) >= self.context_length):
            row.finish_reason = {"type": "length", "length": len(row.output_ids)}
        elif last in seq.stop_token_ids or (not seq.ignore_eos and last in self.eos_ids):
            row.finish_reason = {"type": "stop", "matched": last}
        elif seq.stop_strs:
            window = max(len(s) for s in seq.stop_strs) + 8  # tokens are at least one character, usually
            tail = self.tokenizer.decode(row.output_ids[-window:], skip_special_tokens=seq.skip_special_tokens)
            for stop in seq.stop_strs:
                if stop in tail:
                    row.finish_reason = {"type": "stop", "matched": stop}
                    row.matched_stop_str = stop
                    break

    # -- batch bookkeeping -----------------------------------------------------

    def _mergeable(self) -> bool:
        """Merging rewrites per-layer key/value tensors; only plain DynamicLayer caches allow it."""
        from transformers.cache_utils import DynamicLayer

        return self._cache is None or all(type(layer) is DynamicLayer for layer in self._cache.layers)

    def _merge(self, rows: list[_Row], cache: Any, mask: torch.Tensor, last_tokens: torch.Tensor) -> None:
        if not self._running:
            self._running, self._cache, self._mask, self._last_tokens = rows, cache, mask, last_tokens
            return
        assert self._mask is not None and self._last_tokens is not None
        width = max(self._mask.shape[1], mask.shape[1])

        def pad_left(x: torch.Tensor, dim: int) -> torch.Tensor:
            missing = width - x.shape[dim]
            if missing == 0:
                return x
            shape = list(x.shape)
            shape[dim] = missing
            return torch.cat([x.new_zeros(shape), x], dim=dim)

        # Keys/values are [batch, kv_heads, seq, head_dim]; padded columns are masked out, so zeros are inert.
        for old, new in zip(self._cache.layers, cache.layers):
            old.keys = torch.cat([pad_left(old.keys, 2), pad_left(new.keys, 2)], dim=0)
            old.values = torch.cat([pad_left(old.values, 2), pad_left(new.values, 2)], dim=0)
        self._mask = torch.cat([pad_left(self._mask, 1), pad_left(mask, 1)], dim=0)
        self._last_tokens = torch.cat([self._last_tokens, last_tokens])
        self._running = self._running + rows

    def _drop_finished(self) -> None:
        keep = [i for i, row in enumerate(self._running) if row.finish_reason is None]
        if len(keep) == len(self._running):
            return
        for row in self._running:
            if row.finish_reason is not None:
                self._finish(row)
        if not keep:
            self._reset_batch()
            return
        assert self._mask is not None and self._last_tokens is not None
        index = torch.tensor(keep)
        self._running = [self._running[i] for i in keep]
        self._cache.batch_select_indices(index)
        self._mask = self._mask[index]
        self._last_tokens = self._last_tokens[index]
        # Columns that are padding for every remaining row only cost attention time.
        leading = int((self._mask.sum(0) == 0).long().cumprod(0).sum())
        if leading and self._mergeable():
            for layer in self._cache.layers:
                layer.keys = layer.keys[:, :, leading:]
                layer.values = layer.values[:, :, leading:]
            self._mask = self._mask[:, leading:]

    def _reset_batch(self) -> None:
        self._running, self._cache, self._mask, self._last_tokens = [], None, None, None

    def _finish(self, row: _Row) -> None:
        assert row.finish_reason is not None
        seq = row.seq
        text = ""
        if self.tokenizer is not None:
            text = self.tokenizer.decode(row.output_ids, skip_special_tokens=seq.skip_special_tokens)
            if row.matched_stop_str and not seq.no_stop_trim:
                text = text[: text.find(row.matched_stop_str)]
        result = SequenceResult(
            output_ids=row.output_ids, output_logprobs=row.output_logprobs, output_top_logprobs=row.output_top,
            finish_reason=row.finish_reason, weight_version=self.weight_version, text=text,
            e2e_latency=time.monotonic() - row.start_time)
        try:
            row.on_done(result)
        except Exception:  # a broken callback must not take the batch down
            logger.exception("on_done callback failed for %s", seq.rid)


__all__ = ["ABORT_BY_REQUEST", "Generator", "eos_token_ids"]
