"""Entropy under different policy losses on the CPU demo task (run `examples/demo_cpu.py` first).

Each run starts from the same SFT model with the same seed and changes one
key; the entropy and accuracy curves land in `<run-dir>/compare/`.

    python examples/compare_losses.py                       # ppo vs ce_gppo beta1=0.0 / 1.0
    python examples/compare_losses.py --out offpolicy train.num_minibatches=4 train.lr=3e-4
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from megatron_gppo.metrics import read_metrics
from megatron_gppo.plots import compare_runs

EXAMPLES = Path(__file__).resolve().parent
RUNS = {
    "ppo": ["algorithm.loss=ppo"],
    "ce_gppo beta1=0": ["algorithm.loss=ce_gppo", "algorithm.beta1=0.0", "algorithm.beta2=1.0"],
    "ce_gppo beta1=1": ["algorithm.loss=ce_gppo", "algorithm.beta1=1.0", "algorithm.beta2=1.0"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", default="runs/demo")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", default="compare", help="subdirectory of --run-dir for these runs")
    parser.add_argument("overrides", nargs="*", help="dotted overrides shared by every run")
    args = parser.parse_args()
    run = Path(args.run_dir)
    data, sft_hf = run / "data", run / "sft" / "hf"
    if not (sft_hf / "config.json").exists():
        raise SystemExit(f"{sft_hf} is missing: run `python examples/demo_cpu.py --run-dir {run}` first")
    out = run / args.out
    dirs = {}
    for label, overrides in RUNS.items():
        dirs[label] = out / label.replace(" ", "_").replace("=", "")
        command = [sys.executable, "-m", "megatron_gppo.cli", "train", str(EXAMPLES / "configs" / "demo_cpu.yaml"),
                   f"model.hf_path={sft_hf}", f"data.train_path={data / 'train.jsonl'}",
                   f"data.eval_path={data / 'eval.jsonl'}", f"train.output_dir={dirs[label]}",
                   f"train.max_steps={args.steps}", "logging.wandb_mode=disabled", "logging.progress=false", *args.overrides, *overrides]
        print(f"+ {label}: megatron-gppo train ... {' '.join(overrides)}", flush=True)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    compare_runs(dirs, key="entropy", output=out / "entropy.png", title="Policy entropy (nats per token)")
    compare_runs(dirs, key="eval_accuracy", output=out / "eval_accuracy.png", title="Held-out accuracy (avg@k)")
    compare_runs(dirs, key="clip_frac_low", output=out / "clip_frac_low.png", title="Fraction clipped below 1 - eps")
    print(f"{'run':<18} {'entropy first':>14} {'entropy last':>13} {'entropy mean':>13} {'eval first':>11} {'eval last':>10}")
    for label, path in dirs.items():
        records = read_metrics(path / "metrics.jsonl")
        entropy = [r["entropy"] for r in records if "entropy" in r]
        evals = [r["eval_accuracy"] for r in records if "eval_accuracy" in r]
        print(f"{label:<18} {entropy[0]:>14.4f} {entropy[-1]:>13.4f} {sum(entropy) / len(entropy):>13.4f} "
              f"{evals[0]:>11.3f} {evals[-1]:>10.3f}")
    print(f"plots: {out}")


if __name__ == "__main__":
    main()
