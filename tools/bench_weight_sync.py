#!/usr/bin/env python
"""Benchmark weight sync to `megatron-gppo serve` on loopback: bucketed vs per-tensor broadcast vs disk.

Builds a random Qwen2-architecture model (about 122M parameters by default,
fp32), starts its own server(s) on 127.0.0.1, syncs the weights several
times with each method and prints one JSON object: bytes/s (median over
repeats, after a warm-up) per method.

    python tools/bench_weight_sync.py [--num-layers 12 --hidden-size 768 --repeats 3]
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from megatron_gppo.cli import OneLineParser


def build_model(path: Path, *, hidden_size: int, num_layers: int, vocab_size: int, intermediate_size: int):
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=num_layers, num_attention_heads=hidden_size // 64, num_key_value_heads=2,
                         max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(path)
    return model


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden-size", type=int, default=768)
    parser.add_argument("--num-layers", type=int, default=12)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--intermediate-size", type=int, default=2048)
    parser.add_argument("--num-servers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed syncs per method, after one warm-up")
    parser.add_argument("--bucket-mb", type=int, nargs="+", default=[512, 64],
                        help="bucket sizes of the bucketed runs (MiB)")
    parser.add_argument("--work-dir", default="", help="where the model and dumps go (default: a temporary directory)")
    args = parser.parse_args(argv)

    import torch

    from megatron_gppo.rollout.client import SGLangClient
    from megatron_gppo.rollout.local_servers import LocalServers
    from megatron_gppo.rollout.weight_sync import MiB, DiskWeightSync, DistributedWeightSync

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-weight-sync-"))
    model = build_model(work / "model", hidden_size=args.hidden_size, num_layers=args.num_layers,
                        vocab_size=args.vocab_size, intermediate_size=args.intermediate_size)
    named = [(name, param.detach()) for name, param in model.named_parameters()]
    num_params = sum(t.numel() for _, t in named)
    num_bytes = sum(t.numel() * t.element_size() for _, t in named)

    methods = {f"distributed_bucketed_{mb}MiB":
               (lambda c, mb=mb: DistributedWeightSync(client=c, bucket_bytes=mb * MiB)) for mb in args.bucket_mb}
    methods["distributed_per_tensor"] = lambda c: DistributedWeightSync(client=c, bucket_bytes=1)
    methods["disk"] = lambda c: DiskWeightSync(client=c, output_dir=work / "dumps")

    results = {}
    with LocalServers(model_path=work / "model", num_servers=args.num_servers, log_dir=work / "logs") as servers:
        client = SGLangClient(server_urls=servers.urls, progress=False)
        for name, make in methods.items():
            sync = make(client)
            seconds, buckets = [], 0
            for repeat in range(args.repeats + 1):
                version = f"{name}-{repeat}"
                start = time.perf_counter()
                stats = sync.sync(named, version=version)
                elapsed = time.perf_counter() - start
                assert set(client.weight_versions().values()) == {version}
                if repeat > 0:  # the first run is a warm-up (group creation, page cache)
                    seconds.append(elapsed)
                buckets = stats.num_buckets
            sync.close()
            median = statistics.median(seconds)
            results[name] = {"bytes_per_s": num_bytes / median, "gb_per_s": num_bytes / median / 1e9,
                             "seconds_median": median, "seconds": [round(s, 4) for s in seconds],
                             "num_buckets": buckets}
        client.close()

    print(json.dumps({
        "model": {"architecture": "Qwen2ForCausalLM", "num_parameters": num_params, "bytes": num_bytes,
                  "dtype": "float32", "num_tensors": len(named)},
        "num_servers": args.num_servers, "transport": "loopback (127.0.0.1), gloo for distributed",
        "torch": torch.__version__, "repeats": args.repeats, "results": results,
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
