"""`megatron-gppo train` end to end: TP=2 Megatron policy, a local rollout server, eval, checkpoints, plots."""

import json
import subprocess
import sys

import pytest

from megatron_gppo.metrics import read_metrics
from megatron_gppo.tasks.arithmetic import split_problems, write_jsonl
from tests._tiny_models import save_test_model

pytestmark = pytest.mark.distributed

CONTRACT_KEYS = {"step", "reward_mean", "entropy", "clip_frac_low", "clip_frac_high", "loss"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    train, held_out = split_problems(num_train=64, num_eval=4, seed=0)
    write_jsonl(train, root / "train.jsonl")
    write_jsonl(held_out, root / "eval.jsonl")
    save_test_model(root / "hf")
    return root


def train_command(assets, out, *overrides):
    return [sys.executable, "-m", "megatron_gppo.cli", "train", "examples/configs/demo_cpu.yaml",
            f"model.hf_path={assets / 'hf'}", f"data.train_path={assets / 'train.jsonl'}",
            f"data.eval_path={assets / 'eval.jsonl'}", f"train.output_dir={out}",
            "train.prompts_per_step=4", "rollout.num_samples_per_prompt=4", "rollout.max_new_tokens=6",
            "train.micro_batch_size=8", "train.eval_samples_per_prompt=2", "algorithm.max_refill_rounds=0",
            "logging.wandb_mode=disabled", *overrides]


def test_tensor_parallel_run_writes_metrics_checkpoints_and_plots(assets, tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(
        train_command(assets, out, "parallel.tensor_parallel=2", "train.max_steps=2", "train.eval_every=2",
                      "checkpoint.save_every=1", "checkpoint.keep_last=1"),
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2]
    assert "eval_accuracy" in records[0] and "eval_pass_at_k" in records[2]
    for record in records[1:]:
        assert CONTRACT_KEYS <= record.keys()
        assert record["entropy"] > 0 and record["num_tokens"] > 0
        # The rollout server (transformers) and the TP=2 Megatron policy hold the
        # same weights after every sync, so their log-probs agree closely.
        assert record["rollout_logprob_abs_diff"] < 1e-3
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["latest", "step_00000002"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    for name in ("reward", "entropy", "clip_fractions", "eval"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 1000
    saved = json.loads(json.dumps(__import__("yaml").safe_load((out / "config.yaml").read_text())))
    assert saved["parallel"]["tensor_parallel"] == 2
