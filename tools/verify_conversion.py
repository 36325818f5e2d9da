#!/usr/bin/env python
"""Check a megatron checkpoint against its Hugging Face model: same tokens, compare logits.

    python tools/verify_conversion.py --hf-dir Qwen2.5-0.5B --megatron-dir ckpt/q05 --tp 2 --pp 2

Runs one random token batch through transformers and through the megatron
model at the given layout (spawning TP x PP processes when more than one is
needed; gloo on CPU, NCCL on GPU), prints one JSON line with the max / mean
absolute logit difference and the top-1 agreement, and exits 1 when the max
difference exceeds --atol (default 1e-4 for float32, 5e-2 for bfloat16).
`--megatron-dir` may be a training checkpoint or a run directory (its latest).
"""

from __future__ import annotations

import argparse
import json
import sys

from megatron_gppo.cli import OneLineParser, tool_main

DEFAULT_ATOL = {"float32": 1e-4, "bfloat16": 5e-2}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True, help="HF model directory")
    parser.add_argument("--megatron-dir", required=True, help="megatron checkpoint (or run) directory")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel size (default 1)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline parallel size (default 1)")
    parser.add_argument("--vpp", type=int, default=1, help="virtual pipeline stages per pipeline rank (default 1)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DEFAULT_ATOL), help="weights and compute dtype")
    parser.add_argument("--atol", type=float, default=None, help="max allowed |logit difference|")
    parser.add_argument("--batch-size", type=int, default=2, help="sequences in the batch (default 2)")
    parser.add_argument("--seq-len", type=int, default=32, help="tokens per sequence (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random tokens")
    return parser


def verify(args: argparse.Namespace) -> int:
    from megatron_gppo.checkpoint.training import resolve_checkpoint_dir
    from megatron_gppo.checkpoint.verify import VerifyLayout, verify_conversion

    if min(args.tp, args.pp, args.vpp, args.batch_size, args.seq_len) < 1:
        raise ValueError("--tp, --pp, --vpp, --batch-size and --seq-len must be >= 1")
    result = verify_conversion(
        args.hf_dir, resolve_checkpoint_dir(args.megatron_dir),
        layout=VerifyLayout(tp=args.tp, pp=args.pp, vpp=args.vpp),
        dtype=args.dtype, batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed,
    )
    result["atol"] = DEFAULT_ATOL[args.dtype] if args.atol is None else args.atol
    result["ok"] = result["max_abs_logit_diff"] <= result["atol"]
    print(json.dumps(result))
    return 0 if result["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    return tool_main(build_parser(), verify, argv)


if __name__ == "__main__":
    sys.exit(main())
