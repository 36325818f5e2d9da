"""Fused, vocab-parallel log-probs and entropy of the output layer.

The policy loss needs, per token, ``log p(label)`` and the entropy of the
next-token distribution, where ``logits = hidden @ weight.T / temperature``.
Materialising ``[tokens, vocab]`` logits (151,936 columns for Qwen2) costs
gigabytes, so this op walks the logits in tiles of ``chunk_size`` tokens by
``block_size`` vocab columns and never holds more than one tile of logits
(plus one work buffer of the same size):

* forward: an online softmax over the vocab blocks keeps, per token, the
  running max ``m``, ``s = sum exp(z - m)`` and ``t = sum exp(z - m) (z - m)``,
  plus the target logit from the block that owns the label. Then
  ``lse = m + log s``, ``E_p[z] = m + t / s`` and ``entropy = lse - E_p[z]
  = log s - t / s``. Only ``lse`` and the entropy ([tokens] each) are saved.
* backward: each tile is recomputed and turned into ``dL/dz`` (below), which
  is multiplied into the hidden and weight gradients in place.

With ``p = softmax(z)``, ``y`` the label and ``g_logp``, ``g_ent`` the upstream
gradients of the two outputs::

    d logp_y / d z_v = 1[v = y] - p_v
    d H / d z_v      = -p_v (z_v - E_p[z])          (H = lse - sum_v p_v z_v)
    dL / d z_v       = g_logp (1[v = y] - p_v) - g_ent p_v (z_v - E_p[z])

and ``z = hidden @ weight.T / temperature`` adds the factor ``1 / temperature``
to both matmul gradients.

Tensor parallelism: rank ``r`` of the TP group holds the vocab rows
``[r * V_local, (r + 1) * V_local)`` (megatron's equal partition). Each rank
reduces its shard to per-token ``(m, s, t, target logit)``; the group takes the
max of ``m``, rescales ``s`` and ``t`` to it and sums them and the target logit.
In backward each rank only sees its vocab slice, so its ``grad_hidden`` is a
partial sum; this op all-reduces it over the TP group so the caller receives
the full gradient for the (replicated) ``hidden`` it passed in. This is the
reduction megatron's ``ColumnParallelLinear`` output layer does for its input.
Consequences for callers: compute the same loss on every TP rank (megatron's
convention: outputs are replicated), and if ``hidden`` was gathered from a
sequence-parallel region, gather it with
``gather_from_sequence_parallel_region(..., tensor_parallel_output_grad=False)``
so the gradient is split, not reduce-scattered a second time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

# Default tile (token chunk, vocab block) per device type; two fp32 tile-sized
# work buffers are live at a time.
# CPU, measured at 2,048 x 896 x 151,936 fp32 on 2 shared cores: the time is
# GEMM-bound and flat from 256k to 4M elements per tile on an idle machine, but
# when other processes compete for the cores every parallel op pays a thread
# wake-up, and small tiles (1024 x 512) ran up to 4x slower than 2048 x 2048.
# 2 x 16 MiB of buffers is ~6% of the 519 MiB weight gradient.
# CUDA: not measured yet; big enough that each tile's GEMM outweighs its ~20
# kernel launches (2 x 64 MiB of buffers).
DEFAULT_TILE = {"cpu": (2048, 2048), "cuda": (4096, 4096)}

# exp() of this is exactly 0 in fp32 and fp64. Rescale factors exp(m_old - m_new)
# are computed from differences clamped to it, so a running max that is still
# -inf (no column seen, s == t == 0) yields 0 * finite = 0 instead of nan.
_MIN_LOG_SCALE = -1e4


@dataclass(frozen=True)
class _Plan:
    """Static settings of one call, shared by forward and backward."""

    inv_temperature: float
    chunk_size: int
    block_size: int
    vocab_start: int  # global id of this rank's first row
    num_cols: int  # rows of this shard inside the true vocab (the rest is padding)
    ignore_index: int
    with_entropy: bool
    compute_dtype: torch.dtype
    tp_group: object


def vocab_parallel_log_probs(
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
    block_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-prob of ``labels`` and entropy, without materialising logits.

    Args:
        hidden: ``[tokens, hidden]`` final hidden states, replicated on the TP group.
        weight: ``[vocab / TP, hidden]`` this rank's rows of the output layer.
        labels: ``[tokens]`` global token ids; ``ignore_index`` marks positions
            that get log-prob 0, entropy 0 and zero gradient.
        temperature: logits are ``hidden @ weight.T / temperature``.
        tp_group: tensor-parallel process group; ``None`` for one process.
        chunk_size: tokens per tile (default from ``DEFAULT_TILE``).
        with_entropy: also return the entropy (otherwise ``None``, and cheaper).
        vocab_size: true global vocab size; rows at or beyond it (megatron's
            vocab padding) are left out of the softmax and get zero gradient.
            Default: ``TP * weight.shape[0]``.
        ignore_index: label value of masked positions.
        block_size: vocab rows per tile (default from ``DEFAULT_TILE``).

    Returns:
        ``(log_probs, entropy)``, ``[tokens]`` each, fp32 (fp64 for fp64 inputs).
        Gradients flow to ``hidden`` and ``weight`` in their own dtypes; with TP
        the ``hidden`` gradient is already summed over the group (module doc).
    """
    plan = _make_plan(hidden, weight, labels, temperature=temperature, tp_group=tp_group, chunk_size=chunk_size,
                      with_entropy=with_entropy, vocab_size=vocab_size, ignore_index=ignore_index,
                      block_size=block_size)
    log_probs, entropy = _FusedLogProbs.apply(hidden, weight, labels, plan)
    return log_probs, (entropy if with_entropy else None)


