"""The fused vocab-parallel log-prob / entropy op on CUDA against naive autograd: values, gradients, time.

Prints one `FIGURE {json}` line per dtype (tools/gpu_check.sh collects them): the
best of three forward + backward times of each path and their ratio.
"""

import json
import time

import pytest
import torch

from megatron_gppo.model.logprobs import vocab_parallel_log_probs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

NUM_TOKENS, HIDDEN, VOCAB = 4096, 896, 151_936
# Max abs difference of log-probs / entropy, and of gradients relative to their largest entry.
TOLERANCE = {torch.float32: (2e-3, 2e-3), torch.bfloat16: (5e-2, 5e-2)}


def naive(hidden, weight, labels):
    log_p = torch.log_softmax((hidden @ weight.t()).float(), dim=-1)
    return log_p.gather(1, labels.unsqueeze(1)).squeeze(1), -(log_p.exp() * log_p).sum(-1)


def fused(hidden, weight, labels):
    return vocab_parallel_log_probs(hidden, weight, labels)


def forward_backward(op, hidden, weight, labels, w1, w2):
    hidden = hidden.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    torch.cuda.synchronize()
    start = time.perf_counter()
    log_probs, entropy = op(hidden, weight, labels)
    ((log_probs * w1).sum() + (entropy * w2).sum()).backward()
    torch.cuda.synchronize()
    return time.perf_counter() - start, log_probs.detach(), entropy.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_op_matches_naive_on_cuda(dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(NUM_TOKENS, HIDDEN, device="cuda", generator=gen).to(dtype)
    weight = (torch.randn(VOCAB, HIDDEN, device="cuda", generator=gen) * HIDDEN ** -0.5).to(dtype)
    labels = torch.randint(0, VOCAB, (NUM_TOKENS,), device="cuda", generator=gen)
    w1, w2 = torch.randn(NUM_TOKENS, device="cuda", generator=gen), torch.randn(NUM_TOKENS, device="cuda", generator=gen)
    runs = {name: [forward_backward(op, hidden, weight, labels, w1, w2) for _ in range(3)]
            for name, op in (("naive", naive), ("fused", fused))}
    (_, *expected), (_, *got) = runs["naive"][-1], runs["fused"][-1]
    value_tol, grad_tol = TOLERANCE[dtype]
    for name, want, have in zip(("log_probs", "entropy"), expected[:2], got[:2]):
        assert (want.float() - have.float()).abs().max().item() <= value_tol, name
    for name, want, have in zip(("hidden grad", "weight grad"), expected[2:], got[2:]):
        scale = want.float().abs().max().item()
        assert (want.float() - have.float()).abs().max().item() <= grad_tol * scale, name
    best = {name: min(run[0] for run in results) for name, results in runs.items()}
    print("FIGURE " + json.dumps({"figure": "fused_logprobs", "dtype": str(dtype).removeprefix("torch."),
                                  "tokens": NUM_TOKENS, "vocab": VOCAB, "naive_s": best["naive"],
                                  "fused_s": best["fused"], "naive_over_fused": best["naive"] / best["fused"]}))
