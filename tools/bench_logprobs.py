#!/usr/bin/env python
"""Benchmark the fused vocab-parallel log-prob + entropy op against naive autograd.

Every (case, path, repeat) runs in a fresh Python process, so the memory a path
adds is measured for real and no allocator state leaks between paths:

* CPU: peak RSS during forward + backward (``VmHWM`` / ``ru_maxrss``, after
  resetting the high-water mark through ``/proc/self/clear_refs``) minus the RSS
  once the inputs exist and were touched. Both paths include the 519 MiB weight
  gradient at vocab 151,936 x hidden 896 fp32.
* CUDA: ``torch.cuda.max_memory_allocated`` minus the allocated baseline. If
  ``liger_kernel`` imports, Liger's fused linear cross entropy is timed too
  (log-probs only, so it does less work than the other two paths).

Time is one forward + backward of ``(log_probs * w1).sum() + (entropy * w2).sum()``
with random ``w1``, ``w2`` (so both outputs backpropagate), after a small warm-up
in the same process. Repeats run interleaved (naive, fused, naive, fused, ...)
so load from other processes on a shared machine hits both paths alike; the
reported time is the best of ``--repeats`` and the memory the median.

Prints one JSON line per case. Fields of a path that was not run are null.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from megatron_gppo.cli import OneLineParser

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_WORKER_FLAG = "--_worker"


def _naive(hidden, weight, labels, temperature):
    """Textbook autograd: full logits, log_softmax, gather, softmax, entropy."""
    logits = (hidden @ weight.t()).float()
    if temperature != 1.0:
        logits = logits / temperature
    log_p = torch.log_softmax(logits, dim=-1)
    log_probs = log_p.gather(1, labels.unsqueeze(1)).squeeze(1)
    entropy = -(torch.softmax(logits, dim=-1) * log_p).sum(dim=-1)
    return log_probs, entropy


def _fused(hidden, weight, labels, temperature, chunk_size, block_size):
    from megatron_gppo.model.logprobs import vocab_parallel_log_probs

    return vocab_parallel_log_probs(
        hidden, weight, labels, temperature=temperature, chunk_size=chunk_size, block_size=block_size
    )


def _liger(hidden, weight, labels, temperature):
    """Liger's fused linear cross entropy: log-probs only (no entropy), summed loss."""
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss(reduction="sum")(weight, hidden / temperature, labels)
    return -loss, None


def _rss_kib() -> tuple[int, int]:
    """(current RSS, high-water RSS) of this process in KiB."""
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    hwm = int(fields["VmHWM"].split()[0])
    return int(fields["VmRSS"].split()[0]), max(hwm, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _make_inputs(num_tokens, hidden_size, vocab, dtype, device, seed):
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, scale=1.0):
        # In place, so creating the inputs needs no temporary of their size.
        return torch.empty(shape, dtype=dtype, device=device).normal_(0, scale, generator=gen)

    hidden = randn(num_tokens, hidden_size).requires_grad_()
    # std 1/sqrt(hidden): logits of order 1, as in a trained output layer.
    weight = randn(vocab, hidden_size, scale=hidden_size**-0.5).requires_grad_()
    labels = torch.randint(0, vocab, (num_tokens,), device=device, generator=gen)
    w1 = torch.randn(num_tokens, device=device, generator=gen)
    w2 = torch.randn(num_tokens, device=device, generator=gen)
    return hidden, weight, labels, w1, w2


def _step(path, hidden, weight, labels, w1, w2, args):
    if path == "naive":
        log_probs, entropy = _naive(hidden, weight, labels, args["temperature"])
    elif path == "fused":
        log_probs, entropy = _fused(
            hidden, weight, labels, args["temperature"], args["chunk_size"], args["block_size"]
        )
    else:
        log_probs, entropy = _liger(hidden, weight, labels, args["temperature"])
    loss = (log_probs * w1).sum() if log_probs.dim() else log_probs
    if entropy is not None:
        loss = loss + (entropy * w2).sum()
    loss.backward()


def _worker(args: dict) -> dict:
    """Run one path once in this (fresh) process and measure it."""
    device = torch.device(args["device"])
    dtype = DTYPES[args["dtype"]]
    cuda = device.type == "cuda"
    # Warm-up on small, separate tensors: loads kernels and thread pools so that
    # neither their time nor their memory is charged to the measured run.
    small = _make_inputs(64, args["hidden"], 4096, dtype, device, seed=1)
    _step(args["path"], *small, args)
    del small

    inputs = _make_inputs(args["tokens"], args["hidden"], args["vocab"], dtype, device, seed=0)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base, _ = _rss_kib()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water RSS to the current RSS

    start = time.perf_counter()
    _step(args["path"], *inputs, args)
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start

    if cuda:
        peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak_mib = (_rss_kib()[1] - base) / 1024
    return {"time_s": elapsed, "peak_mib": peak_mib}