@dataclass(frozen=True)
class SoftmaxMoments:
    """Per-token statistics of the next-token distribution p, each ``[tokens]`` (0 at ignored positions)."""

    log_probs: torch.Tensor
    """log p(label)."""
    entropy: torch.Tensor
    """H = -sum_b p_b log p_b."""
    sum_p2: torch.Tensor
    """sum_b p_b^2."""
    sum_p2_log_p: torch.Tensor
    """sum_b p_b^2 log p_b."""


@torch.no_grad()
def vocab_parallel_softmax_moments(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    tp_group=None,
    vocab_size: int | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    block_size: int | None = None,
) -> SoftmaxMoments:
    """log p(label), entropy and the two squared-probability moments, without logits or gradients.

    The same tiles and TP reduction as `vocab_parallel_log_probs` (arguments
    alike), with two more online sums: ``u = sum exp(2 (z - m))`` and
    ``w = sum exp(2 (z - m)) (z - m)``, so that ``sum p^2 = u / s^2`` and
    ``sum p^2 log p = (w - u log s) / s^2``. They give the entropy
    sensitivity of a token (`algorithm.diagnostics.entropy_sensitivity`).
    """
    plan = _make_plan(hidden, weight, labels, temperature=temperature, tp_group=tp_group, chunk_size=chunk_size,
                      with_entropy=True, vocab_size=vocab_size, ignore_index=ignore_index, block_size=block_size)
    valid, local_labels = _local_labels(labels, plan)
    m, (s, t, target, u, w) = _softmax_sums(hidden, weight, local_labels, plan, with_moments=True)
    log_s = s.log()
    s_squared = s.square()

    def masked(values: torch.Tensor) -> torch.Tensor:
        return values.masked_fill_(~valid, 0)

    # The same expressions as `_FusedLogProbs.forward`, so both give the same bits.
    return SoftmaxMoments(
        log_probs=masked((target - (m + log_s)).clamp_(max=0)),
        entropy=masked((log_s - t / s).clamp_(min=0)),
        sum_p2=masked(u / s_squared),
        sum_p2_log_p=masked((w - u * log_s) / s_squared),
    )


