"""Next-token sampling for the CPU server, matching SGLang's sampler.

SGLang (python/sglang/srt/layers/sampler.py, default settings) divides the
logits by the temperature, takes softmax, samples from the top-k / top-p /
min-p renormalised probabilities, and returns as log-prob `log(probs)` of the
temperature-scaled distribution *before* that filtering. Greedy requests
(temperature 0) are turned into temperature 1 with top_k 1
(sampling_params.py), so their log-probs are those of the raw logits.
"""

from __future__ import annotations

import torch


def sample_next_tokens(
    logits: torch.Tensor,
    *,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    min_p: torch.Tensor,
    generator: torch.Generator | None = None,
    num_top_logprobs: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Sample one token per row.

    Args:
        logits: `[batch, vocab]`, any float dtype (computed in float32).
        temperature: `[batch]`, > 0 (greedy rows already mapped to 1 with top_k 1).
        top_p: `[batch]` in (0, 1].
        top_k: `[batch]` int64, >= 1; `vocab` or more disables it.
        min_p: `[batch]` in [0, 1].
        num_top_logprobs: also return the `k` largest log-probs per row.

    Returns:
        `(tokens [batch] int64, log_probs [batch] float32, top)` where `top` is
        `(values [batch, k], ids [batch, k])` or None.
    """
    log_probs_all = torch.log_softmax(logits.float() / temperature[:, None].float(), dim=-1)
    probs = log_probs_all.exp()
    vocab = probs.shape[-1]
    needs_filter = bool((top_p < 1).any() or (top_k < vocab).any() or (min_p > 0).any())
    if needs_filter:
        sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True)
        cumulative = sorted_probs.cumsum(dim=-1)
        ranks = torch.arange(vocab, device=probs.device)
        # Keep the smallest prefix whose mass reaches top_p (the first token always survives).
        drop = (cumulative - sorted_probs) > top_p[:, None]
        drop |= ranks[None, :] >= top_k[:, None]
        drop |= sorted_probs < sorted_probs[:, :1] * min_p[:, None]
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        tokens = sorted_ids.gather(1, choice).squeeze(1)
    else:
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    log_probs = log_probs_all.gather(1, tokens[:, None]).squeeze(1)
    top = torch.topk(log_probs_all, num_top_logprobs, dim=-1) if num_top_logprobs > 0 else None
    return tokens, log_probs, (None if top is None else (top.values, top.indices))


__all__ = ["sample_next_tokens"]
