"""`megatron-gppo serve --model-path DIR`: the SGLang-protocol CPU rollout server."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-path", required=True, help="Hugging Face model directory")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=30000, help="port to listen on (default 30000)")
    parser.add_argument("--api-key", default="", help="require 'Authorization: Bearer KEY' on every request")


def run(args: argparse.Namespace) -> int:
    raise ValueError("the rollout server is not available yet in this version")