def _make_plan(hidden, weight, labels, *, temperature, tp_group, chunk_size, with_entropy, vocab_size, ignore_index,
               block_size) -> _Plan:
    """Check the inputs of one call (ValueError) and fix its settings."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"expected hidden [tokens, hidden] and weight [vocab/TP, hidden], "
            f"got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels must be [tokens]={tuple(hidden.shape[:1])}, got {tuple(labels.shape)}")
    if not (hidden.is_floating_point() and weight.is_floating_point()):
        raise ValueError(f"hidden and weight must be floating point, got {hidden.dtype} and {weight.dtype}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if not hidden.device == weight.device == labels.device:
        raise ValueError(
            f"hidden, weight and labels on different devices: {hidden.device}, {weight.device}, {labels.device}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    default_chunk, default_block = DEFAULT_TILE.get(hidden.device.type, DEFAULT_TILE["cpu"])
    chunk_size = default_chunk if chunk_size is None else chunk_size
    block_size = default_block if block_size is None else block_size
    if chunk_size < 1 or block_size < 1:
        raise ValueError(f"chunk_size and block_size must be >= 1, got {chunk_size} and {block_size}")

    tp_rank, tp_size = 0, 1
    if tp_group is not None:
        tp_rank, tp_size = dist.get_rank(tp_group), dist.get_world_size(tp_group)
    num_local_rows = weight.shape[0]
    padded_vocab = num_local_rows * tp_size
    vocab_size = padded_vocab if vocab_size is None else vocab_size
    if not 0 < vocab_size <= padded_vocab:
        raise ValueError(f"vocab_size must be in [1, {padded_vocab}] (TP x weight rows), got {vocab_size}")
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if bad.any():
        raise ValueError(
            f"labels must be in [0, {vocab_size}) or equal ignore_index={ignore_index}, "
            f"got {labels[bad][0].item()}"
        )

    vocab_start = tp_rank * num_local_rows
    return _Plan(
        inv_temperature=1.0 / temperature,
        chunk_size=chunk_size,
        block_size=block_size,
        vocab_start=vocab_start,
        num_cols=max(0, min(num_local_rows, vocab_size - vocab_start)),
        ignore_index=ignore_index,
        with_entropy=with_entropy,
        # fp32 accumulation for fp32/bf16/fp16 inputs; fp64 stays fp64.
        compute_dtype=torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32),
        tp_group=tp_group if tp_size > 1 else None,
    )


def _tile_shape(num_tokens: int, plan: _Plan) -> tuple[int, int]:
    """Largest tile ``(tokens, vocab columns)`` of this call (never 0, for empty inputs)."""
    return max(1, min(plan.chunk_size, num_tokens)), max(1, min(plan.block_size, plan.num_cols))


def _tile_buffer(num_tokens: int, plan: _Plan, device: torch.device) -> torch.Tensor:
    """Flat work buffer for one tile; ``_view(buf, like)`` gives a contiguous view."""
    chunk, block = _tile_shape(num_tokens, plan)
    return torch.empty(chunk * block, dtype=plan.compute_dtype, device=device)


def _view(buf: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return buf[: like.numel()].view_as(like)


def _logit_tiles(hidden: torch.Tensor, weight: torch.Tensor, plan: _Plan):
    """Yield ``(rows, b0, b1, h, w, z)`` for every tile, vocab blocks outermost.

    ``h`` is ``hidden[rows]`` and ``w`` is ``weight[b0:b1]``, both in the
    compute dtype, and ``z = h @ w.T / temperature`` is ``[len(rows), b1 - b0]``
    in the compute dtype. ``z`` lives in one reused buffer: it is overwritten by
    the next tile, and callers may modify it in place.
    """
    num_tokens = hidden.shape[0]
    chunk, block = _tile_shape(num_tokens, plan)
    new = dict(dtype=plan.compute_dtype, device=hidden.device)
    # One flat buffer, viewed per tile as a contiguous [rows, cols] matrix, so the
    # last (ragged) chunk and block need no separate allocation.
    tile = _tile_buffer(num_tokens, plan, hidden.device)
    # bf16/fp16 operands are upcast tile by tile: fp32 logits from fp32 products.
    h_buf = torch.empty(chunk, hidden.shape[1], **new) if hidden.dtype != plan.compute_dtype else None
    w_buf = torch.empty(block, weight.shape[1], **new) if weight.dtype != plan.compute_dtype else None
    for b0 in range(0, plan.num_cols, block):
        b1 = min(b0 + block, plan.num_cols)
        w = weight[b0:b1] if w_buf is None else w_buf[: b1 - b0].copy_(weight[b0:b1])
        for c0 in range(0, num_tokens, chunk):
            c1 = min(c0 + chunk, num_tokens)
            h = hidden[c0:c1] if h_buf is None else h_buf[: c1 - c0].copy_(hidden[c0:c1])
            z = tile[: (c1 - c0) * (b1 - b0)].view(c1 - c0, b1 - b0)
            # beta=0 ignores the stale buffer contents; alpha applies 1/T inside the GEMM.
            z.addmm_(h, w.t(), beta=0, alpha=plan.inv_temperature)
            yield slice(c0, c1), b0, b1, h, w, z


def _label_columns(local_labels: torch.Tensor, b0: int, b1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Column index of each token's label inside block ``[b0, b1)`` and whether it is there.

    ``local_labels`` is ``-1`` for labels owned by no column of this shard. The
    index is clamped into the block so gather/scatter stay in bounds (and need no
    host sync); ``hit`` masks out the tokens whose label is elsewhere.
    """
    col = local_labels - b0
    hit = (col >= 0) & (col < b1 - b0)
    return col.clamp_(0, b1 - b0 - 1).unsqueeze(1), hit


