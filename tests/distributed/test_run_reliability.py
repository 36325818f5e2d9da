"""Faults a `megatron-gppo train` run meets, end to end: it stops on purpose, with one line and a checkpoint.

- Non-finite updates: from step 2 on one gradient element is NaN (injected
  after the real backward pass). Every such update is skipped (the weights of
  steps 1, 2 and 3 are identical), counted in `skipped_steps`, and
  `train.max_skipped_steps=2` steps in a row stop the run: exit code 1, one
  line, the checkpoint of the last finished step.
  The same run has an API key: no file it writes (config, checkpoints,
  metrics, wandb, server logs) contains it.
- A checkpoint directory on a read-only filesystem: the first save fails, the
  run exits 1 with one line naming the directory and the reason.
- Rollout servers killed mid-run (SIGKILL) are restarted by the trainer and
  synced before they generate again (the trainer's and the servers' log-probs
  keep agreeing to float rounding); with two servers the other one takes the
  requests meanwhile. A server that cannot start again ends the run with one
  line naming it, and a checkpoint of the last finished step.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from megatron_gppo.metrics import read_metrics
from tests._tiny_models import save_tiny_run, tiny_run_overrides

pytestmark = pytest.mark.distributed

POISONED_TRAIN = """
import sys
from megatron_gppo.cli import main
from megatron_gppo.model.policy import Policy

forward_backward = Policy.forward_backward
num_calls = [0]

def poisoned(self, batch, **kwargs):
    loss, metrics = forward_backward(self, batch, **kwargs)
    num_calls[0] += 1
    if num_calls[0] > UPDATES_PER_STEP:  # every update from step 2 on
        next(self.model[0].parameters()).main_grad.view(-1)[0] = float("nan")
    return loss, metrics

