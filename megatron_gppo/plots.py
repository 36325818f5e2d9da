"""PNG plots of a run's metrics.jsonl (and of several runs side by side)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megatron_gppo.metrics import read_metrics

# file name -> (title, metric keys drawn in it)
PANELS = {
    "reward": ("Reward (mean over samples)", ("reward_mean",)),
    "eval": ("Held-out accuracy (avg@k) and pass@k", ("eval_accuracy", "eval_pass_at_k")),
    "entropy": ("Policy entropy (nats per token)", ("entropy",)),
    "clip_fractions": ("Clipped-token fractions", ("clip_frac_low", "clip_frac_high")),
    "betas": ("CE-GPPO beta1 / beta2", ("beta1", "beta2")),
    "response_length": ("Response length (tokens)", ("response_length_mean",)),
}


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [s for s, _ in points], [v for _, v in points]


def _new_axes(title: str):
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.6), dpi=100)
    axes.set_title(title)
    axes.set_xlabel("step")
    axes.grid(alpha=0.3)
    return plt, figure, axes


def write_run_plots(run_dir: str | Path) -> list[Path]:
    """One PNG per panel that has data, under `run_dir/plots/`; returns the files written."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    out_dir = run_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    written = []
    for name, (title, keys) in PANELS.items():
        series = {key: _series(records, key) for key in keys}
        if not any(steps for steps, _ in series.values()):
            continue
        plt, figure, axes = _new_axes(title)
        for key, (steps, values) in series.items():
            if steps:
                axes.plot(steps, values, marker="o" if len(steps) < 30 else None, label=key)
        axes.legend()
        figure.tight_layout()
        path = out_dir / f"{name}.png"
        figure.savefig(path)
        plt.close(figure)
        written.append(path)
    return written


def compare_runs(runs: dict[str, str | Path], *, key: str, output: str | Path, title: str | None = None) -> Path:
    """One metric of several runs (label -> run dir) in one PNG."""
    plt, figure, axes = _new_axes(title or key)
    for label, run_dir in runs.items():
        steps, values = _series(read_metrics(Path(run_dir) / "metrics.jsonl"), key)
        if not steps:
            raise ValueError(f"{run_dir}: metrics.jsonl has no '{key}' values")
        axes.plot(steps, values, label=label)
    axes.legend()
    figure.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output)
    plt.close(figure)
    return output
