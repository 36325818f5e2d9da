"""Entropy under different policy losses on the CPU demo task (run `examples/demo_cpu.py` first).

Each run starts from the same SFT model with the same seed and changes only
the loss; the entropy, accuracy and clip-fraction curves land in
`<run-dir>/<out>/`, and a table of them is printed.

    python examples/compare_losses.py                       # ppo vs ce_gppo beta1=0 / 1 (beta2=1)
    python examples/compare_losses.py --out beta1 --beta1 0,0.5,1 train.num_minibatches=2 train.lr=2e-4

At the demo defaults (one minibatch) about 0.2% of tokens are clipped and the
losses barely differ; two minibatches at lr 2e-4 clip ~1-2% below 1 - eps.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from megatron_gppo.metrics import read_metrics
from megatron_gppo.plots import compare_runs

EXAMPLES = Path(__file__).resolve().parent


def runs(beta1s: list[float], beta2s: list[float] = (1.0,), ppo: bool = True) -> dict[str, list[str]]:
    """ppo, then ce_gppo at each (beta1, beta2): label -> overrides (beta2 is named in the label unless it is 1)."""
    table = {"ppo": ["algorithm.loss=ppo"]} if ppo else {}
    for beta1 in beta1s:
        for beta2 in beta2s:
            label = f"ce_gppo beta1={beta1:g}" + (f" beta2={beta2:g}" if list(beta2s) != [1.0] else "")
            table[label] = ["algorithm.loss=ce_gppo", f"algorithm.beta1={beta1}", f"algorithm.beta2={beta2}"]
    return table


def train_demo_rl(run: Path, *, output_dir: Path, steps: int, overrides: list[str], label: str) -> None:
    """The demo's RL stage from `run`'s SFT model into `output_dir` (a finished run returns at once)."""
    data, sft_hf = run / "data", run / "sft" / "hf"
    if not (sft_hf / "config.json").exists():
        raise SystemExit(f"{sft_hf} is missing: run `python examples/demo_cpu.py --run-dir {run}` first")
    command = [sys.executable, "-m", "megatron_gppo.cli", "train", str(EXAMPLES / "configs" / "demo_cpu.yaml"),
               f"model.hf_path={sft_hf}", f"data.train_path={data / 'train.jsonl'}",
               f"data.eval_path={data / 'eval.jsonl'}", f"train.output_dir={output_dir}",
               f"train.max_steps={steps}", "logging.wandb_mode=disabled", "logging.progress=false", *overrides]
    print(f"+ {label}: megatron-gppo train ... {' '.join(overrides)}", flush=True)
    start = time.monotonic()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    print(f"  {time.monotonic() - start:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", default="runs/demo")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", default="compare", help="subdirectory of --run-dir for these runs")
    parser.add_argument("--beta1", default="0,1", help="comma-separated ce_gppo beta1 values")
    parser.add_argument("--beta2", default="1", help="comma-separated ce_gppo beta2 values")
    parser.add_argument("--no-ppo", action="store_true", help="skip the ppo baseline run")
    parser.add_argument("overrides", nargs="*", help="dotted overrides shared by every run")
    args = parser.parse_args()
    run = Path(args.run_dir)
    out = run / args.out
    dirs = {}
    for label, overrides in runs([float(b) for b in args.beta1.split(",")], [float(b) for b in args.beta2.split(",")],
                                 ppo=not args.no_ppo).items():
        dirs[label] = out / label.replace(" ", "_").replace("=", "")
        train_demo_rl(run, output_dir=dirs[label], steps=args.steps, overrides=[*args.overrides, *overrides],
                      label=label)
    compare_runs(dirs, key="entropy", output=out / "entropy.png", title="Policy entropy on its own samples",
                 ylabel="nats per response token")
    compare_runs(dirs, key="eval_accuracy", output=out / "eval_accuracy.png", title="Held-out accuracy (avg@k)",
                 ylabel="share of samples correct")
    compare_runs(dirs, key="reward_mean", output=out / "reward.png", title="Training reward",
                 ylabel="mean reward per sample")
    compare_runs(dirs, key="clip_frac_low", output=out / "clip_frac_low.png",
                 title="Tokens clipped low: ratio < 1 - eps_low, advantage < 0", ylabel="fraction of response tokens")
    print(f"{'run':<28} {'entropy first':>14} {'entropy last':>13} {'entropy mean':>13} {'clip low':>9} "
          f"{'of them HP':>11} {'clip high':>10} {'eval first':>11} {'eval last':>10}")
    for label, path in dirs.items():
        records = read_metrics(path / "metrics.jsonl")
        series = {key: [r[key] for r in records if key in r]
                  for key in ("entropy", "clip_frac_low", "clip_frac_low_hp", "clip_frac_high", "eval_accuracy")}
        mean = {key: sum(values) / len(values) for key, values in series.items()}
        entropy, evals = series["entropy"], series["eval_accuracy"]
        # Share of the beta1-gradient tokens that were high-probability when sampled (paper: mostly low).
        high_share = mean["clip_frac_low_hp"] / mean["clip_frac_low"] if mean["clip_frac_low"] else float("nan")
        print(f"{label:<28} {entropy[0]:>14.4f} {entropy[-1]:>13.4f} {mean['entropy']:>13.4f} "
              f"{mean['clip_frac_low']:>9.4f} {high_share:>11.2f} {mean['clip_frac_high']:>10.4f} "
              f"{evals[0]:>11.3f} {evals[-1]:>10.3f}")
    print(f"plots: {out}")


if __name__ == "__main__":
    main()