Policy.forward_backward = poisoned
sys.exit(main(sys.argv[1:]))
"""
UPDATES_PER_STEP = 2  # the demo config's num_epochs x num_minibatches
API_KEY = "never-write-this-key-0123"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return save_tiny_run(tmp_path_factory.mktemp("faults"))


def train_args(assets, out, *overrides):
    return ["train", "examples/configs/demo_cpu.yaml", f"model.hf_path={assets / 'hf'}", f"train.output_dir={out}",
            *tiny_run_overrides(assets), "data.eval_path=", *overrides]


def test_non_finite_updates_are_skipped_then_stop_the_run(assets, tmp_path):
    from megatron_gppo.checkpoint.convert import convert_megatron_to_hf

    out = tmp_path / "run"
    code = POISONED_TRAIN.replace("UPDATES_PER_STEP", str(UPDATES_PER_STEP))
    result = subprocess.run([sys.executable, "-c", code, *train_args(
        assets, out, "train.max_steps=10", "train.max_skipped_steps=2", "checkpoint.save_every=1",
        "checkpoint.keep_last=5", f"rollout.api_key={API_KEY}", "logging.wandb_mode=offline")],
        capture_output=True, text=True, timeout=900)
    last_line = result.stderr.strip().splitlines()[-1]
    print(f"\n{last_line}")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert last_line == ("megatron-gppo train: error: stopped after step 3: 2 steps in a row skipped optimizer "
                         "updates whose loss or gradient was not finite (train.max_skipped_steps=2); lower "
                         "train.lr or look for non-finite rewards; its checkpoint is saved")
    assert [(r["step"], r["skipped_steps"]) for r in read_metrics(out / "metrics.jsonl")] == [
        (1, 0), (2, UPDATES_PER_STEP), (3, UPDATES_PER_STEP)]
    weights = {}
    for step in (1, 3):
        hf_dir = convert_megatron_to_hf(out / "checkpoints" / f"step_{step:08d}", tmp_path / f"hf{step}",
                                        progress=False)
        weights[step] = {}
        for shard in sorted(hf_dir.glob("*.safetensors")):
            weights[step].update(load_file(shard))
    assert weights[1].keys() == weights[3].keys()
    assert all(weights[1][name].equal(weights[3][name]) for name in weights[1])

    written = [path for path in out.rglob("*") if path.is_file()]
    assert any("server_logs" in str(path) for path in written) and any("wandb" in str(path) for path in written)
    assert [path for path in written if API_KEY.encode() in path.read_bytes()] == []
    assert API_KEY not in result.stdout + result.stderr


def test_a_read_only_checkpoint_directory_stops_the_run_with_one_line(assets, tmp_path):
    out = tmp_path / "run"
    checkpoints = out / "checkpoints"
    checkpoints.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(checkpoints)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        result = subprocess.run([sys.executable, "-m", "megatron_gppo.cli", *train_args(
            assets, out, "train.max_steps=1", "train.export_hf=false")], capture_output=True, text=True,
            timeout=900)
    finally:
        subprocess.run(["umount", str(checkpoints)], check=True)
    last_line = result.stderr.strip().splitlines()[-1]
    print(f"\n{last_line}")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert last_line.startswith(f"megatron-gppo train: error: could not write checkpoint step_00000001 in "
                                f"{checkpoints}: read-only file system"), last_line
    assert last_line.endswith("the latest complete checkpoint is none (free space or fix the permissions, then "
                              "rerun to resume)")
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1]


def _server_pids(trainer: subprocess.Popen) -> list[int]:
    """The `megatron-gppo serve` processes the trainer started."""
    found = subprocess.run(["pgrep", "-P", str(trainer.pid), "-f", "megatron_gppo.cli --verbose serve"],
                           capture_output=True, text=True).stdout.split()
    return [int(pid) for pid in found]


def _wait_for_steps(out, num_steps: int, trainer: subprocess.Popen, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while len(read_metrics(out / "metrics.jsonl")) < num_steps:
        assert trainer.poll() is None, f"the run ended before step {num_steps}"
        assert time.monotonic() < deadline, f"no step {num_steps} after {timeout_s}s"
        time.sleep(0.05)


def _train_killing_servers(assets, out, *overrides, kill_after_steps, before_kill=lambda: None):
    """Run to the end (or failure), SIGKILLing one rollout server after each step count in `kill_after_steps`."""
    trainer = subprocess.Popen([sys.executable, "-m", "megatron_gppo.cli", *train_args(assets, out, *overrides)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        for num_steps in kill_after_steps:
            _wait_for_steps(out, num_steps, trainer)
            before_kill()
            os.kill(_server_pids(trainer)[0], signal.SIGKILL)
        stdout, stderr = trainer.communicate(timeout=900)
    finally:
        if trainer.poll() is None:
            os.killpg(trainer.pid, signal.SIGKILL)
            trainer.wait()
    return trainer.returncode, stdout + stderr


@pytest.mark.parametrize("num_servers", [1, 2])
def test_killed_rollout_servers_are_restarted_and_synced_before_they_serve(assets, tmp_path, num_servers):
    out = tmp_path / "run"
    code, output = _train_killing_servers(assets, out, "train.max_steps=8", f"rollout.num_local_servers={num_servers}",
                                          "checkpoint.save_every=0", kill_after_steps=(2, 5))
    assert code == 0, output[-3000:]
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 9))
    assert sum(r["rollout_server_restarts"] for r in records) == 2
    mismatch = max(r["rollout_logprob_abs_diff"] for r in records)
    print(f"\n{num_servers} server(s): restarts per step {[r['rollout_server_restarts'] for r in records]}, "
          f"retries {[r['rollout_retries'] for r in records]}, max |trainer - server log-prob| {mismatch:.1e}")
    # Every sample came from the weights of the last sync (a restarted server reports 'default' until synced).
    assert sum(r["rollout_stale_samples"] for r in records) == 0
    assert mismatch < 1e-5
    assert "died; restarting it" in output


def test_a_server_that_cannot_restart_ends_the_run_with_one_line_and_a_checkpoint(assets, tmp_path):
    model = shutil.copytree(assets / "hf", tmp_path / "hf")
    out = tmp_path / "run"

    def lose_the_weights():
        for shard in model.glob("*.safetensors"):
            shard.unlink()
    code, output = _train_killing_servers(assets, out, f"model.hf_path={model}", "train.max_steps=8",
                                          "checkpoint.save_every=0", kill_after_steps=(2,),
                                          before_kill=lose_the_weights)
    last_line = output.strip().splitlines()[-1]
    print(f"\n{last_line}")
    assert code == 1 and "Traceback" not in output, output[-3000:]
    assert re.fullmatch(r"megatron-gppo train: error: stopped after step (\d): rollout server http://127\.0\.0\.1:\d+ "
                        r"died and did not come back \(.*; log: .*server-0\.log\); its checkpoint is saved", last_line)
    step = int(re.search(r"after step (\d)", last_line).group(1))
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{step:08d}"
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, step + 1))
