#!/usr/bin/env python
"""Throughput and MFU of one RL training step of the Megatron policy.

A step is `Policy.forward_backward_step`: megatron's pipeline schedule over
the micro-batches, fused vocab-parallel log-probs + entropy, the CE-GPPO loss
and the AdamW step. The model is randomly initialised from an HF config.json
(`--hf-config`) or from `--hidden-size/--num-layers/...`; the batch is random
tokens whose second half is the scored "response".

    python tools/bench_train_step.py --num-layers 4 --hidden-size 256 --seq-len 512
    python tools/bench_train_step.py --hf-config Qwen2.5-0.5B/config.json --tp 2 --pp 2

With more than one process (`--tp x --pp x --dp`) and no launcher variables it
re-launches itself under `torch.distributed.run` on this machine. Rank 0
prints one JSON object:

    tokens_per_s   trained tokens (prompt + response) per second, all data-parallel ranks
    mfu            6 * params * tokens_per_s / (peak_flops_per_device * world_size),
                   the usual 6N estimate (attention scores and recompute not counted)
    mfu_matmul     the same with the FLOPs this step really multiplies: 6 x the
                   transformer-layer params x all tokens + 6 x the output layer x the
                   scored (response) tokens; the input embedding is a lookup

`--peak-tflops` is the per-device peak; by default a table entry for known
GPUs (bf16 dense) and, on CPU, the fp32 matmul throughput measured on this
process's threads just before the run.

`--lengths lognormal` draws each response's length from a lognormal with
mean `--mean-response-len` (sigma 1) clipped to [1, `--max-response-len`],
after a `--prompt-len`-token prompt, and times the same samples padded (one
per row, padded to the longest) and packed (train.pack_sequences; rows of
the longest sample, `--micro-batch-size` rows per micro-batch: the padded
micro-batch's shape) in one run. Each layout reports its step time, useful
(non-padding) tokens/s, padding fraction and peak memory (CUDA allocator
peak, or peak RSS on CPU, above the memory in use before its steps), and
the report their ratios:

    python tools/bench_train_step.py --lengths lognormal --num-layers 2 --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import replace

import torch

from megatron_gppo.cli import OneLineParser

GPU_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0}


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    model = parser.add_argument_group("model (ignored with --hf-config)")
    model.add_argument("--hf-config", help="HF config.json (or its directory) to build the model from")
    model.add_argument("--num-layers", type=int, default=4)
    model.add_argument("--hidden-size", type=int, default=256)
    model.add_argument("--num-heads", type=int, default=8)
    model.add_argument("--num-kv-heads", type=int, default=2)
    model.add_argument("--ffn-hidden-size", type=int, default=0, help="0: 8/3 x hidden rounded up to 64")
    model.add_argument("--vocab-size", type=int, default=32000)
    layout = parser.add_argument_group("layout")
    layout.add_argument("--tp", type=int, default=1)
    layout.add_argument("--pp", type=int, default=1)
    layout.add_argument("--vpp", type=int, default=1)
    layout.add_argument("--dp", type=int, default=1)
    layout.add_argument("--sequence-parallel", action="store_true")
    layout.add_argument("--distributed-optimizer", action="store_true")
    run = parser.add_argument_group("run")
    run.add_argument("--seq-len", type=int, default=256, help="tokens per sequence with --lengths fixed")
    run.add_argument("--lengths", choices=["fixed", "lognormal"], default="fixed",
                     help="fixed: --seq-len tokens, second half scored; lognormal: padded vs packed (see above)")
    run.add_argument("--prompt-len", type=int, default=64)
    run.add_argument("--mean-response-len", type=int, default=256)
    run.add_argument("--max-response-len", type=int, default=2048)
    run.add_argument("--batch-size", type=int, default=8, help="sequences per step per data-parallel rank")
    run.add_argument("--micro-batch-size", type=int, default=2)
    run.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                     help="default: bfloat16 on GPU, float32 on CPU")
    run.add_argument("--recompute", choices=["none", "selective", "full"], default="none")
    run.add_argument("--steps", type=int, default=3, help="timed steps")
    run.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    run.add_argument("--peak-tflops", type=float, default=0.0, help="per-device peak; 0 picks a default")
    run.add_argument("--threads", type=int, default=0,
                     help="CPU threads per process (0: torch's default; several processes split the cores)")
    return parser.parse_args(argv)


def model_config(args) -> dict:
    if args.hf_config:
        return args.hf_config
    ffn = args.ffn_hidden_size or -(-8 * args.hidden_size // 3 // 64) * 64
    return {
        "architectures": ["Qwen2ForCausalLM"], "hidden_size": args.hidden_size, "intermediate_size": ffn,
        "num_hidden_layers": args.num_layers, "num_attention_heads": args.num_heads,
        "num_key_value_heads": args.num_kv_heads, "vocab_size": args.vocab_size,
        "max_position_embeddings": max(4096, args.seq_len), "tie_word_embeddings": False,
    }


def peak_flops(requested_tflops: float) -> tuple[float, str]:
    """Per-device peak FLOP/s and where the number comes from."""
    if requested_tflops > 0:
        return requested_tflops * 1e12, "--peak-tflops"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, tflops in GPU_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12, f"table ({key} bf16 dense)"
        return 989e12, f"table (unknown GPU {name!r}: H100 bf16 dense assumed)"
    # CPU: best of several 1536^3 fp32 matmuls on this process's threads (best-of, because
    # other processes on a shared machine only ever slow a run down).
    n = 1536
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(8))
    return 2 * n**3 / best, f"measured fp32 matmul ({torch.get_num_threads()} threads)"


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def relaunch(args_list: list[str], world_size: int) -> int:
    """Run this script under torch.distributed.run with `world_size` local processes."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world_size}",
               "--master-addr=127.0.0.1", f"--master-port={port}", __file__, *args_list]
    env = dict(os.environ)
    if not torch.cuda.is_available():
        # Share the cores between the processes instead of oversubscribing them.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world_size)))
    return subprocess.call(command, env=env)


