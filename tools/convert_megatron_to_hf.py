#!/usr/bin/env python
"""Convert a megatron-core dist checkpoint to Hugging Face safetensors.

    python tools/convert_megatron_to_hf.py --megatron-dir runs/x/checkpoints/step_00000100 --output-dir hf-out
    python tools/convert_megatron_to_hf.py --megatron-dir runs/x --output-dir hf-out   # the run's latest

Reads a converted checkpoint or a training checkpoint saved at any tensor /
pipeline / data-parallel layout (distributed optimizer or not; only the model
weights are read), one layer at a time, and writes size-capped
`model-0000k-of-0000N.safetensors` shards with `model.safetensors.index.json`
plus config.json, generation_config.json and the tokenizer, loadable with
`AutoModelForCausalLM.from_pretrained`. The HF config comes from
`<checkpoint>/hf/` (written by the converter and by training checkpoints) or
`--hf-config`. The output is built in a temporary directory and renamed.
"""

from __future__ import annotations

import argparse
import sys
import time

from megatron_gppo.cli import OneLineParser, tool_main


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megatron-dir", required=True,
                        help="megatron checkpoint directory, or a run / checkpoints directory (uses its latest)")
    parser.add_argument("--output-dir", required=True, help="HF model directory to create (must not exist or be empty)")
    parser.add_argument("--hf-config", default=None,
                        help="directory with the HF config.json / tokenizer (default: <checkpoint>/hf)")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="largest safetensors shard, e.g. 5GB, 500MB (default 5GB)")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="cast every tensor (default: keep the stored dtypes)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def convert(args: argparse.Namespace) -> int:
    from megatron_gppo.checkpoint.convert import convert_megatron_to_hf
    from megatron_gppo.checkpoint.training import resolve_checkpoint_dir

    start = time.time()
    source = resolve_checkpoint_dir(args.megatron_dir)
    out = convert_megatron_to_hf(source, args.output_dir, hf_config_dir=args.hf_config,
                                 max_shard_size=args.max_shard_size, dtype=args.dtype,
                                 progress=not args.no_progress)
    print(f"wrote {out} from {source} in {time.time() - start:.1f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    return tool_main(build_parser(), convert, argv)


if __name__ == "__main__":
    sys.exit(main())
