"""Run metrics: `metrics.jsonl`, wandb, a live progress line and a final summary.

`metrics.jsonl` holds one JSON object per step (docs/metrics.md lists the keys). A
resumed run first drops the lines of steps after its checkpoint, so every step
appears once and a resumed run's file equals an uninterrupted one's.
"""

from __future__ import annotations

import json
import math
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from megatron_gppo.atomic import write_text_atomic
from megatron_gppo.config import LoggingConfig, redact_secrets

# Shown in the progress line and the summary, in this order, when present.
HEADLINE = ("reward_mean", "eval_accuracy", "entropy", "clip_frac_low", "clip_frac_high", "response_length_mean",
            "sft_loss")


def _parses(line: str) -> bool:
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False
    return True


@contextmanager
def _argv(argv: list[str]) -> Iterator[None]:
    """`sys.argv` is `argv` inside the block."""
    saved, sys.argv = sys.argv, argv
    try:
        yield
    finally:
        sys.argv = saved


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (missing file: none)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_after(path: Path, step: int) -> None:
    """Keep the records up to `step`; a last line cut short by a kill mid-write is dropped with them."""
    lines = path.read_text().splitlines() if path.exists() else []
    if lines and not _parses(lines[-1]):
        lines.pop()
    kept = [r for r in map(json.loads, filter(str.strip, lines)) if r["step"] <= step]
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


class MetricsLogger:
    """Writes each step's metrics to metrics.jsonl and wandb, and shows progress.

    Only the process that owns the run directory (global rank 0) creates one.
    """

    def __init__(self, *, run_dir: str | Path, config: LoggingConfig, run_config: dict[str, Any],
                 max_steps: int, start_step: int = 0):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        if self.path.exists():
            _truncate_after(self.path, start_step)
        self.config = config
        self.max_steps = max_steps
        self.start_step = start_step
        self.start_time = time.monotonic()
        self._wandb_run = None
        if config.wandb_mode != "disabled":
            import wandb

            # silent: our progress line and summary are the terminal's; wandb's own lines are not.
            # wandb records the command line; ours may carry rollout.api_key.
            with _argv(redact_secrets(sys.argv)):
                self._wandb_run = wandb.init(
                    mode=config.wandb_mode, dir=str(self.run_dir), project=config.wandb_project,
                    name=config.run_name or self.run_dir.name, config=run_config,
                    id=self._wandb_id(), resume="allow", settings=wandb.Settings(silent=True, console="off"),
                )

    def _wandb_id(self) -> str:
        """A stable wandb run id stored in the run directory, so resumes continue one run."""
        id_file = self.run_dir / "wandb_id"
        if not id_file.exists():
            write_text_atomic(id_file, uuid.uuid4().hex[:8])
        return id_file.read_text().strip()

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, **metrics}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._wandb_run is not None:
            self._wandb_run.log(metrics, step=step)
        if self.config.progress:
            print(self._progress_line(step, metrics), file=sys.stderr, flush=True)

    def _progress_line(self, step: int, metrics: dict[str, Any]) -> str:
        done = step - self.start_step
        elapsed = time.monotonic() - self.start_time
        eta = elapsed / done * (self.max_steps - step) if done > 0 else float("nan")
        shown = " ".join(f"{key}={_format(metrics[key])}" for key in HEADLINE if key in metrics)
        eta_text = f"{eta:.0f}s" if math.isfinite(eta) else "?"
        return f"[step {step}/{self.max_steps}] {shown} ({elapsed:.0f}s elapsed, ETA {eta_text})"

    def close(self) -> None:
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None
        print(summary_table(read_metrics(self.path)))


# Headline metrics with a better direction; the others (entropy, clip fractions, length) have none.
BEST = {"reward_mean": max, "eval_accuracy": max, "sft_loss": min}


def summary_table(records: list[dict[str, Any]]) -> str:
    """First, last and best value of each headline metric, as an aligned text table."""
    rows = [("metric", "first", "last", "best")]
    for key in HEADLINE:
        values = [(r["step"], r[key]) for r in records if key in r]
        if not values:
            continue
        (first_step, first), (last_step, last) = values[0], values[-1]
        best = BEST[key](v for _, v in values) if key in BEST else None
        rows.append((key, f"{_format(first)} (step {first_step})", f"{_format(last)} (step {last_step})",
                     "-" if best is None else _format(best)))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    lines.append("best: the highest reward and held-out accuracy, the lowest SFT loss; "
                 "'-' where neither direction is better")
    return "\n".join(lines)
