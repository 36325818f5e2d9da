#!/usr/bin/env python
"""Steps per second of `rollout.mode=sync` against `async`, same config and seed, measured in one run.

Each mode trains the CPU demo's RL stage (examples/configs/demo_cpu.yaml:
the demo's tiny model, one local rollout server, one trainer process) for
`--steps` steps; the first step (start-up, and in async the one batch nobody
generated ahead) is left out of the rates. `sync` runs at each thread setting
in `--sync-threads` (its trainer and server take turns, so each may use every
core), `async` with the cores split between them. Prints one JSON line per
run:

  mode, cpu_threads, steps_per_s, trainer_idle_frac (the trainer waited for
  rollouts: `rollout_wait_s` / step time), server_idle_frac (1 - time spent
  generating and scoring, `rollout_s`, / step time)

and a last line with `async_over_best_sync`, the ratio the README quotes, next
to `overlap_bound` (what perfectly overlapping the best sync run's rollout and
update times would give) and how much slower each half ran in async
(`rollout_slowdown`, `update_slowdown`: they share the cores).

    python tools/bench_pipeline.py                       # about 4 minutes on 2 cores
    python tools/bench_pipeline.py --model-path runs/demo/sft/hf --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from megatron_gppo.cli import OneLineParser
from megatron_gppo.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def prepare(work: Path, model_path: str | None) -> tuple[Path, Path]:
    """The demo's data and (unless given) its untrained tiny model, under `work`."""
    from megatron_gppo.tasks.arithmetic import split_problems, write_jsonl
    from megatron_gppo.tasks.tiny_model import save_tiny_model

    train, _ = split_problems(num_train=2000, num_eval=10, seed=0)
    write_jsonl(train, work / "train.jsonl")
    if model_path:
        return Path(model_path), work / "train.jsonl"
    save_tiny_model(work / "init_hf", seed=0)
    return work / "init_hf", work / "train.jsonl"


def run_mode(*, mode: str, cpu_threads: int, steps: int, model: Path, train_path: Path, out: Path,
             extra: list[str]) -> dict:
    command = [sys.executable, "-m", "megatron_gppo.cli", "train", str(ROOT / "examples/configs/demo_cpu.yaml"),
               f"model.hf_path={model}", f"data.train_path={train_path}", "data.eval_path=",
               f"train.output_dir={out}", f"train.max_steps={steps}", f"rollout.mode={mode}",
               f"train.cpu_threads={cpu_threads}", "checkpoint.save_every=0", "train.export_hf=false",
               "logging.wandb_mode=disabled", "logging.plots=false", *extra]
    print(f"bench_pipeline: {mode}, {cpu_threads} threads each ...", file=sys.stderr, flush=True)
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"bench_pipeline: the {mode} run failed:\n{result.stderr[-3000:]}")
    records = [r for r in read_metrics(out / "metrics.jsonl") if r["step"] > 1]
    total_s = sum(r["step_time_s"] for r in records)
    rollout_s = sum(r["rollout_s"] for r in records)
    # What the trainer did besides waiting for rollouts: old log-probs, updates, weight sync.
    update_s = total_s - sum(r["rollout_wait_s"] for r in records)
    return {"mode": mode, "cpu_threads": cpu_threads, "steps": len(records),
            "steps_per_s": len(records) / total_s,
            "trainer_idle_frac": 1 - update_s / total_s,
            "server_idle_frac": max(0.0, 1 - rollout_s / total_s),
            "rollout_s_mean": rollout_s / len(records), "update_s_mean": update_s / len(records),
            "staleness_mean": sum(r["staleness_mean"] for r in records) / len(records)}


def main(argv=None) -> None:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="steps per run, the first left out (default 12)")
    parser.add_argument("--model-path", help="HF model to train (default: the demo's untrained tiny model)")
    parser.add_argument("--sync-threads", type=int, nargs="+",
                        help="thread settings tried for sync (default: all cores, and half of them)")
    parser.add_argument("overrides", nargs="*", help="extra config overrides for every run")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is left out)")
    cores = os.cpu_count() or 1
    sync_threads = args.sync_threads or sorted({cores, max(1, cores // 2)})
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        work = Path(tmp)
        model, train_path = prepare(work, args.model_path)
        rows = [run_mode(mode="sync", cpu_threads=threads, steps=args.steps, model=model, train_path=train_path,
                         out=work / f"sync-{threads}", extra=args.overrides) for threads in sync_threads]
        rows.append(run_mode(mode="async", cpu_threads=max(1, cores // 2), steps=args.steps, model=model,
                             train_path=train_path, out=work / "async", extra=args.overrides))
    for row in rows:
        print(json.dumps(row))
    sync = max((r for r in rows if r["mode"] == "sync"), key=lambda r: r["steps_per_s"])
    asynced = rows[-1]
    # Perfect overlap of the best sync run's two halves would give this ratio; the measured one falls short
    # by how much each half slows down when they share the cores.
    bound = (sync["rollout_s_mean"] + sync["update_s_mean"]) / max(sync["rollout_s_mean"], sync["update_s_mean"])
    print(json.dumps({"async_over_best_sync": asynced["steps_per_s"] / sync["steps_per_s"], "overlap_bound": bound,
                      "rollout_slowdown": asynced["rollout_s_mean"] / sync["rollout_s_mean"],
                      "update_slowdown": asynced["update_s_mean"] / sync["update_s_mean"], "cores": cores}))


if __name__ == "__main__":
    main()
