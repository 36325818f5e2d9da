"""Fused log-probs + entropy (TP=1) against the textbook computation."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_gppo.model.logprobs import vocab_parallel_log_probs

NUM_TOKENS, HIDDEN, VOCAB = 37, 16, 1000
# Ragged on purpose: 37 % 16 and 1000 % 96 are not 0.
CHUNK, BLOCK = 16, 96
FP32_TOL = dict(atol=1e-5, rtol=1.3e-6)


def naive(hidden, weight, labels, *, temperature=1.0, ignore_index=-100):
    """logits = h @ W^T / T in fp32 -> log_softmax -> gather; entropy = -(p * logp).sum()."""
    logits = (hidden.float() @ weight.float().t()) / temperature
    log_p = torch.log_softmax(logits, dim=-1)
    valid = labels != ignore_index
    log_probs = log_p.gather(1, torch.where(valid, labels, 0).unsqueeze(1)).squeeze(1) * valid
    entropy = -(log_p.exp() * log_p).sum(-1) * valid
    return log_probs, entropy


def make_inputs(*, seed=0, dtype=torch.float32, num_tokens=NUM_TOKENS, vocab=VOCAB, weight_scale=0.5):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, HIDDEN, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, HIDDEN, generator=gen) * weight_scale).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (num_tokens,), generator=gen)
    # Random upstream gradients on both outputs, so both backward terms are checked.
    w_logp, w_ent = torch.randn(2, num_tokens, generator=gen)
    return hidden, weight, labels, w_logp, w_ent


def outputs_and_grads(fn, hidden, weight, labels, w_logp, w_ent, **kwargs):
    log_probs, entropy = fn(hidden, weight, labels, **kwargs)
    loss = (log_probs * w_logp).sum()
    if entropy is not None:
        loss = loss + (entropy * w_ent).sum()
    grad_hidden, grad_weight = torch.autograd.grad(loss, (hidden, weight))
    return log_probs, entropy, grad_hidden, grad_weight


def assert_all_close(got, want, **tol):
    for name, g, w in zip(["log_probs", "entropy", "grad_hidden", "grad_weight"], got, want):
        torch.testing.assert_close(g.float(), w.float(), **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("tiles", [(CHUNK, BLOCK), (None, None), (64, 4096), (1, 7)], ids=str)
def test_matches_naive_fp32(temperature, tiles):
    inputs = make_inputs()
    chunk_size, block_size = tiles
    got = outputs_and_grads(
        vocab_parallel_log_probs, *inputs, temperature=temperature, chunk_size=chunk_size, block_size=block_size
    )
    want = outputs_and_grads(naive, *inputs, temperature=temperature)
    assert all(t.dtype == torch.float32 for t in got)
    assert_all_close(got, want, **FP32_TOL)


def test_bf16_matches_fp32_naive_on_rounded_inputs():
    hidden, weight, labels, w_logp, w_ent = make_inputs(dtype=torch.bfloat16)
    got = outputs_and_grads(
        vocab_parallel_log_probs, hidden, weight, labels, w_logp, w_ent,
        temperature=0.7, chunk_size=CHUNK, block_size=BLOCK,
    )
    assert got[0].dtype == got[1].dtype == torch.float32
    assert got[2].dtype == got[3].dtype == torch.bfloat16
    # Reference: the naive computation in fp32 on the same (bf16-rounded) values.
    hidden32 = hidden.detach().float().requires_grad_()
    weight32 = weight.detach().float().requires_grad_()
    want = outputs_and_grads(naive, hidden32, weight32, labels, w_logp, w_ent, temperature=0.7)
    # The op upcasts bf16 tiles and accumulates everything in fp32, so the
    # outputs differ from the reference by fp32 rounding only. The gradients
    # are rounded to bf16 once at the end: relative error <= 2^-9 (half an ulp
    # of an 8-bit mantissa); 2^-8 leaves room for the fp32 noise before it.
    assert_all_close(got[:2], want[:2], **FP32_TOL)
    for g, w in zip(got[2:], want[2:]):
        torch.testing.assert_close(g.float(), w, atol=1e-5, rtol=2**-8)


def test_ignore_index_gives_zero_outputs_and_zero_gradient():
    hidden, weight, labels, w_logp, w_ent = make_inputs()
    masked = torch.zeros(NUM_TOKENS, dtype=torch.bool)
    masked[[0, 5, 6, 36]] = True
    labels = labels.masked_fill(masked, -100)
    log_probs, entropy, grad_hidden, grad_weight = got = outputs_and_grads(
        vocab_parallel_log_probs, hidden, weight, labels, w_logp, w_ent, chunk_size=CHUNK, block_size=BLOCK
    )
    assert (log_probs[masked] == 0).all() and (entropy[masked] == 0).all()
    assert (grad_hidden[masked] == 0).all()
    assert_all_close(got, outputs_and_grads(naive, hidden, weight, labels, w_logp, w_ent), **FP32_TOL)

    # The weight gradient is exactly what the unmasked tokens alone produce.
    keep = ~masked
    sub = [hidden.detach()[keep].requires_grad_(), weight, labels[keep], w_logp[keep], w_ent[keep]]
    *_, grad_weight_unmasked = outputs_and_grads(vocab_parallel_log_probs, *sub, chunk_size=CHUNK, block_size=BLOCK)
    torch.testing.assert_close(grad_weight, grad_weight_unmasked, **FP32_TOL)


def test_vocab_padding_rows_are_excluded():
    true_vocab = 990  # megatron pads the output layer; rows 990.. are padding
    hidden, weight, labels, w_logp, w_ent = make_inputs()
    labels = labels % true_vocab
    labels[0] = true_vocab - 1
    with torch.no_grad():
        weight[true_vocab:] = 50.0  # would dominate the softmax if it were included
    got = outputs_and_grads(
        vocab_parallel_log_probs, hidden, weight, labels, w_logp, w_ent,
        vocab_size=true_vocab, chunk_size=CHUNK, block_size=BLOCK,
    )
    unpadded = weight.detach()[:true_vocab].requires_grad_()
    want = outputs_and_grads(naive, hidden, unpadded, labels, w_logp, w_ent)
    assert_all_close(got[:3], want[:3], **FP32_TOL)
    torch.testing.assert_close(got[3][:true_vocab], want[3], **FP32_TOL)
    assert (got[3][true_vocab:] == 0).all()


def test_log_probs_never_positive_for_extreme_logits():
    hidden, weight, labels, w_logp, w_ent = make_inputs()
    with torch.no_grad():
        hidden *= 1e3  # logits of order 1e3: the top token takes all the mass
    top = (hidden @ weight.t()).argmax(dim=1)
    for lbl in (top, labels):
        log_probs, entropy, grad_hidden, grad_weight = outputs_and_grads(
            vocab_parallel_log_probs, hidden, weight, lbl, w_logp, w_ent, chunk_size=CHUNK, block_size=BLOCK
        )
        assert (log_probs <= 0).all() and (entropy >= 0).all()
        assert all(t.isfinite().all() for t in (log_probs, entropy, grad_hidden, grad_weight))
    # A label that is the argmax has log-prob 0 up to rounding, not a hair above.
    log_probs, _ = vocab_parallel_log_probs(hidden, weight, top)
    torch.testing.assert_close(log_probs, torch.zeros_like(log_probs), atol=1e-5, rtol=0)


def test_without_entropy():
    inputs = make_inputs()
    log_probs, entropy = vocab_parallel_log_probs(*inputs[:3], with_entropy=False)
    assert entropy is None
    got = outputs_and_grads(
        vocab_parallel_log_probs, *inputs, with_entropy=False, chunk_size=CHUNK, block_size=BLOCK, temperature=0.7
    )
    hidden, weight, labels, w_logp, _ = inputs
    want = outputs_and_grads(naive, hidden, weight, labels, w_logp, torch.zeros(NUM_TOKENS), temperature=0.7)
    assert_all_close([got[0], *got[2:]], [want[0], *want[2:]], **FP32_TOL)


def test_only_one_output_in_the_loss():
    hidden, weight, labels, w_logp, w_ent = make_inputs()
    for index, weights in [(0, (w_logp, torch.zeros_like(w_ent))), (1, (torch.zeros_like(w_logp), w_ent))]:
        out = vocab_parallel_log_probs(hidden, weight, labels, chunk_size=CHUNK, block_size=BLOCK)
        # Only one output reaches the loss, so the other's gradient arrives as None.
        got = torch.autograd.grad((out[index] * weights[index]).sum(), (hidden, weight))
        want = outputs_and_grads(naive, hidden, weight, labels, *weights)[2:]
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, **FP32_TOL)


def test_gradcheck_fp64():
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(5, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(11, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    labels = torch.tensor([0, 9, 3, -100, 7])

    def fn(h, w):
        return vocab_parallel_log_probs(h, w, labels, temperature=0.7, chunk_size=2, block_size=4, vocab_size=10)

    assert torch.autograd.gradcheck(fn, (hidden, weight))


class _LargestTensor(TorchDispatchMode):
    """Records the shapes of all tensors created by ops (views excluded)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.shapes.append(tuple(t.shape))
        return out


