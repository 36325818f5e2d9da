#!/usr/bin/env python
"""Load-test `megatron-gppo serve` (or any SGLang server): concurrent clients on /generate for a fixed time.

Starts its own server on 127.0.0.1 with the demo-sized model (or drives
`--url`), runs `--clients` clients that each send one request after another
(random prompt ids, sampled, `--max-new-tokens`) for `--duration-s` seconds,
and prints one JSON object: requests, failed requests, requests/s,
generated tokens/s and the p50/p99 latency. Failed means anything but a 200
with a complete answer; the first few failures are printed to stderr.

    python tools/bench_serve.py [--clients 64 --duration-s 60] [--url http://host:port --api-key KEY]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from megatron_gppo.cli import OneLineParser, tool_main

_MAX_PRINTED_FAILURES = 5


@dataclass
class Tally:
    latencies_s: list[float] = field(default_factory=list)
    num_tokens: int = 0
    failures: list[str] = field(default_factory=list)


async def client_loop(session, url: str, *, deadline: float, seed: int, vocab_size: int, max_new_tokens: int,
                      tally: Tally) -> None:
    """One client: request after request until the deadline."""
    import aiohttp

    rng = random.Random(seed)
    while time.monotonic() < deadline:
        body = {"input_ids": [rng.randrange(vocab_size) for _ in range(rng.randint(2, 12))],
                "sampling_params": {"temperature": 1.0, "max_new_tokens": max_new_tokens}, "return_logprob": True}
        started = time.monotonic()
        try:
            async with session.post(f"{url}/generate", json=body) as response:
                answer = await response.json(content_type=None)
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}: {answer}")
                num_tokens = answer["meta_info"]["completion_tokens"]
                if len(answer["output_ids"]) != num_tokens:
                    raise RuntimeError(f"incomplete answer: {answer}")
        except (aiohttp.ClientError, asyncio.TimeoutError, RuntimeError, KeyError, ValueError) as err:
            tally.failures.append(f"{type(err).__name__}: {err}"[:300])
            continue
        tally.latencies_s.append(time.monotonic() - started)
        tally.num_tokens += num_tokens


async def drive(url: str, *, num_clients: int, duration_s: float, api_key: str, vocab_size: int,
                max_new_tokens: int) -> dict:
    import aiohttp

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    tally = Tally()
    connector = aiohttp.TCPConnector(limit=num_clients)
    timeout = aiohttp.ClientTimeout(total=max(120.0, 4 * duration_s))
    async with aiohttp.ClientSession(headers=headers, connector=connector, timeout=timeout) as session:
        started = time.monotonic()
        deadline = started + duration_s
        clients = [asyncio.create_task(client_loop(session, url, deadline=deadline, seed=i, vocab_size=vocab_size,
                                                   max_new_tokens=max_new_tokens, tally=tally))
                   for i in range(num_clients)]
        while not all(c.done() for c in clients):
            await asyncio.wait(clients, timeout=10.0)
            print(f"  {time.monotonic() - started:5.0f}s: {len(tally.latencies_s)} requests, "
                  f"{len(tally.failures)} failed", file=sys.stderr)
        elapsed = time.monotonic() - started
    latencies = sorted(tally.latencies_s)
    for failure in tally.failures[:_MAX_PRINTED_FAILURES]:
        print(f"failed: {failure}", file=sys.stderr)
    quantiles = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    return {
        "clients": num_clients, "duration_s": round(elapsed, 2), "max_new_tokens": max_new_tokens,
        "requests": len(latencies) + len(tally.failures), "failed": len(tally.failures),
        "requests_per_s": round(len(latencies) / elapsed, 2),
        "generated_tokens_per_s": round(tally.num_tokens / elapsed, 1),
        "latency_p50_s": round(quantiles[49], 4) if latencies else None,
        "latency_p99_s": round(quantiles[98], 4) if latencies else None,
    }


def run(args: argparse.Namespace) -> int:
    if args.clients < 1 or args.duration_s <= 0 or args.max_new_tokens < 1:
        raise ValueError("--clients and --max-new-tokens must be >= 1 and --duration-s > 0")
    if args.url:
        result = asyncio.run(drive(args.url.rstrip("/"), num_clients=args.clients, duration_s=args.duration_s,
                                   api_key=args.api_key, vocab_size=args.vocab_size,
                                   max_new_tokens=args.max_new_tokens))
    else:
        from megatron_gppo.rollout.local_servers import LocalServers
        from megatron_gppo.tasks.tiny_model import save_tiny_model

        with tempfile.TemporaryDirectory(prefix="bench-serve-") as work:
            model_dir = save_tiny_model(Path(work) / "model", seed=0)
            print("serving the demo-sized model", file=sys.stderr)
            with LocalServers(model_path=model_dir, api_key=args.api_key, log_dir=Path(work) / "logs") as servers:
                result = asyncio.run(drive(servers.urls[0], num_clients=args.clients, duration_s=args.duration_s,
                                           api_key=args.api_key, vocab_size=args.vocab_size,
                                           max_new_tokens=args.max_new_tokens))
    print(json.dumps(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    parser.add_argument("--duration-s", type=float, default=60.0, help="how long they send (default 60)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--url", default="", help="a running server (default: start one with the demo model)")
    parser.add_argument("--api-key", default="")
    parser.add_argument("--vocab-size", type=int, default=16, help="prompt ids are drawn below this")
    return parser


def main(argv: list[str] | None = None) -> int:
    return tool_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