def _rescale(m_old: torch.Tensor, m_new: torch.Tensor, s: torch.Tensor, t: torch.Tensor | None,
             u: torch.Tensor | None = None, w: torch.Tensor | None = None) -> None:
    """Move running sums taken relative to ``m_old`` onto ``m_new`` (>= m_old), in place.

    With ``d = m_old - m_new``: ``s = sum exp(z - m)`` scales by ``exp(d)``; the
    shifted ``t = sum exp(z - m) (z - m)`` becomes ``exp(d) (t + d s)``; the
    squared-probability sums ``u = sum exp(2 (z - m))`` and ``w = sum exp(2 (z - m)) (z - m)``
    become ``exp(2 d) u`` and ``exp(2 d) (w + d u)``.
    """
    d = (m_old - m_new).clamp_(min=_MIN_LOG_SCALE)
    scale = d.exp()
    if t is not None:
        t.addcmul_(d, s).mul_(scale)
    s.mul_(scale)
    if u is not None:
        scale.square_()
        w.addcmul_(d, u).mul_(scale)
        u.mul_(scale)


def _softmax_sums(hidden: torch.Tensor, weight: torch.Tensor, local_labels: torch.Tensor, plan: _Plan, *,
                  with_moments: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token, the max logit ``m`` and the sums ``[s, t, target logit]`` (``+ [u, w]`` with moments).

    Online over the vocab tiles and combined over the TP group (see ``_rescale``
    for what each sum is); ``t`` only with ``plan.with_entropy``.
    """
    num_tokens = hidden.shape[0]
    new = dict(dtype=plan.compute_dtype, device=hidden.device)
    m = torch.full((num_tokens,), float("-inf"), **new)
    # One tensor so TP needs a single sum all-reduce.
    sums = torch.zeros(5 if with_moments else 3, num_tokens, **new)
    s, t, target, *moments = sums
    exp_buf = _tile_buffer(num_tokens, plan, hidden.device)
    sq_buf = _tile_buffer(num_tokens, plan, hidden.device) if with_moments else None

    def rescale(m_old, m_new, rows=slice(None)):
        u, w = [x[rows] for x in moments] or (None, None)
        _rescale(m_old, m_new, s[rows], t[rows] if plan.with_entropy else None, u, w)

    for rows, b0, b1, _, _, z in _logit_tiles(hidden, weight, plan):
        col, hit = _label_columns(local_labels[rows], b0, b1)
        target[rows] += torch.where(hit, z.gather(1, col).squeeze(1), 0)
        m_new = torch.maximum(m[rows], z.amax(dim=1))
        # (Indexing with a slice gives views, so the running sums are rescaled in place.)
        rescale(m[rows], m_new, rows)
        m[rows] = m_new
        z.sub_(m_new.unsqueeze(1))  # z - m <= 0: exp cannot overflow
        e = torch.exp(z, out=_view(exp_buf, z))
        s[rows] += e.sum(dim=1)
        if with_moments:
            e2 = torch.square(e, out=_view(sq_buf, z))
            moments[0][rows] += e2.sum(dim=1)
            moments[1][rows] += e2.mul_(z).sum(dim=1)
        if plan.with_entropy:
            t[rows] += e.mul_(z).sum(dim=1)

    if plan.tp_group is not None:
        m_local = m.clone()
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=plan.tp_group)
        rescale(m_local, m)
        dist.all_reduce(sums, group=plan.tp_group)
    return m, sums


def _local_labels(labels: torch.Tensor, plan: _Plan) -> tuple[torch.Tensor, torch.Tensor]:
    """Which labels count, and each one's row in this rank's shard (-1 when another rank owns it)."""
    valid = labels != plan.ignore_index
    local_labels = labels.long() - plan.vocab_start
    owned = valid & (local_labels >= 0) & (local_labels < plan.num_cols)
    return valid, torch.where(owned, local_labels, -1)


class _FusedLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, plan: _Plan):
        valid, local_labels = _local_labels(labels, plan)
        m, (s, t, target) = _softmax_sums(hidden, weight, local_labels, plan)
        log_s = s.log()
        lse = m + log_s
        # Mathematically z_y <= lse, but rounding (p_y ~ 1) can make z_y - lse a
        # hair positive, and a positive log-prob breaks ratios exp(logp - old).
        log_probs = (target - lse).clamp_(max=0).masked_fill_(~valid, 0)
        entropy = None
        if plan.with_entropy:
            # H = log s - t / s >= 0; rounding can again cross the bound.
            entropy = (log_s - t / s).clamp_(min=0)
            ctx.save_for_backward(hidden, weight, local_labels, valid, lse, entropy)
            entropy = entropy.masked_fill(~valid, 0)
        else:
            ctx.save_for_backward(hidden, weight, local_labels, valid, lse)
        ctx.plan = plan
        # None outputs' gradients arrive as None instead of zero tensors, so a
        # caller that ignores the entropy skips its backward term.
        ctx.set_materialize_grads(False)
        return log_probs, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_log_probs, grad_entropy):
        plan: _Plan = ctx.plan
        hidden, weight, local_labels, valid, lse, *maybe_entropy = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        new = dict(dtype=plan.compute_dtype, device=hidden.device)
        num_tokens = hidden.shape[0]

        # Masked positions get exactly zero gradient: their upstream grads are zeroed.
        zero = torch.zeros((), **new)
        g_logp = zero if grad_log_probs is None else torch.where(valid, grad_log_probs.to(plan.compute_dtype), zero)
        use_entropy = grad_entropy is not None
        if use_entropy:
            g_ent = torch.where(valid, grad_entropy.to(plan.compute_dtype), zero)
            # dL/dz = p * (-g_ent * (z - lse) + neg_c) with neg_c = -(g_logp + g_ent * H),
            # since z - E_p[z] = (z - lse) + H.
            neg_g_ent = g_ent.neg().unsqueeze(1)
            neg_c = (g_ent * maybe_entropy[0]).add_(g_logp).neg_().unsqueeze(1)
            p_buf = _tile_buffer(num_tokens, plan, hidden.device)
        neg_g_logp = g_logp.neg().expand(num_tokens).unsqueeze(1)
        g_logp = g_logp.expand(num_tokens)

        grad_hidden = torch.zeros(hidden.shape, **new) if need_hidden else None
        grad_weight = None
        if need_weight:
            grad_weight = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
            # Rows the tile loop never writes: vocab padding (all rows if no tokens).
            grad_weight[plan.num_cols if num_tokens else 0 :].zero_()
            gw_buf = None
            if weight.dtype != plan.compute_dtype:
                # Low-precision weights accumulate each block in fp32 and are cast once.
                gw_buf = torch.empty(_tile_shape(num_tokens, plan)[1], weight.shape[1], **new)

        for rows, b0, b1, h, w, z in _logit_tiles(hidden, weight, plan):
            z.sub_(lse[rows].unsqueeze(1))  # log p
            if use_entropy:
                p = torch.exp(z, out=_view(p_buf, z))
                z.mul_(neg_g_ent[rows]).add_(neg_c[rows]).mul_(p)
            else:
                z.exp_().mul_(neg_g_logp[rows])
            col, hit = _label_columns(local_labels[rows], b0, b1)
            z.scatter_add_(1, col, torch.where(hit, g_logp[rows], 0).unsqueeze(1))  # + g_logp 1[v=y]
            # z now holds dL/dz for the tile; 1/T comes in through alpha.
            if need_hidden:
                grad_hidden[rows].addmm_(z, w, alpha=plan.inv_temperature)
            if need_weight:
                first = rows.start == 0
                if gw_buf is None:
                    grad_weight[b0:b1].addmm_(z.t(), h, beta=0 if first else 1, alpha=plan.inv_temperature)
                else:
                    gw = gw_buf[: b1 - b0]
                    gw.addmm_(z.t(), h, beta=0 if first else 1, alpha=plan.inv_temperature)
                    if rows.stop == num_tokens:
                        grad_weight[b0:b1].copy_(gw)

        if need_hidden:
            if plan.tp_group is not None:
                # Each rank holds the contribution of its vocab slice only.
                dist.all_reduce(grad_hidden, group=plan.tp_group)
            grad_hidden = grad_hidden.to(hidden.dtype)
        return grad_hidden, grad_weight, None, None
