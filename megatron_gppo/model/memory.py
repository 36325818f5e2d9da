"""Per-GPU memory of one RL training step, from the architecture and the parallel layout.

Pure Python (no torch, no megatron): `estimate_memory` answers "does this
model, layout and micro-batch fit?" before anything is launched, and
`tools/estimate_memory.py` prints it. The numbers are bytes on one GPU of a
pipeline rank (by default the most loaded one) at the step's peak, the start
of a backward pass with every in-flight micro-batch's activations alive, and
count what this project builds:

- weights: the parameters megatron builds on that rank, exactly (embedding and
  output layer padded to a multiple of TP and split by it, on the first / last
  pipeline stage; a tied output layer is a second copy only when PP > 1; QKV
  bias, GQA, qk-norm; no other biases).
- gradients: megatron DDP's fp32 main-grad buffer, one entry per parameter.
- optimizer: Adam's exp_avg + exp_avg_sq in fp32, plus an fp32 master copy of
  bf16 weights; all divided by DP under the distributed optimizer.
- activations: what autograd keeps for backward, counted tensor by tensor for
  our layer (RMSNorm, GQA, rotary, SwiGLU; `layer_activation_bytes`) rather
  than taken from Korthikanti et al. 2022, whose 34 sbh + 5 a s^2 b is for a
  LayerNorm / GELU / dropout layer: here the unfused SwiGLU alone keeps 5 x ffn
  per token. Replicated [s, b, h] tensors are split by TP only under sequence
  parallelism, the rest always. Selective recompute keeps core attention's
  inputs instead of its internals; full recompute keeps each layer's input
  plus one rematerialised layer. Pipeline ranks hold several micro-batches in
  flight (1F1B: PP - rank; interleaved: megatron's warm-up count + 1), and
  keep each one's stage output. On CPU also megatron's persistent
  attention-score / all-gather buffer.
- log-prob workspace: the fused vocab-parallel log-prob op's backward on the
  last stage: the output-weight gradient, the hidden gradient and its
  (token chunk x vocab block) fp32 tiles; logits are never materialised.
  Every token is assumed scored (the op sees only response tokens).

`device` picks the implementation that runs: "cpu" is megatron's local layer
spec (torch RMSNorm, unfused softmax attention that stores the [a, s, s]
probabilities); "cuda" is Transformer Engine (fused norm + linear, flash
attention for bf16, unfused for fp32). The CPU numbers are checked against
autograd's saved tensors and measured peak memory (tests/unit/
test_memory_estimate.py, tests/distributed/test_estimate_memory.py); the CUDA
ones follow the same count for TE's modules but are not measured here. Not
counted: the CUDA context and allocator fragmentation (add about 1-3 GiB on a
GPU), NCCL buffers, and transients smaller than one layer's activations
(a layer's backward, the optimizer step, which runs with activations freed).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from megatron_gppo.model.arch import ModelArch
from megatron_gppo.model.parallel import ParallelDims, _stage_layer_counts, validate_layout

Device = Literal["cpu", "cuda"]
BYTES = {"float32": 4, "bfloat16": 2}
RECOMPUTE = ("none", "selective", "full")
# Token chunk x vocab block of the fused log-prob op (megatron_gppo.model.logprobs.DEFAULT_TILE).
LOGPROB_TILE = {"cpu": (2048, 2048), "cuda": (4096, 4096)}
_FP32 = 4


@dataclass(frozen=True, kw_only=True)
class MemoryEstimate:
    """Bytes on one GPU of one pipeline rank at the peak of a training step."""

    weights: int
    """Model parameters on this rank, in the model dtype."""

    gradients: int
    """megatron DDP's fp32 main-grad buffer."""

    optimizer: int
    """Adam moments (and fp32 master weights for bf16), sharded over DP with the distributed optimizer."""

    activations: int
    """Tensors saved for backward by all micro-batches in flight, plus persistent attention buffers."""

    logprob_workspace: int
    """Peak transient of the fused log-prob op's backward (output-weight and hidden gradients, tiles)."""

    num_params: int
    """Parameters on this rank."""

    pipeline_rank: int
    """Which pipeline rank these numbers are for."""

    num_microbatches_in_flight: int
    """Micro-batches whose activations this rank holds at once (per model chunk for VPP: chunk-micro-batches)."""

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logprob_workspace

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}

    def table(self) -> str:
        """A readable table: one line per component, GiB and share of the total."""
        rows = [("weights", self.weights), ("gradients (fp32)", self.gradients), ("optimizer", self.optimizer),
                ("activations", self.activations), ("log-prob workspace", self.logprob_workspace)]
        lines = [f"{'component':<20}{'GiB':>10}{'share':>8}"]
        for name, value in rows:
            lines.append(f"{name:<20}{value / 2**30:>10.3f}{value / max(self.total, 1):>8.1%}")
        lines.append(f"{'total':<20}{self.total / 2**30:>10.3f}")
        lines.append(f"(pipeline rank {self.pipeline_rank}, {self.num_params:,} parameters,"
                     f" {self.num_microbatches_in_flight} micro-batch(es) in flight)")
        return "\n".join(lines)