def _run_isolated(job: dict) -> dict:
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), _WORKER_FLAG, json.dumps(job)],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{job['path']} worker failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--tokens", type=int, nargs="+", help="token counts (default: 2048 8192 on cpu, 8192 on cuda)")
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: fp32 on cpu, bf16 on cuda")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--chunk-size", type=int, help="fused token chunk (default: the op's)")
    parser.add_argument("--block-size", type=int, help="fused vocab block (default: the op's)")
    parser.add_argument(
        "--naive-max-tokens",
        type=int,
        help="skip the naive path above this many tokens (default: 2048 on cpu, no limit on cuda); "
        "at 8,192 tokens it needs ~20 GiB of host memory",
    )
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per path (best time, median memory)")
    args = parser.parse_args(argv)

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available")
    tokens = args.tokens or ([8192] if cuda else [2048, 8192])
    dtype = args.dtype or ("bf16" if cuda else "fp32")
    naive_max = args.naive_max_tokens if args.naive_max_tokens is not None else (None if cuda else 2048)
    paths = {n: ["fused"] + (["naive"] if naive_max is None or n <= naive_max else []) for n in tokens}
    if cuda:
        try:
            import liger_kernel  # noqa: F401

            for n in tokens:
                paths[n].append("liger")
        except ImportError:
            pass

    from megatron_gppo.model import logprobs

    default_chunk, default_block = logprobs.DEFAULT_TILE[args.device]
    chunk = args.chunk_size or default_chunk
    block = args.block_size or default_block
    results = {(n, p): [] for n in tokens for p in paths[n]}
    for _ in range(args.repeats):
        for n in tokens:
            for path in sorted(paths[n], reverse=True):  # naive, liger, fused
                job = dict(
                    path=path, tokens=n, hidden=args.hidden, vocab=args.vocab, dtype=dtype, device=args.device,
                    temperature=args.temperature, chunk_size=chunk, block_size=block,
                )
                results[n, path].append(_run_isolated(job))

    def summary(n, path):
        runs = results.get((n, path))
        if not runs:
            return None, None
        return min(r["time_s"] for r in runs), statistics.median(r["peak_mib"] for r in runs)

    ref_tokens = min(tokens)
    _, fused_ref_peak = summary(ref_tokens, "fused")
    for n in tokens:
        naive_time, naive_peak = summary(n, "naive")
        fused_time, fused_peak = summary(n, "fused")
        row = {
            "tokens": n,
            "hidden": args.hidden,
            "vocab": args.vocab,
            "dtype": dtype,
            "naive_time_s": _round(naive_time),
            "fused_time_s": _round(fused_time),
            "time_ratio": _round(fused_time / naive_time if naive_time else None),
            "naive_peak_mib": _round(naive_peak),
            "fused_peak_mib": _round(fused_peak),
            "memory_ratio": _round(fused_peak / naive_peak if naive_peak else None),
            f"fused_peak_ratio_vs_{ref_tokens}": _round(fused_peak / fused_ref_peak),
            "weight_grad_mib": _round(args.vocab * args.hidden * torch.finfo(DTYPES[dtype]).bits / 8 / 2**20),
            "chunk_size": chunk,
            "block_size": block,
            "temperature": args.temperature,
            "device": torch.cuda.get_device_name() if cuda else f"cpu x{torch.get_num_threads()} threads",
            "repeats": args.repeats,
            "time_stat": "min",
            "memory_stat": "median",
            "memory_method": (
                "cuda max_memory_allocated - baseline"
                if cuda
                else "peak RSS - RSS after inputs (fresh process per run)"
            ),
            "fused_times_s": [_round(r["time_s"]) for r in results[n, "fused"]],
            "naive_times_s": [_round(r["time_s"]) for r in results.get((n, "naive"), [])] or None,
        }
        if "liger" in paths[n]:
            liger_time, liger_peak = summary(n, "liger")
            row.update(
                liger_time_s=_round(liger_time),
                liger_peak_mib=_round(liger_peak),
                liger_note="log-probs only, no entropy",
            )
        print(json.dumps(row), flush=True)


def _round(x, digits=4):
    return None if x is None else round(x, digits)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == _WORKER_FLAG:
        print(json.dumps(_worker(json.loads(sys.argv[2]))))
    else:
        main()