def test_never_holds_more_than_a_tile_of_logits():
    hidden, weight, labels, w_logp, w_ent = make_inputs()
    with _LargestTensor() as mode:
        outputs_and_grads(
            vocab_parallel_log_probs, hidden, weight, labels, w_logp, w_ent, chunk_size=CHUNK, block_size=BLOCK
        )
    # Besides the gradients (shaped like hidden and weight), nothing exceeds a tile.
    others = [s for s in mode.shapes if s not in (tuple(hidden.shape), tuple(weight.shape))]
    largest = max(torch.Size(s).numel() for s in others)
    assert largest <= max(CHUNK * BLOCK, BLOCK * HIDDEN), largest


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(hidden=torch.randn(NUM_TOKENS, HIDDEN + 1)), "weight"),
        (dict(labels=torch.zeros(NUM_TOKENS + 1, dtype=torch.long)), "labels"),
        (dict(labels=torch.full((NUM_TOKENS,), VOCAB)), "labels must be in"),
        (dict(labels=torch.zeros(NUM_TOKENS)), "integer"),
        (dict(temperature=0.0), "temperature"),
        (dict(vocab_size=VOCAB + 1), "vocab_size"),
        (dict(chunk_size=0), "chunk_size"),
    ],
)
def test_user_errors(change, message):
    hidden, weight, labels, _, _ = make_inputs()
    args = dict(hidden=hidden, weight=weight, labels=labels)
    args.update(change)
    kwargs = {k: args.pop(k) for k in list(args) if k not in ("hidden", "weight", "labels")}
    with pytest.raises(ValueError, match=message):
        vocab_parallel_log_probs(args["hidden"], args["weight"], args["labels"], **kwargs)


