"""`rollout.mode=async`: the next step's rollouts are generated while this step trains.

Checked on tiny end-to-end runs: with `max_staleness=0` async is sync, metric
for metric; with 1, every trained sample is one policy version old (from its
own `weight_version`) once the producer runs ahead, never more; a run
stopped after a checkpoint and resumed (the checkpoint holds the finished
batch waiting for the next step) logs what the uninterrupted run logged; and
with partial rollouts no sample is older than one version either
(test_partial_rollouts.py checks a continued response token by token).
"""

from __future__ import annotations

import subprocess

import pytest

from megatron_gppo.metrics import read_metrics
from tests._tiny_models import computed_metrics, save_tiny_run
from tests.distributed.test_train_e2e import train_command

pytestmark = pytest.mark.distributed

MAX_STEPS = 4


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return save_tiny_run(tmp_path_factory.mktemp("async"))


def run(assets, out, *overrides) -> list[dict]:
    result = subprocess.run(train_command(assets, out, "checkpoint.save_every=2", "train.eval_every=2",
                                          "logging.plots=false", *overrides),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return read_metrics(out / "metrics.jsonl")


def test_async_with_max_staleness_0_is_sync(assets, tmp_path):
    steps = f"train.max_steps={MAX_STEPS}"
    synced = run(assets, tmp_path / "sync", steps, "algorithm.tis_cap=2.0")
    asynced = run(assets, tmp_path / "async", steps, "rollout.mode=async", "rollout.max_staleness=0")
    assert [computed_metrics(r) for r in asynced] == [computed_metrics(r) for r in synced]


def test_async_trains_one_version_old_samples_and_resumes_exactly(assets, tmp_path):
    uninterrupted = run(assets, tmp_path / "whole", f"train.max_steps={MAX_STEPS}", "rollout.mode=async")
    trained = [r for r in uninterrupted if "staleness_max" in r]
    assert [r["staleness_max"] for r in trained] == [0.0] + [1.0] * (MAX_STEPS - 1)
    assert all(r["staleness_mean"] == r["staleness_max"] and r["staleness_exceeded"] == 0 for r in trained)
    assert all(r["tis_weight_mean"] > 0 for r in trained)  # the off-policy correction is on by default

    resumed = tmp_path / "resumed"
    run(assets, resumed, "train.max_steps=2", "rollout.mode=async")
    records = run(assets, resumed, f"train.max_steps={MAX_STEPS}", "rollout.mode=async")
    assert [r["step"] for r in records] == [r["step"] for r in uninterrupted]
    assert [computed_metrics(r) for r in records] == [computed_metrics(r) for r in uninterrupted]


def test_partial_rollouts_keep_every_sample_within_one_version(assets, tmp_path):
    """With `rollout.partial` the sync does not wait for the next step's rollouts: it cuts them, and they
    finish on the new weights. Whatever got cut, no trained sample is older than one version."""
    records = run(assets, tmp_path / "partial", f"train.max_steps={MAX_STEPS}", "rollout.mode=async",
                  "rollout.partial=true", "rollout.max_new_tokens=24")
    trained = [r for r in records if "staleness_max" in r]
    assert len(trained) == MAX_STEPS and max(r["staleness_max"] for r in trained) <= 1
    assert all(0 <= r["partial_frac"] <= 1 and r["staleness_exceeded"] == 0 for r in trained)
    print(f"\npartial_frac by step: {[r['partial_frac'] for r in trained]}")
