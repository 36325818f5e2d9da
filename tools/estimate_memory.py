#!/usr/bin/env python
"""Estimate per-GPU memory of CE-GPPO training: weights, gradients, optimizer, activations, log-prob workspace.

    python tools/estimate_memory.py --config examples/configs/r1_distill_qwen_7b.yaml \\
        --hf-config /models/DeepSeek-R1-Distill-Qwen-7B --dp 8
    python tools/estimate_memory.py --hf-config Qwen2.5-7B/config.json --tp 4 --pp 2 \\
        --micro-batch-size 1 --seq-length 8192 --recompute selective --distributed-optimizer --dp 4

With `--config` the model is model.hf_path's config.json (or `--hf-config`),
the layout parallel.*, the micro-batch train.micro_batch_size (or, packed,
train.max_tokens_per_micro_batch), the sequence
data.max_prompt_tokens + rollout.max_new_tokens, and dtype / recompute /
distributed optimizer come from the config; any flag given overrides it, and
trailing `section.key=value` arguments override the file like
`megatron-gppo train` does. The numbers are for the most loaded pipeline rank
(`--json` for machine-readable output); the model behind them and its
assumptions are described in megatron_gppo/model/memory.py. On a GPU add the
CUDA context and allocator slack (about 1-3 GiB) to the total.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

from megatron_gppo.cli import OneLineParser, tool_main
from megatron_gppo.config import load_config
from megatron_gppo.model.arch import ModelArch
from megatron_gppo.model.memory import MemoryEstimate, estimate_memory
from megatron_gppo.model.parallel import ParallelDims


@dataclass(frozen=True, kw_only=True)
class Request:
    """Everything one estimate needs, after the config file and the flags are merged."""

    arch: ModelArch
    dims: ParallelDims
    micro_batch_size: int
    seq_length: int
    dtype: str
    recompute: str
    distributed_optimizer: bool
    num_microbatches: int
    """0: enough to fill the pipeline."""
    device: str
    notes: tuple[str, ...] = ()
    """Assumptions made while merging, printed with the table."""


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="overrides of --config")
    source = parser.add_argument_group("what to estimate")
    source.add_argument("--config", help="run config YAML (megatron-gppo train's)")
    source.add_argument("--hf-config", help="HF config.json or its directory (default with --config: model.hf_path)")
    layout = parser.add_argument_group("layout (default: the config's, else 1)")
    layout.add_argument("--tp", type=int, help="tensor parallel")
    layout.add_argument("--pp", type=int, help="pipeline parallel")
    layout.add_argument("--vpp", type=int, help="virtual pipeline stages per pipeline rank")
    layout.add_argument("--dp", type=int, help="data parallel (shards the distributed optimizer)")
    layout.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction, default=None)
    step = parser.add_argument_group("step (default: the config's)")
    step.add_argument("--micro-batch-size", type=int, help="sequences per micro-batch (default 1)")
    step.add_argument("--seq-length", type=int, help="tokens per sequence, prompt + response")
    step.add_argument("--max-tokens-per-micro-batch", type=int,
                      help="packed micro-batches of this many tokens (replaces --micro-batch-size)")
    step.add_argument("--num-microbatches", type=int,
                      help="micro-batches per optimizer step per DP rank (bounds the pipeline's in-flight ones);"
                           " 0: enough to fill the pipeline")
    step.add_argument("--dtype", choices=["float32", "bfloat16"], help="default bfloat16")
    step.add_argument("--recompute", choices=["none", "selective", "full"], help="default none")
    step.add_argument("--distributed-optimizer", action=argparse.BooleanOptionalAction, default=None)
    step.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                      help="cuda: Transformer Engine layers (default); cpu: megatron's local layers")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return parser


def _pick(flag, configured, default=None):
    if flag is not None:
        return flag
    return default if configured is None else configured


def resolve(args: argparse.Namespace) -> Request:
    """Merge --config (if any) and the flags into one validated Request."""
    if args.config is None and args.overrides:
        raise ValueError(f"overrides like {args.overrides[0]!r} need --config")
    config = None
    if args.config is not None:
        # The rollout backend does not change the trainer's memory; "local" needs no server URLs.
        config = load_config(args.config, [*args.overrides, "rollout.backend=local"])
    hf_config = args.hf_config or (config.model.hf_path if config else None)
    if not hf_config:
        raise ValueError("no model: pass --hf-config (the config's model.hf_path is empty)" if config
                         else "pass --config run.yaml or --hf-config path/config.json")
    arch = ModelArch.from_hf_config(hf_config)

    parallel = config.parallel if config else None
    notes = []
    dp = _pick(args.dp, parallel.data_parallel if parallel and parallel.data_parallel else None, 1)
    if parallel is not None and not parallel.data_parallel and args.dp is None:
        notes.append("parallel.data_parallel=0 (inferred at launch): assuming DP=1; pass --dp")
    tp = _pick(args.tp, parallel and parallel.tensor_parallel, 1)
    pp = _pick(args.pp, parallel and parallel.pipeline_parallel, 1)
    for name, value in (("tp", tp), ("pp", pp), ("dp", dp)):
        if value < 1:
            raise ValueError(f"--{name}={value} must be >= 1")
    dims = ParallelDims(
        tp=tp, pp=pp, dp=dp, world_size=tp * pp * dp,
        vpp=_pick(args.vpp, parallel and parallel.virtual_pipeline, 1),
        sequence_parallel=_pick(args.sequence_parallel, parallel and parallel.sequence_parallel, False),
        num_layers_in_first_stage=parallel.num_layers_in_first_stage if parallel else 0,
        num_layers_in_last_stage=parallel.num_layers_in_last_stage if parallel else 0,
    )

    micro_batch_size = _pick(args.micro_batch_size, config and config.train.micro_batch_size, 1)
    seq_length = _pick(args.seq_length, config and config.data.max_prompt_tokens + config.rollout.max_new_tokens)
    if seq_length is None:
        raise ValueError("pass --seq-length (prompt + response tokens) or --config")
    budget = _pick(args.max_tokens_per_micro_batch, config and config.train.max_tokens_per_micro_batch)
    if budget is not None:
        if budget < seq_length:
            raise ValueError(f"--max-tokens-per-micro-batch={budget} cannot hold a sequence of {seq_length} tokens; "
                             f"raise it to at least {seq_length}")
        # Packed rows are as long as the step's longest sample: at the longest possible,
        # budget // seq_length of them (shorter rows hold more samples, never more tokens).
        micro_batch_size = budget // seq_length
        notes.append(f"packed micro-batches of {budget} tokens: at worst {micro_batch_size} rows of {seq_length}")
    num_microbatches = args.num_microbatches
    if num_microbatches is None:
        num_microbatches = _microbatches_per_step(config, dp=dp, micro_batch_size=micro_batch_size) if config else 0
    return Request(
        arch=arch, dims=dims, micro_batch_size=micro_batch_size, seq_length=seq_length,
        dtype=_pick(args.dtype, config and config.model.dtype, "bfloat16"),
        recompute=_pick(args.recompute, config and config.model.recompute, "none"),
        distributed_optimizer=_pick(args.distributed_optimizer, config and config.train.distributed_optimizer, False),
        num_microbatches=num_microbatches, device=args.device, notes=tuple(notes),
    )


def _microbatches_per_step(config, *, dp: int, micro_batch_size: int) -> int:
    """Micro-batches of one optimizer step on one DP rank: the rollout batch split into minibatches."""
    rows = config.train.prompts_per_step * config.rollout.num_samples_per_prompt
    rows_per_rank = -(-rows // (config.train.num_minibatches * dp))
    return max(1, -(-rows_per_rank // micro_batch_size))


def estimate(request: Request, *, pipeline_rank: int | None = None) -> MemoryEstimate:
    return estimate_memory(
        arch=request.arch, dims=request.dims, micro_batch_size=request.micro_batch_size,
        seq_length=request.seq_length, dtype=request.dtype, recompute=request.recompute,
        distributed_optimizer=request.distributed_optimizer, num_microbatches=request.num_microbatches,
        device=request.device, pipeline_rank=pipeline_rank,
    )


def describe(request: Request) -> list[str]:
    arch, dims = request.arch, request.dims
    layout = f"TP{dims.tp} x PP{dims.pp}" + (f" (VPP{dims.vpp})" if dims.vpp > 1 else "") + f" x DP{dims.dp}"
    extras = [name for name, on in (("sequence parallel", dims.sequence_parallel),
                                    ("distributed optimizer", request.distributed_optimizer)) if on]
    return [
        f"model   {arch.family}, {arch.num_params / 1e9:.2f}B parameters: {arch.num_layers} layers, hidden"
        f" {arch.hidden_size}, {arch.num_attention_heads} heads / {arch.num_query_groups} KV heads,"
        f" ffn {arch.ffn_hidden_size}, vocab {arch.vocab_size}"
        + (", tied embeddings" if arch.tie_word_embeddings else ""),
        f"layout  {layout}" + "".join(f", {extra}" for extra in extras),
        f"step    micro-batch {request.micro_batch_size} x {request.seq_length} tokens, {request.dtype},"
        f" recompute {request.recompute}, device {request.device}"
        + (f", {request.num_microbatches} micro-batches per step" if request.num_microbatches else ""),
    ]


def report(args: argparse.Namespace) -> int:
    request = resolve(args)
    peak = estimate(request)
    stages = [estimate(request, pipeline_rank=rank) for rank in range(request.dims.pp)]
    if args.json:
        print(json.dumps({
            **peak.to_dict(),
            "per_pipeline_rank_total": [stage.total for stage in stages],
            "inputs": {"tp": request.dims.tp, "pp": request.dims.pp, "vpp": request.dims.vpp,
                       "dp": request.dims.dp, "sequence_parallel": request.dims.sequence_parallel,
                       "micro_batch_size": request.micro_batch_size, "seq_length": request.seq_length,
                       "dtype": request.dtype, "recompute": request.recompute,
                       "distributed_optimizer": request.distributed_optimizer,
                       "num_microbatches": request.num_microbatches, "device": request.device},
            "notes": list(request.notes),
        }))
        return 0
    print("\n".join(describe(request)))
    print()
    print(peak.table())
    if request.dims.pp > 1:
        print("per pipeline rank: " + ", ".join(f"{s.pipeline_rank}: {s.total / 2**30:.2f} GiB" for s in stages))
    for note in request.notes:
        print(f"note: {note}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return tool_main(build_parser(), report, argv)


if __name__ == "__main__":
    sys.exit(main())
