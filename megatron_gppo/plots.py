"""PNG plots of a run's metrics.jsonl (and of several runs side by side), for a reader who has not read the code.

`write_run_plots` writes one PNG per panel under `run_dir/plots/`, plus
`summary.png`: reward, held-out accuracy, entropy and clip fractions on one page.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from megatron_gppo.metrics import read_metrics


@dataclass(frozen=True)
class Panel:
    title: str
    ylabel: str
    lines: dict[str, str]
    """Metric key -> what its line shows, in words (the legend)."""
    skip_if_constant: bool = False
    """Draw nothing when every line is flat (e.g. a constant beta schedule)."""


def panels(*, eval_samples: int | None = None) -> dict[str, Panel]:
    """File name -> panel; `eval_samples` is the k of avg@k / pass@k (from the run's config)."""
    k = eval_samples or "k"
    return {
        "reward": Panel("Training reward", "mean reward per sample",
                        {"reward_mean": "every sample generated in the step"}),
        "eval": Panel(f"Held-out accuracy ({k} samples per prompt)", "fraction correct",
                      {"eval_accuracy": f"avg@{k}: share of all samples that are correct",
                       "eval_pass_at_k": f"pass@{k}: share of prompts with a correct sample"}),
        "entropy": Panel("Policy entropy on its own samples", "nats per response token",
                         {"entropy": "mean token entropy before the update"}),
        "clip_fractions": Panel("Response tokens outside the clip range", "fraction of response tokens",
                                {"clip_frac_low": "low: ratio < 1 - eps_low, advantage < 0 (beta1 scales them)",
                                 "clip_frac_high": "high: ratio > 1 + eps_high, advantage > 0 (beta2 scales them)"}),
        "entropy_sensitivity": Panel("Which way each beta pushes the entropy (measured)",
                                     "d predicted entropy change / d beta",
                                     {"entropy_sensitivity_beta1": "beta1 (> 0: raising beta1 raises entropy)",
                                      "entropy_sensitivity_beta2": "beta2 (> 0: raising beta2 raises entropy)"}),
        "realized_entropy_sensitivity": Panel(
            "What each beta did to the entropy through the optimizer (what-if updates)",
            "entropy change per unit beta, this step's samples",
            {"realized_entropy_sensitivity_beta1": "beta1 (> 0: raising beta1 raised entropy)",
             "realized_entropy_sensitivity_beta2": "beta2 (> 0: raising beta2 raised entropy)"}),
        "betas": Panel("CE-GPPO betas (beta schedule)", "gradient scale of clipped tokens",
                       {"beta1": "beta1 (low side)", "beta2": "beta2 (high side)"}, skip_if_constant=True),
        "response_length": Panel("Response length", "tokens per response", {"response_length_mean": "mean"}),
    }


SUMMARY = ("reward", "eval", "entropy", "clip_fractions")


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [s for s, _ in points], [v for _, v in points]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def _draw(axes, panel: Panel, series: dict[str, tuple[list[int], list[float]]]) -> None:
    for key, (steps, values) in series.items():
        if steps:
            axes.plot(steps, values, marker="o" if len(steps) < 30 else None, label=panel.lines[key])
    axes.set_title(panel.title)
    axes.set_xlabel("training step")
    axes.set_ylabel(panel.ylabel)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")


def _eval_samples(run_dir: Path) -> int | None:
    config = run_dir / "config.yaml"
    if not config.is_file():
        return None
    return (yaml.safe_load(config.read_text()) or {}).get("train", {}).get("eval_samples_per_prompt")


def write_run_plots(run_dir: str | Path) -> list[Path]:
    """One PNG per panel that has data, and `summary.png`, under `run_dir/plots/`; returns the files written."""
    plt = _pyplot()
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    out_dir = run_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    drawn: dict[str, tuple[Panel, dict]] = {}
    for name, panel in panels(eval_samples=_eval_samples(run_dir)).items():
        series = {key: _series(records, key) for key in panel.lines}
        if not any(steps for steps, _ in series.values()):
            continue
        if panel.skip_if_constant and all(len(set(values)) <= 1 for _, values in series.values()):
            continue
        drawn[name] = (panel, series)
    written = []
    for name, (panel, series) in drawn.items():
        figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
        _draw(axes, panel, series)
        written.append(_save(plt, figure, out_dir / f"{name}.png"))
    on_summary = [name for name in SUMMARY if name in drawn]
    if on_summary:
        figure, grid = plt.subplots(2, 2, figsize=(13, 8), dpi=100)
        for axes, name in zip(grid.flat, on_summary):
            _draw(axes, *drawn[name])
        for axes in list(grid.flat)[len(on_summary):]:
            axes.set_visible(False)
        figure.suptitle(f"{run_dir}: {max(r['step'] for r in records)} training steps")
        written.append(_save(plt, figure, out_dir / "summary.png"))
    return written


def _save(plt, figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def compare_runs(runs: dict[str, str | Path], *, key: str, output: str | Path, title: str | None = None,
                 ylabel: str | None = None) -> Path:
    """One metric of several runs (label -> run dir) in one PNG."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    for label, run_dir in runs.items():
        steps, values = _series(read_metrics(Path(run_dir) / "metrics.jsonl"), key)
        if not steps:
            raise ValueError(f"{run_dir}: metrics.jsonl has no '{key}' values")
        axes.plot(steps, values, label=label)
    axes.set_title(title or key)
    axes.set_xlabel("training step")
    axes.set_ylabel(ylabel or key)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    return _save(plt, figure, output)


def entropy_control_figure(runs: dict[str, str | Path], *, band: tuple[float, float], output: str | Path) -> Path:
    """Entropy of several runs against a target band (top) and their betas over time (bottom), in one PNG."""
    plt = _pyplot()
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), dpi=100, sharex=True)
    top.axhspan(*band, color="green", alpha=0.12, label=f"target band [{band[0]:g}, {band[1]:g}]")
    for index, (label, run_dir) in enumerate(runs.items()):
        records = read_metrics(Path(run_dir) / "metrics.jsonl")
        color = f"C{index}"
        top.plot(*_series(records, "entropy"), color=color, label=label)
        bottom.plot(*_series(records, "beta1"), color=color, label=f"{label}: beta1")
        bottom.plot(*_series(records, "beta2"), color=color, linestyle="--", label=f"{label}: beta2")
    top.set_title("Policy entropy on its own samples")
    top.set_ylabel("nats per response token")
    bottom.set_title("CE-GPPO betas (solid: beta1, dashed: beta2)")
    bottom.set_xlabel("training step")
    bottom.set_ylabel("gradient scale of clipped tokens")
    for axes in (top, bottom):
        axes.grid(alpha=0.3)
        axes.legend(fontsize="x-small")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    return _save(plt, figure, output)