def synthetic_batch(args, vocab_size: int, *, seed: int):
    from megatron_gppo.model.policy import PolicyBatch

    gen = torch.Generator().manual_seed(seed)
    shape = (args.batch_size, args.seq_len)
    tokens = torch.randint(0, vocab_size, shape, generator=gen)
    loss_mask = torch.zeros(shape, dtype=torch.bool)
    loss_mask[:, args.seq_len // 2:] = True
    advantages = torch.randn(args.batch_size, 1, generator=gen).expand(shape).contiguous()
    return PolicyBatch(tokens=tokens, loss_mask=loss_mask, advantages=advantages)


def lognormal_batch(args, vocab_size: int, *, seed: int):
    """`--batch-size` samples: a `--prompt-len` prompt and a lognormal response each, one per row."""
    import math

    from megatron_gppo.batching import pad_rows

    gen = torch.Generator().manual_seed(seed)
    sigma = 1.0
    mu = math.log(args.mean_response_len) - sigma**2 / 2  # the lognormal's mean is exp(mu + sigma^2 / 2)
    lengths = torch.exp(mu + sigma * torch.randn(args.batch_size, generator=gen)).round().clamp(1, args.max_response_len)
    prompts = [torch.randint(0, vocab_size, (args.prompt_len,), generator=gen).tolist() for _ in lengths]
    responses = [torch.randint(0, vocab_size, (int(n),), generator=gen).tolist() for n in lengths]
    batch = pad_rows(prompts, responses, pad_id=0)
    advantages = torch.randn(args.batch_size, 1, generator=gen).expand(batch.tokens.shape) * batch.loss_mask
    return replace(batch, advantages=advantages.contiguous())


def measure(policy, batch, *, micro_batch_size: int, args, sync, baseline: int | None = None) -> dict:
    """Log-prob recompute and train-step times and the peak memory of `batch` in its layout.

    The peak is above `baseline` (default: the memory in use now).
    """
    from megatron_gppo.model import peak_memory

    baseline = peak_memory.current_bytes() if baseline is None else baseline
    peak_memory.reset_peak()
    logprob_times = []
    for _ in range(2):
        start = time.perf_counter()
        old_log_probs, _ = policy.compute_log_probs(batch, micro_batch_size=micro_batch_size)
        sync()
        logprob_times.append(time.perf_counter() - start)
    batch = replace(batch, old_log_probs=old_log_probs)
    step_times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        result = policy.forward_backward_step(batch, loss_name="ce_gppo", micro_batch_size=micro_batch_size)
        sync()
        if step >= args.warmup:
            step_times.append(time.perf_counter() - start)
    peak = peak_memory.peak_bytes() - baseline
    return {"step_times": step_times, "logprob_time": min(logprob_times), "computed_tokens": batch.tokens.numel(),
            "peak_memory_bytes": peak, "result": result,
            "scored_fraction": batch.loss_mask.float().mean().item(),
            "rows": batch.num_rows, "row_len": batch.tokens.shape[1], "micro_batch_size": micro_batch_size}


def compare_layouts(policy, batch, *, args, sync) -> dict:
    """The same samples padded and packed (lognormal lengths): per-layout figures and their ratios."""
    from megatron_gppo.model import peak_memory
    from megatron_gppo.packing import rank_batch, sample_lengths

    lengths = sample_lengths(batch)
    useful = sum(lengths)
    report = {"lengths": {"distribution": f"prompt {args.prompt_len} + lognormal response (sigma 1)",
                          "mean_response_len": args.mean_response_len, "max_response_len": args.max_response_len,
                          "measured_mean_len": round(useful / len(lengths), 1), "measured_max_len": max(lengths),
                          "samples_per_dp_rank": len(lengths)}}
    layouts = {name: rank_batch(batch, num_minibatches=1, dp_rank=0, dp_size=1, micro_batch_size=args.micro_batch_size,
                                pack=name == "packed", seq_multiple=policy.dims.tp if policy.dims.sequence_parallel else 1)
               for name in ("padded", "packed")}
    # One untimed pass of each first: buffers that persist once allocated (megatron's attention-score
    # buffer, the allocator's) then count for neither layout instead of for whichever runs first.
    for mine in layouts.values():
        old_log_probs, _ = policy.compute_log_probs(mine.batch, micro_batch_size=mine.rows_per_micro_batch)
        policy.forward_backward_step(replace(mine.batch, old_log_probs=old_log_probs), loss_name="ce_gppo",
                                     micro_batch_size=mine.rows_per_micro_batch)
    sync()
    baseline = peak_memory.current_bytes()
    for name, mine in layouts.items():
        stats = measure(policy, mine.batch, micro_batch_size=mine.rows_per_micro_batch, args=args, sync=sync,
                        baseline=baseline)
        step_time = statistics.mean(stats["step_times"])
        report[name] = {
            "rows": stats["rows"], "row_len": stats["row_len"], "rows_per_micro_batch": stats["micro_batch_size"],
            "padding_fraction": round(1 - useful / stats["computed_tokens"], 4),
            "step_time_s": round(step_time, 4),
            "useful_tokens_per_s": round(useful * policy.dims.dp / step_time, 1),
            "logprob_useful_tokens_per_s": round(useful * policy.dims.dp / stats["logprob_time"], 1),
            "peak_memory_mib": round(stats["peak_memory_bytes"] / 2**20, 1),
            "last_loss": stats["result"].loss,
        }
    padded, packed = report["padded"], report["packed"]
    report["packed_vs_padded"] = {
        "useful_tokens_per_s": round(packed["useful_tokens_per_s"] / padded["useful_tokens_per_s"], 3),
        "logprob_useful_tokens_per_s": round(packed["logprob_useful_tokens_per_s"]
                                             / padded["logprob_useful_tokens_per_s"], 3),
        "peak_memory": round(packed["peak_memory_mib"] / padded["peak_memory_mib"], 3),
        # The same samples and weights: the loss must agree to float rounding.
        "loss_abs_diff": abs(packed["last_loss"] - padded["last_loss"]),
    }
    return report


def bench(args) -> dict | None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_gppo.config import ModelConfig, ParallelConfig, TrainConfig
    from megatron_gppo.model.arch import ModelArch
    from megatron_gppo.model.parallel import destroy_distributed, init_distributed
    from megatron_gppo.model import peak_memory
    from megatron_gppo.model.policy import Policy

    if args.threads:
        torch.set_num_threads(args.threads)
    peak_memory.release_freed_memory_promptly()  # so that CPU peak RSS follows the live tensors
    arch = ModelArch.from_hf_config(model_config(args))
    dims = init_distributed(
        ParallelConfig(tensor_parallel=args.tp, pipeline_parallel=args.pp, virtual_pipeline=args.vpp,
                       data_parallel=args.dp, sequence_parallel=args.sequence_parallel),
        arch=arch, seed=1234)
    dtype = args.dtype or ("bfloat16" if torch.cuda.is_available() else "float32")
    policy = Policy(arch=arch, dims=dims, model=ModelConfig(dtype=dtype, recompute=args.recompute),
                    train=TrainConfig(lr=1e-6, distributed_optimizer=args.distributed_optimizer))
    peak, peak_source = peak_flops(args.peak_tflops)
    batch = synthetic_batch(args, arch.vocab_size, seed=parallel_state.get_data_parallel_rank())

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dist.barrier()

    sync()
    header = {
        "model": {"family": arch.family, "params": arch.num_params, "num_layers": arch.num_layers,
                  "hidden_size": arch.hidden_size, "num_heads": arch.num_attention_heads,
                  "num_kv_heads": arch.num_query_groups, "ffn_hidden_size": arch.ffn_hidden_size,
                  "vocab_size": arch.vocab_size, "dtype": dtype, "recompute": args.recompute},
        "layout": {"tp": dims.tp, "pp": dims.pp, "vpp": dims.vpp, "dp": dims.dp,
                   "sequence_parallel": dims.sequence_parallel,
                   "distributed_optimizer": args.distributed_optimizer, "world_size": dims.world_size},
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)",
    }
    if args.lengths == "lognormal":
        batch = lognormal_batch(args, arch.vocab_size, seed=parallel_state.get_data_parallel_rank())
        report = {**header, "micro_batch_size": args.micro_batch_size, "timed_steps": args.steps,
                  **compare_layouts(policy, batch, args=args, sync=sync)}
        is_rank0 = dist.get_rank() == 0
        destroy_distributed()
        return report if is_rank0 else None

    stats = measure(policy, batch, micro_batch_size=args.micro_batch_size, args=args, sync=sync)
    step_times, result = stats["step_times"], stats["result"]
    tokens_per_step = args.batch_size * args.seq_len * dims.dp
    step_time = statistics.mean(step_times)
    tokens_per_s = tokens_per_step / step_time
    head_params = arch.vocab_size * arch.hidden_size
    layer_params = arch.num_params - head_params * (1 if arch.tie_word_embeddings else 2)
    scored_fraction = stats["scored_fraction"]
    flops_6n = 6 * arch.num_params * tokens_per_s
    flops_matmul = 6 * (layer_params + head_params * scored_fraction) * tokens_per_s
    report = {
        **header,
        "seq_len": args.seq_len,
        "batch_size_per_dp_rank": args.batch_size,
        "micro_batch_size": args.micro_batch_size,
        "timed_steps": len(step_times),
        "step_time_s": round(step_time, 4),
        "tokens_per_step": tokens_per_step,
        "tokens_per_s": round(tokens_per_s, 1),
        "logprob_tokens_per_s": round(tokens_per_step / stats["logprob_time"], 1),
        "achieved_tflops_per_device_6n": round(flops_6n / dims.world_size / 1e12, 4),
        "peak_tflops_per_device": round(peak / 1e12, 4),
        "peak_source": peak_source,
        "mfu": round(flops_6n / (peak * dims.world_size), 4),
        "mfu_matmul": round(flops_matmul / (peak * dims.world_size), 4),
        "last_loss": result.loss,
        "last_grad_norm": result.grad_norm,
    }
    is_rank0 = dist.get_rank() == 0
    destroy_distributed()
    return report if is_rank0 else None


def main(argv=None) -> int:
    args = parse_args(argv)
    world_size = args.tp * args.pp * args.dp
    if world_size > 1 and "RANK" not in os.environ:
        return relaunch(sys.argv[1:] if argv is None else list(argv), world_size)
    report = bench(args)
    if report is not None:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
