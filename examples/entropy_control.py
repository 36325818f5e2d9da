"""Hold the demo's entropy in a band: the measured-sign controller vs the fixed-sign one vs constant betas.

Every run starts from the demo's SFT model (run `examples/demo_cpu.py`
first) at the beta1-sweep settings of the README (two minibatches, lr 2e-4):
`algorithm.beta_schedule.kind=entropy_target` with `sign=measured` (each
beta moved the way its measured `entropy_sensitivity_beta*` says) and with
`sign=paper` (beta1 lowers entropy, beta2 raises it, always), and constant
betas for reference. With `--realized-step D` the constant runs and the
measured-sign controller also redo every step's updates with each beta
raised by D and rewound (`logging.realized_sensitivity_beta_step`), and that
controller steers by what the betas did through the optimizer
(`realized_entropy_sensitivity_beta*`) instead of the first-order estimate.
Per seed it prints the share of steps 20-100 whose entropy is inside the
band, the run means of both sensitivities, and draws the entropy curves with
the band and the betas over time to `<run-dir>/<out>/seed<N>.png`. Finished
runs are reused, so a second call only redraws.

    python examples/entropy_control.py --band 0.11,0.14 --seeds 1234,1 --realized-step 0.5
"""

from __future__ import annotations

import argparse
from pathlib import Path

from compare_losses import train_demo_rl

from megatron_gppo.metrics import read_metrics
from megatron_gppo.plots import entropy_control_figure

SWEEP_SETTINGS = ["train.num_minibatches=2", "train.lr=2e-4", "algorithm.loss=ce_gppo"]


def in_band_share(run_dir: Path, band: tuple[float, float], *, first_step: int = 20) -> float:
    values = [r["entropy"] for r in read_metrics(run_dir / "metrics.jsonl")
              if "entropy" in r and r["step"] >= first_step]
    return sum(band[0] <= v <= band[1] for v in values) / len(values)


def run_mean(run_dir: Path, key: str) -> float | None:
    values = [r[key] for r in read_metrics(run_dir / "metrics.jsonl") if key in r]
    return sum(values) / len(values) if values else None


def summary_line(label: str, run_dir: Path, band: tuple[float, float]) -> str:
    """In-band share, held-out accuracy first -> last, mean entropy and the beta1 sensitivities' run means."""
    evals = [r["eval_accuracy"] for r in read_metrics(run_dir / "metrics.jsonl") if "eval_accuracy" in r]
    line = (f"  {label:<28} {in_band_share(run_dir, band):>6.0%}   {evals[0]:.1%} -> {evals[-1]:.1%}   "
            f"entropy {run_mean(run_dir, 'entropy'):.4f}   d/d beta1: first order "
            f"{run_mean(run_dir, 'entropy_sensitivity_beta1'):+.5f}")
    realized = run_mean(run_dir, "realized_entropy_sensitivity_beta1")
    return line + (f", realized {realized:+.5f}" if realized is not None else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", default="runs/demo")
    parser.add_argument("--out", default="entropy_control", help="subdirectory of --run-dir for these runs")
    parser.add_argument("--band", default="0.11,0.14", help="entropy_low,entropy_high in nats per token")
    parser.add_argument("--seeds", default="1234,1")
    parser.add_argument("--constant-beta1", default="0,0.5,1", help="constant-beta runs to compare with (beta2=1)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--realized-step", type=float, default=None,
                        help="beta step of the what-if updates (logging.realized_sensitivity_beta_step); "
                             "the measured-sign controller then steers by the realized sensitivities")
    parser.add_argument("overrides", nargs="*", help="dotted overrides shared by every run")
    args = parser.parse_args()
    run, low_high = Path(args.run_dir), [float(x) for x in args.band.split(",")]
    band = (low_high[0], low_high[1])
    controller = ["algorithm.beta_schedule.kind=entropy_target", f"algorithm.beta_schedule.entropy_low={band[0]}",
                  f"algorithm.beta_schedule.entropy_high={band[1]}"]
    for seed in args.seeds.split(","):
        out = run / args.out / f"seed{seed}"
        what_if = [f"logging.realized_sensitivity_beta_step={args.realized_step}"] if args.realized_step else []
        runs = {f"constant beta1={b}": [f"algorithm.beta1={b}", "algorithm.beta2=1.0", *what_if]
                for b in args.constant_beta1.split(",")}
        measured = "controller, realized signs" if what_if else "controller, measured signs"
        runs[measured] = [*controller, "algorithm.beta_schedule.sign=measured", *what_if]
        runs["controller, paper signs"] = [*controller, "algorithm.beta_schedule.sign=paper"]
        dirs = {}
        for label, overrides in runs.items():
            dirs[label] = out / label.replace(", ", "_").replace(" ", "_").replace("=", "")
            train_demo_rl(run, output_dir=dirs[label], steps=args.steps, label=f"seed {seed}, {label}",
                          overrides=[*SWEEP_SETTINGS, f"train.seed={seed}", *args.overrides, *overrides])
        shares = {label: in_band_share(path, band) for label, path in dirs.items()}
        print(f"seed {seed}: share of steps 20-{args.steps} with entropy in [{band[0]}, {band[1]}], held-out "
              "accuracy first -> last, run means")
        for label, path in dirs.items():
            print(summary_line(label, path, band))
        best_constant = max((label for label in dirs if label.startswith("constant")), key=shares.get)
        shown = {measured: dirs[measured], "controller, paper signs": dirs["controller, paper signs"],
                 f"{best_constant} (best constant)": dirs[best_constant]}
        print(f"  figure: {entropy_control_figure(shown, band=band, output=out.parent / f'seed{seed}.png')}")


if __name__ == "__main__":
    main()
