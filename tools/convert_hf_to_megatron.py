#!/usr/bin/env python
"""Convert a Hugging Face checkpoint (safetensors) to a megatron-core dist checkpoint (torch_dist).

    python tools/convert_hf_to_megatron.py --hf-dir Qwen2.5-7B --output-dir ckpt/qwen2.5-7b-mcore

The output loads at any tensor / pipeline / virtual pipeline layout
(`model.megatron_checkpoint` in a run config). Tensors are converted and
written one at a time (memory: about one tensor, whatever the model size),
dtypes are kept, and the HF config / generation config / tokenizer files are
stored in `<output-dir>/hf/` for the way back. Supported architectures:
Qwen2ForCausalLM, LlamaForCausalLM, Qwen3ForCausalLM.
"""

from __future__ import annotations

import argparse
import sys
import time

from megatron_gppo.cli import OneLineParser, tool_main


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True, help="HF model directory (config.json + *.safetensors)")
    parser.add_argument("--output-dir", required=True, help="megatron checkpoint directory to create (must not exist"
                        " or be empty)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def convert(args: argparse.Namespace) -> int:
    from megatron_gppo.checkpoint.convert import convert_hf_to_megatron

    start = time.time()
    out = convert_hf_to_megatron(args.hf_dir, args.output_dir, progress=not args.no_progress)
    print(f"wrote {out} in {time.time() - start:.1f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    return tool_main(build_parser(), convert, argv)


if __name__ == "__main__":
    sys.exit(main())
