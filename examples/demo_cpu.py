"""The CPU demo, end to end: a tiny Qwen2 model learns `a+b=` -> `\\boxed{a+b}`.

1. Write the task (disjoint train / held-out problems) and a randomly
   initialised tiny Qwen2-architecture model with a character tokenizer, in
   Hugging Face format.
2. SFT warm-up through the Megatron policy (`megatron-gppo sft`), stopped in
   the middle of the learning curve to leave room for RL.
3. CE-GPPO (`megatron-gppo train`) with a local SGLang-protocol rollout
   server that receives the new weights after every step; held-out accuracy
   (avg@k) is measured at the SFT start and during training.

    python examples/demo_cpu.py                     # everything, about 10 minutes on 2 cores
    python examples/demo_cpu.py algorithm.beta1=1   # extra overrides go to the RL run

Finished stages are skipped when run again; delete `runs/demo` to start over.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from megatron_gppo.metrics import read_metrics
from megatron_gppo.tasks.arithmetic import split_problems, write_jsonl
from megatron_gppo.tasks.tiny_model import save_tiny_model

EXAMPLES = Path(__file__).resolve().parent


def megatron_gppo(*args: str) -> None:
    command = [sys.executable, "-m", "megatron_gppo.cli", *args]
    print("+ megatron-gppo " + " ".join(args), flush=True)
    subprocess.run(command, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", default="runs/demo", help="where data, models and logs go")
    parser.add_argument("overrides", nargs="*", help="dotted overrides for the RL run")
    args = parser.parse_args()
    run = Path(args.run_dir)

    data = run / "data"
    if not (data / "eval.jsonl").exists():
        train, held_out = split_problems(num_train=9000, num_eval=200, seed=0)
        write_jsonl(train, data / "train.jsonl")
        write_jsonl(held_out, data / "eval.jsonl")
    if not (run / "init_hf" / "config.json").exists():
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # a bar for one tiny shard says nothing
        save_tiny_model(run / "init_hf", seed=0)

    sft_hf = run / "sft" / "hf"
    if not (sft_hf / "config.json").exists():
        megatron_gppo("sft", str(EXAMPLES / "configs" / "demo_sft.yaml"), f"model.hf_path={run / 'init_hf'}",
                      f"data.train_path={data / 'train.jsonl'}", f"train.output_dir={run / 'sft'}")

    rl = run / "rl"
    megatron_gppo("train", str(EXAMPLES / "configs" / "demo_cpu.yaml"), f"model.hf_path={sft_hf}",
                  f"data.train_path={data / 'train.jsonl'}", f"data.eval_path={data / 'eval.jsonl'}",
                  f"train.output_dir={rl}", *args.overrides)

    evals = [(r["step"], r["eval_accuracy"]) for r in read_metrics(rl / "metrics.jsonl") if "eval_accuracy" in r]
    (first_step, first), (last_step, last) = evals[0], evals[-1]
    print(f"\nheld-out accuracy (avg@k): {100 * first:.1f}% at step {first_step} (SFT start) -> "
          f"{100 * last:.1f}% at step {last_step} ({100 * (last - first):+.1f} points)")
    print(f"plots: {rl / 'plots'} (summary.png: everything on one page)")
    print(f"the trained model: {rl / 'hf'}; try `megatron-gppo serve --model-path {rl / 'hf'}`")


if __name__ == "__main__":
    main()