# ----------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------


def padded_vocab_size(vocab_size: int, *, tp: int) -> int:
    """Megatron's vocabulary rows: the smallest multiple of TP >= vocab_size (as provider.py, without torch)."""
    return -(-vocab_size // tp) * tp


def num_layer_params(arch: ModelArch, *, tp: int) -> int:
    """Parameters of one transformer layer on one TP rank (norms and qk-norm replicated)."""
    h, d = arch.hidden_size, arch.head_dim
    q, kv = arch.num_attention_heads * d, arch.num_query_groups * d
    qkv = h * (q + 2 * kv) + ((q + 2 * kv) if arch.qkv_bias else 0)
    attention = (qkv + q * h) // tp + (2 * d if arch.qk_layernorm else 0)
    mlp = 3 * h * arch.ffn_hidden_size // tp
    return attention + mlp + 2 * h


def num_params_per_rank(arch: ModelArch, dims: ParallelDims) -> list[int]:
    """Parameters on each pipeline rank (the same on every TP / DP rank of that stage)."""
    counts = _stage_layer_counts(dims, arch.num_layers)
    vocab_rows = padded_vocab_size(arch.vocab_size, tp=dims.tp) // dims.tp * arch.hidden_size
    per_rank = []
    for rank, num_layers in enumerate(counts):
        first, last = rank == 0, rank == dims.pp - 1
        params = num_layers * num_layer_params(arch, tp=dims.tp)
        if first:
            params += vocab_rows
        if last:
            params += arch.hidden_size  # final norm
            # A tied output layer reuses the embedding on one stage; with PP > 1 the last stage has a copy.
            if not arch.tie_word_embeddings or not first:
                params += vocab_rows
        per_rank.append(params)
    return per_rank


# ----------------------------------------------------------------------------
# Activations
# ----------------------------------------------------------------------------


def layer_activation_bytes(
    arch: ModelArch, dims: ParallelDims, *, micro_batch_size: int, seq_length: int, dtype: str, recompute: str,
    device: Device,
) -> int:
    """Bytes one transformer layer saves for backward for one micro-batch, on one TP rank.

    Per token, with h the hidden size (divided by TP under sequence parallelism),
    q = heads x head_dim / TP, kv = query groups x head_dim / TP, f = ffn / TP,
    e the bytes of the model dtype (on CPU, counted tensor by tensor from what
    autograd saves, see tests/unit/test_memory_estimate.py):

    - norm + the linear after it (x2: qkv, fc1): torch RMSNorm keeps x and
      x * rstd (in fp32, x upcast for bf16), the linear the normed output; TE's
      fused LayerNormLinear keeps x and the normed output;
    - attention: unfused keeps q, k and v repeated to all heads (MHA: the qkv
      output instead of v) and the fp32 softmax probabilities, [heads, s] per
      token (plus a bf16 copy for bf16); flash keeps q, k, v and the fp32
      log-sum-exp; selective recompute keeps only core attention's inputs;
    - the attention output (input of the output projection): q;
    - SwiGLU: fc1's [gate, up] output (2f), silu(gate), up + 0 and fc2's input: 5f;
    - fp32 rstd per norm; rotary cos / sin (4 x [s, head_dim]) and the causal
      mask ([s, s] bytes) once per layer.

    Full recompute keeps only the layer's input.
    """
    e = BYTES[dtype]
    tp = dims.tp
    tokens = micro_batch_size * seq_length
    sp_tokens = tokens / tp if dims.sequence_parallel else tokens  # tokens of replicated [s, b, h] tensors
    h = arch.hidden_size
    d, f = arch.head_dim, arch.ffn_hidden_size / tp
    q, kv = arch.num_attention_heads * d / tp, arch.num_query_groups * d / tp
    heads, groups = arch.num_attention_heads / tp, arch.num_query_groups / tp
    qkv_out = q + 2 * kv
    if recompute == "full":
        return int(sp_tokens * h * e)  # the layer's input; the rest is rematerialised in backward

    unfused = device == "cpu" or dtype == "float32"  # TE has flash / fused attention for 16-bit only
    keeps_qkv_out = False  # whether some saved view keeps the whole qkv projection output alive
    if device == "cpu":
        norms = 2 * sp_tokens * (2 * h * max(e, _FP32) + h * e + _FP32)
    else:
        norms = 2 * sp_tokens * (2 * h * e + _FP32)
    qk_norm = 0.0
    if arch.qk_layernorm:
        # Per-head RMSNorm of q and k, views of the qkv output (q is reshaped into a copy under GQA);
        # fp32 rstd per head.
        q_copy = q if arch.num_query_groups < arch.num_attention_heads else 0.0
        qk_norm = (heads + groups) * _FP32
        if device == "cpu" and e != _FP32:
            qk_norm += 2 * (q + kv) * _FP32  # fp32 upcasts of the inputs and the normed outputs
        elif device == "cpu":
            qk_norm += (q_copy + q + kv) * e
            keeps_qkv_out = True
        else:
            qk_norm += q_copy * e
            keeps_qkv_out = True
    if recompute == "selective":
        # core attention is rerun in backward; it keeps rotated q, k and v (a view of the qkv output).
        attention = (q + kv) * e
        keeps_qkv_out = True
    elif unfused:
        # q, k and v repeated to all heads (MHA: v stays a view of the qkv output), and the fp32
        # softmax probabilities, [heads, s] per token (plus the bf16 copy the next matmul takes).
        attention = 2 * q * e + heads * seq_length * (_FP32 + (e if e != _FP32 else 0))
        if arch.num_query_groups < arch.num_attention_heads:
            attention += q * e
        else:
            keeps_qkv_out = True
    else:
        # Flash / cuDNN attention: q, k, v (a view of the qkv output) and the fp32 log-sum-exp.
        attention = (q + kv) * e + heads * _FP32
        keeps_qkv_out = True
    if keeps_qkv_out:
        attention += qkv_out * e
    per_token = qk_norm + attention + q * e + 5 * f * e
    per_layer = 4 * seq_length * d * e  # rotary cos / sin for q and k
    if unfused and recompute != "selective":
        per_layer += seq_length * seq_length  # bool causal mask
    return int(norms + tokens * per_token + per_layer)


def num_in_flight(dims: ParallelDims, *, pipeline_rank: int, num_microbatches: int) -> int:
    """Model-chunk micro-batches whose activations `pipeline_rank` holds at its peak (megatron schedules)."""
    if dims.pp == 1:
        return 1
    if dims.vpp == 1:
        in_flight = dims.pp - pipeline_rank
    else:
        # Interleaved: warm-up forwards plus the one in steady state.
        in_flight = (dims.pp - pipeline_rank - 1) * 2 + (dims.vpp - 1) * dims.pp + 1
    return min(in_flight, num_microbatches * dims.vpp) if num_microbatches else in_flight


def _stage_activation_bytes(
    arch: ModelArch, dims: ParallelDims, *, pipeline_rank: int, num_layers: int, tokens: int, in_flight: int,
    dtype: str, recompute: str, device: Device, seq_length: int, micro_batch_size: int,
) -> int:
    e = BYTES[dtype]
    tp = dims.tp
    sp_tokens = tokens / tp if dims.sequence_parallel else tokens
    shape = dict(micro_batch_size=micro_batch_size, seq_length=seq_length, dtype=dtype, device=device)
    per_layer = layer_activation_bytes(arch, dims, recompute=recompute, **shape)
    layers_per_chunk = num_layers / dims.vpp
    saved = in_flight * layers_per_chunk * per_layer
    if recompute == "full":
        # Backward rematerialises one layer at a time.
        saved += layer_activation_bytes(arch, dims, recompute="none", **shape)
    if pipeline_rank == 0:
        saved += in_flight * tokens * 8  # int64 token ids kept by the embedding lookup
    if pipeline_rank < dims.pp - 1 or dims.vpp > 1:
        # Model-chunk outputs the schedule keeps for backward (all but the last chunk's, which is the loss).
        saved += in_flight * sp_tokens * arch.hidden_size * e
    if pipeline_rank == dims.pp - 1:
        # Final norm, then the scored hidden rows the log-prob op keeps (and per-token lse, entropy,
        # labels, loss terms).
        if device == "cpu":
            saved += sp_tokens * (2 * arch.hidden_size * max(e, _FP32) + _FP32)
        else:
            saved += sp_tokens * (arch.hidden_size * e + _FP32)
        saved += tokens * (arch.hidden_size * e + 40)
    if device == "cpu":
        # megatron's "mpu" buffer: attention scores (local spec) or the SP all-gather, whichever is larger.
        scores = micro_batch_size * arch.num_attention_heads // tp * seq_length * seq_length
        gathered = tokens * arch.hidden_size if dims.sequence_parallel else 0
        saved += max(scores, gathered) * e
    return int(saved)


def logprob_workspace_bytes(
    arch: ModelArch, dims: ParallelDims, *, tokens: int, dtype: str, device: Device,
) -> int:
    """Peak transient of the fused log-prob op's backward, for `tokens` scored tokens."""
    e = BYTES[dtype]
    h = arch.hidden_size
    vocab_rows = padded_vocab_size(arch.vocab_size, tp=dims.tp) // dims.tp
    chunk, block = LOGPROB_TILE[device]
    chunk, block = min(chunk, tokens), min(block, vocab_rows)
    workspace = vocab_rows * h * e  # grad of the output weight, in its dtype
    workspace += tokens * h * _FP32 + (tokens * h * e if e != _FP32 else 0)  # grad of hidden (fp32, cast)
    workspace += 2 * chunk * block * _FP32  # logit tile + probability tile
    if e != _FP32:
        workspace += (chunk + 2 * block) * h * _FP32  # upcast hidden / weight tiles, fp32 weight-grad block
    return int(workspace)


# ----------------------------------------------------------------------------
# The estimate
# ----------------------------------------------------------------------------


def estimate_memory(
    *,
    arch: ModelArch,
    dims: ParallelDims,
    micro_batch_size: int,
    seq_length: int,
    dtype: str = "bfloat16",
    recompute: str = "none",
    distributed_optimizer: bool = False,
    num_microbatches: int = 0,
    device: Device = "cuda",
    pipeline_rank: int | None = None,
) -> MemoryEstimate:
    """Peak memory of one RL training step on one GPU.

    Args:
        arch: the model (`ModelArch.from_hf_config`).
        dims: the parallel layout; validated against `arch`.
        micro_batch_size: sequences per micro-batch.
        seq_length: tokens per sequence (prompt + response, after padding).
        dtype: "float32" or "bfloat16" (model.dtype).
        recompute: "none", "selective" or "full" (model.recompute).
        distributed_optimizer: shard the optimizer state over DP (train.distributed_optimizer).
        num_microbatches: micro-batches per optimizer step per DP rank; 0 assumes enough to fill the pipeline.
        device: "cuda" (Transformer Engine) or "cpu" (megatron's local spec).
        pipeline_rank: the GPUs of this pipeline rank; None: the rank with the largest total.
    """
    if dtype not in BYTES:
        raise ValueError(f"dtype={dtype!r} is not supported; choose float32 or bfloat16")
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute={recompute!r} is not supported; choose one of {', '.join(RECOMPUTE)}")
    if device not in LOGPROB_TILE:
        raise ValueError(f"device={device!r} is not supported; choose cpu or cuda")
    for name, value, least in (("micro_batch_size", micro_batch_size, 1), ("seq_length", seq_length, 1),
                               ("num_microbatches", num_microbatches, 0)):
        if value < least:
            raise ValueError(f"{name}={value} must be >= {least}")
    validate_layout(dims, arch)
    if pipeline_rank is not None and not 0 <= pipeline_rank < dims.pp:
        raise ValueError(f"pipeline_rank={pipeline_rank} is not in [0, {dims.pp})")

    e = BYTES[dtype]
    tokens = micro_batch_size * seq_length
    optimizer_bytes_per_param = 2 * _FP32 + (_FP32 if e != _FP32 else 0)
    estimates = []
    for rank, (num_params, num_layers) in enumerate(
            zip(num_params_per_rank(arch, dims), _stage_layer_counts(dims, arch.num_layers), strict=True)):
        optimizer = num_params * optimizer_bytes_per_param
        in_flight = num_in_flight(dims, pipeline_rank=rank, num_microbatches=num_microbatches)
        last = rank == dims.pp - 1
        estimates.append(MemoryEstimate(
            weights=num_params * e,
            gradients=num_params * _FP32,
            optimizer=-(-optimizer // dims.dp) if distributed_optimizer else optimizer,
            activations=_stage_activation_bytes(
                arch, dims, pipeline_rank=rank, num_layers=num_layers, tokens=tokens, in_flight=in_flight,
                dtype=dtype, recompute=recompute, device=device, seq_length=seq_length,
                micro_batch_size=micro_batch_size),
            logprob_workspace=logprob_workspace_bytes(arch, dims, tokens=tokens, dtype=dtype, device=device)
            if last else 0,
            num_params=num_params,
            pipeline_rank=rank,
            num_microbatches_in_flight=in_flight,
        ))
    if pipeline_rank is not None:
        return estimates[pipeline_rank]
    return max(estimates, key=lambda estimate: estimate.total)


__all__ = [
    "LOGPROB_TILE", "MemoryEstimate", "estimate_memory", "layer_activation_bytes",
    "logprob_workspace_bytes", "num_in_flight", "num_layer_params", "num_params_per_rank", "padded_vocab_size",
]
