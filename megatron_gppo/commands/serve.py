"""`megatron-gppo serve --model-path DIR`: the SGLang-protocol CPU rollout server."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-path", required=True, help="Hugging Face model directory")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=30000, help="port to listen on; 0 picks a free one (default 30000)")
    parser.add_argument("--api-key", default="", help="require 'Authorization: Bearer KEY' on every request")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="model dtype (default float32)")
    parser.add_argument("--max-running-requests", type=int, default=128,
                        help="sequences decoded together in one batch (default 128)")
    parser.add_argument("--max-prefill-tokens", type=int, default=16384,
                        help="padded prompt tokens per prefill forward (default 16384)")
    parser.add_argument("--random-seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--num-threads", type=int, default=0, help="torch CPU threads; 0 keeps torch's default")
    parser.add_argument("--context-length", type=int, default=0,
                        help="longest prompt + response; 0 uses the model's max_position_embeddings")
    parser.add_argument("--weight-version", default="default", help="initial weight version (default 'default')")
    parser.add_argument("--max-request-mb", type=int, default=256,
                        help="largest request body accepted; larger ones get 413 (default 256)")
    parser.add_argument("--request-log", default="",
                        help="append every request received (method, path, JSON body) to this file as JSON lines, "
                             "to see what a client sends")


def run(args: argparse.Namespace) -> int:
    from megatron_gppo.rollout.server import ServerArgs, run_server

    for name in ("max_running_requests", "max_prefill_tokens", "max_request_mb"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    run_server(ServerArgs(
        model_path=args.model_path, host=args.host, port=args.port, api_key=args.api_key, dtype=args.dtype,
        max_running_requests=args.max_running_requests, max_prefill_tokens=args.max_prefill_tokens,
        random_seed=args.random_seed, num_threads=args.num_threads, context_length=args.context_length,
        weight_version=args.weight_version, max_request_mb=args.max_request_mb, request_log=args.request_log,
    ))
    return 0
