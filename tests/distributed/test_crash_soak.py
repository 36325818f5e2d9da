"""SIGKILL at seeded random moments: every restart resumes, and the result equals an uninterrupted run's.

One tiny run (a checkpoint after every step) is killed several times, the
whole session each time (trainer and rollout server), and restarted on the
same directory; then once more to finish. Both rollout modes: in `async` a
kill also lands while the producer generates the next step's rollouts, and a
resume must take up the batch the checkpoint saved for its step. A restart spends most of its
time starting up, so each kill is timed from the attempt's first finished
step: a seeded random delay of up to `KILL_WINDOW_STEPS` step cycles
(measured on the uninterrupted reference run), which lands in rollout, the
update, the weight sync or the checkpoint write of a later step. The killed
run's final weights must equal the reference's bit for bit, and its
metrics.jsonl must hold each step exactly once with the same values (the
rollout server's own log-probs excepted: they depend on how requests
happened to be batched, ~1e-8). `pytest --soak-kills N` runs a longer soak.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from megatron_gppo.metrics import read_metrics
from tests._tiny_models import computed_metrics, save_tiny_run, tiny_run_overrides

pytestmark = pytest.mark.distributed

KILL_WINDOW_STEPS = 1.5
OVERRIDES = ("checkpoint.save_every=1", "checkpoint.keep_last=2", "data.eval_path=", "train.export_hf=true",
             "logging.plots=false")


def _command(assets, out, *overrides):
    return [sys.executable, "-m", "megatron_gppo.cli", "train", "examples/configs/demo_cpu.yaml",
            f"model.hf_path={assets / 'hf'}", f"train.output_dir={out}", *tiny_run_overrides(assets), *OVERRIDES,
            *overrides]


def _num_lines(path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


def _weights(hf_dir):
    tensors = {}
    for shard in sorted(hf_dir.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def _kill_after_progress(command, metrics_path, *, delay_s: float, timeout_s: float = 600) -> str:
    """Start `command`, SIGKILL its session `delay_s` after its first new metrics line; 'killed' or 'finished'."""
    before = _num_lines(metrics_path)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while _num_lines(metrics_path) <= before:
            if process.poll() is not None:
                return "finished"
            assert time.monotonic() < deadline, "no step finished"
            time.sleep(0.02)
        try:
            process.wait(timeout=delay_s)
            return "finished"
        except subprocess.TimeoutExpired:
            return "killed"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.mark.parametrize("mode, num_kills, max_steps", [("sync", 7, 20), ("async", 4, 12)])
def test_kills_at_random_moments_end_bit_identical(request, tmp_path, mode, num_kills, max_steps):
    assets = save_tiny_run(tmp_path / "assets")
    num_kills = request.config.getoption("--soak-kills") or num_kills
    max_steps = max(max_steps, 3 * num_kills)
    overrides = (f"rollout.mode={mode}", f"train.max_steps={max_steps}")
    reference = tmp_path / "reference"
    result = subprocess.run(_command(assets, reference, *overrides), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    # One step cycle: rollout, update, sync and checkpoint, from the spacing of the metrics lines' writes.
    checkpoint_times = sorted(p.stat().st_mtime for p in (reference / "checkpoints").glob("step_*"))
    cycle_s = (checkpoint_times[-1] - checkpoint_times[0]) / max(len(checkpoint_times) - 1, 1)

    rng = random.Random(0)
    killed = tmp_path / "killed"
    metrics_path = killed / "metrics.jsonl"
    outcomes, progress = [], []
    for _ in range(num_kills):
        outcomes.append(_kill_after_progress(_command(assets, killed, *overrides), metrics_path,
                                             delay_s=rng.uniform(0, KILL_WINDOW_STEPS) * cycle_s))
        progress.append(len(read_metrics(metrics_path)))
    print(f"\nstep cycle {cycle_s:.2f}s; {outcomes.count('killed')} kills; steps logged after each: {progress}")
    assert outcomes.count("killed") == num_kills, "the run finished before every kill: raise max_steps"
    final = subprocess.run(_command(assets, killed, *overrides), capture_output=True, text=True, timeout=900)
    assert final.returncode == 0, final.stderr[-3000:]

    expected, got = _weights(reference / "hf"), _weights(killed / "hf")
    assert expected.keys() == got.keys()
    assert [name for name in expected if not expected[name].equal(got[name])] == []
    want, have = read_metrics(reference / "metrics.jsonl"), read_metrics(metrics_path)
    assert [r["step"] for r in have] == [r["step"] for r in want] == list(range(1, max_steps + 1))
    for a, b in zip(want, have):
        assert computed_metrics(a) == computed_metrics(b), a["step"]
