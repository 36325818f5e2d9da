"""Reference ("unfused") vocab-parallel log-probs and entropy: full logits, megatron's cross entropy.

Same signature and gradient contract as the fused
`megatron_gppo.model.logprobs.vocab_parallel_log_probs` (the gradient that
reaches `hidden` is already summed over the TP group), but it materialises
`[tokens, vocab/TP]` fp32 logits and uses megatron's
`tensor_parallel.vocab_parallel_cross_entropy`. It exists to check the fused
kernel end to end (the RL loss and gradients must not depend on which one
runs) and as a fallback; it costs vocab/TP x tokens x 4 bytes of memory.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel


def unfused_vocab_parallel_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    tp_group=None,
    chunk_size: int | None = None,
    with_entropy: bool = True,
    vocab_size: int | None = None,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(labels) and entropy of softmax(hidden @ weight.T / temperature), `[tokens]` fp32 each.

    Args:
        hidden: `[tokens, hidden]`, replicated on the TP group.
        weight: `[vocab/TP, hidden]`, this rank's rows of the output layer.
        labels: `[tokens]` global ids; `ignore_index` gives log-prob 0 and entropy 0.
        tp_group: megatron's tensor-parallel group (None on one process).
        chunk_size: ignored (the logits are materialised whole).
        vocab_size: true vocab size; rows at or beyond it (padding) are excluded.
    """
    del chunk_size
    tp_rank = 0 if tp_group is None else dist.get_rank(tp_group)
    if tp_group is not None:
        assert tp_group == parallel_state.get_tensor_model_parallel_group(), "megatron's CE uses mpu's TP group"
        # Identity forward; all-reduces the hidden gradient (each rank only sees its vocab slice).
        hidden = tensor_parallel.copy_to_tensor_model_parallel_region(hidden, group=tp_group)
    logits = (hidden.float() @ weight.float().t()) / temperature  # [tokens, vocab/TP]
    num_rows = weight.shape[0]
    padded = torch.arange(num_rows, device=logits.device) + tp_rank * num_rows >= (vocab_size or 1 << 62)
    logits = logits.masked_fill(padded, float("-inf"))
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, 0)

    if tp_group is None:
        log_probs = torch.log_softmax(logits, dim=-1).gather(1, safe_labels.unsqueeze(1)).squeeze(1)
    else:
        # It works on its input in place, hence the clone (the logits are reused for the entropy).
        log_probs = -tensor_parallel.vocab_parallel_cross_entropy(logits.clone(), safe_labels)
    log_probs = torch.where(valid, log_probs, 0.0)
    if not with_entropy:
        return log_probs, None

    def all_sum(x: torch.Tensor) -> torch.Tensor:
        if tp_group is None:
            return x
        return tensor_parallel.reduce_from_tensor_model_parallel_region(x, group=tp_group)

    logits_max = logits.detach().amax(dim=-1)
    if tp_group is not None:
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=tp_group)
    shifted = logits - logits_max.unsqueeze(1)
    exp = shifted.exp()
    # H = log S - T / S with S = sum exp(z - m), T = sum exp(z - m) (z - m). Only the
    # two sums are all-reduced, and everything after them is replicated, so the
    # all-reduce's identity backward is exact (normalising per rank first would
    # miss the other ranks' dependence on S). Padded columns (z = -inf, exp = 0)
    # get z = 0 first: 0 * -inf would put NaN into the forward and the backward.
    sum_exp = all_sum(exp.sum(dim=-1))
    sum_exp_z = all_sum((exp * shifted.masked_fill(padded, 0.0)).sum(dim=-1))
    entropy = sum_exp.log() - sum_exp_z / sum_exp
    return log_probs, torch.where(valid, entropy, 0.0)


__all__ = ["unfused_vocab_parallel_log_probs"]