def naive_moments(hidden, weight, labels, *, temperature=1.0):
    """sum_b p_b^2 and sum_b p_b^2 log p_b from the full softmax, in fp64."""
    log_p = torch.log_softmax((hidden.double() @ weight.double().t()) / temperature, dim=-1)
    p_squared = log_p.exp().square()
    return p_squared.sum(-1), (p_squared * log_p).sum(-1)


@pytest.mark.parametrize("tiles", [(CHUNK, BLOCK), (None, None), (1, 7)], ids=str)
def test_softmax_moments_match_the_full_softmax(tiles):
    from megatron_gppo.model.logprobs import vocab_parallel_softmax_moments

    hidden, weight, labels, _, _ = make_inputs(weight_scale=2.0)  # peaked and flat rows alike
    labels[3] = -100
    chunk_size, block_size = tiles
    got = vocab_parallel_softmax_moments(hidden, weight, labels, temperature=0.7, chunk_size=chunk_size,
                                         block_size=block_size)
    log_probs, entropy = naive(hidden, weight, labels, temperature=0.7)
    sum_p2, sum_p2_log_p = naive_moments(hidden, weight, labels, temperature=0.7)
    valid = labels != -100
    torch.testing.assert_close(got.log_probs, log_probs.detach(), **FP32_TOL)
    torch.testing.assert_close(got.entropy, entropy.detach(), **FP32_TOL)
    # 1e-5 relative; the 1e-6 floor is for near-deterministic rows, where sum p^2 log p ~ log p_max ~ -1e-3
    # and log s = log(1 + 1e-3) in fp32 cannot resolve it better (a full fp32 softmax is 1.4e-4 off there too).
    torch.testing.assert_close(got.sum_p2, (sum_p2 * valid).float(), atol=0, rtol=1e-5)
    torch.testing.assert_close(got.sum_p2_log_p, (sum_p2_log_p * valid).float(), atol=1e-6, rtol=1e-5)
    assert 1 / VOCAB <= got.sum_p2[valid].min() and got.sum_p2.max() <= 1


def test_softmax_moments_give_the_log_probs_bit_for_bit():
    """The trainer's recompute switched to the moments pass: its log-probs and entropy must not move."""
    from megatron_gppo.model.logprobs import vocab_parallel_softmax_moments

    hidden, weight, labels, _, _ = make_inputs()
    log_probs, entropy = vocab_parallel_log_probs(hidden, weight, labels, temperature=0.7, chunk_size=CHUNK,
                                                  block_size=BLOCK)
    moments = vocab_parallel_softmax_moments(hidden, weight, labels, temperature=0.7, chunk_size=CHUNK,
                                             block_size=BLOCK)
    assert torch.equal(moments.log_probs, log_probs.detach()) and torch.equal(moments.entropy, entropy.detach())
