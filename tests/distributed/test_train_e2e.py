"""`megatron-gppo train` end to end: TP=2 Megatron policy, a local rollout server, eval, checkpoints, plots."""

import json
from pathlib import Path
import subprocess
import sys

import pytest

from megatron_gppo.metrics import read_metrics
from tests._tiny_models import save_tiny_run, tiny_run_overrides

pytestmark = pytest.mark.distributed

CONTRACT_KEYS = {"step", "reward_mean", "entropy", "clip_frac_low", "clip_frac_high", "loss",
                 "predicted_entropy_change", "entropy_sensitivity_beta1", "entropy_sensitivity_beta2"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return save_tiny_run(tmp_path_factory.mktemp("e2e"))


def train_command(assets, out, *overrides):
    return [sys.executable, "-m", "megatron_gppo.cli", "train", "examples/configs/demo_cpu.yaml",
            f"model.hf_path={assets / 'hf'}", f"train.output_dir={out}", *tiny_run_overrides(assets),
            *overrides]


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
    for name in ("reward", "entropy", "clip_fractions", "eval", "summary"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 1000
    saved = json.loads(json.dumps(__import__("yaml").safe_load((out / "config.yaml").read_text())))
    assert saved["parallel"]["tensor_parallel"] == 2

    # The run ends with a Hugging Face export of the policy: transformers loads it, and its logits are
    # those of the final Megatron checkpoint (verify_conversion runs both on the same tokens).
    verify = subprocess.run([sys.executable, "tools/verify_conversion.py", "--hf-dir", str(out / "hf"),
                             "--megatron-dir", str(out)], capture_output=True, text=True, timeout=600)
    assert verify.returncode == 0, verify.stdout + verify.stderr[-3000:]
    assert json.loads(verify.stdout)["max_abs_logit_diff"] <= 1e-4


def _wait_for_checkpoint(out, step, process, timeout_s=600):
    import time

    latest = out / "checkpoints" / "latest"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if latest.exists() and latest.read_text().strip() == f"step_{step:08d}":
            return
        assert process.poll() is None, "the run ended before writing its checkpoint"
        time.sleep(0.2)
    raise TimeoutError(f"no checkpoint of step {step} after {timeout_s}s")


def test_run_killed_after_a_checkpoint_resumes_with_identical_metrics(assets, tmp_path):
    import os
    import signal

    # The entropy controller (a band far above the tiny model's entropy, so the betas move every step) has
    # state of its own to checkpoint: the betas, its last error, the sensitivities' running statistics.
    # It steers by the realized sensitivities, whose what-if updates are rewound before every real one.
    overrides = ("train.max_steps=4", "checkpoint.save_every=2", "train.eval_every=0",
                 "algorithm.beta_schedule.kind=entropy_target", "algorithm.beta_schedule.entropy_low=8",
                 "algorithm.beta_schedule.entropy_high=9", "algorithm.beta_schedule.integral_gain=0.01",
                 "algorithm.beta_schedule.proportional_gain=0", "logging.realized_sensitivity_beta_step=0.5")
    reference = tmp_path / "reference"
    result = subprocess.run(train_command(assets, reference, *overrides), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]

    killed = tmp_path / "killed"
    # Its own session, so SIGKILL reaches the trainer and the rollout server it started.
    process = subprocess.Popen(train_command(assets, killed, *overrides), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for_checkpoint(killed, 2, process)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    resumed = subprocess.run(train_command(assets, killed, *overrides), capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from step 2" in resumed.stdout + resumed.stderr

    expected = {r["step"]: r for r in read_metrics(reference / "metrics.jsonl")}
    got = {r["step"]: r for r in read_metrics(killed / "metrics.jsonl")}
    assert sorted(got) == sorted(expected) == [0, 1, 2, 3, 4]
    assert len({expected[step]["beta1"] for step in (1, 2, 3, 4)}) == 4  # the controller acted every step
    for step in (3, 4):
        # Same seeds, same weights, same optimizer state: the same samples and updates.
        for key in ("reward_mean", "response_length_mean", "num_tokens", "beta1", "beta2"):
            assert got[step][key] == expected[step][key], (step, key)
        for key in ("loss", "entropy", "grad_norm", "clip_frac_low", "approx_kl", "entropy_sensitivity_beta1",
                    "realized_entropy_change", "realized_entropy_sensitivity_beta1",
                    "realized_entropy_sensitivity_beta2"):
            assert got[step][key] == pytest.approx(expected[step][key], rel=1e-5, abs=1e-7), (step, key)


@pytest.mark.parametrize("loss", ["ppo", "dapo", "cispo", "gspo"])
def test_every_registered_loss_runs_by_changing_one_key(assets, tmp_path, loss):
    out = tmp_path / loss
    result = subprocess.run(train_command(assets, out, f"algorithm.loss={loss}", "train.max_steps=1",
                                          "checkpoint.save_every=0", "data.eval_path="),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    (record,) = read_metrics(out / "metrics.jsonl")
    assert CONTRACT_KEYS <= record.keys() and record["num_updates"] == 2
    assert (out / "config.yaml").read_text().count(f"loss: {loss}") == 1
    # The terminal shows our lines only; other packages' warnings went to the run's log.
    assert "Warning" not in result.stdout + result.stderr, result.stdout + result.stderr
    assert "Transformer Engine and Apex are not installed" in (out / "logs" / "warnings.log").read_text()


def test_stop_file_and_deadline_checkpoint_at_a_step_boundary_and_exit_zero(assets, tmp_path):
    import time

    out = tmp_path / "run"
    overrides = ("train.max_steps=50", "checkpoint.save_every=0", "train.eval_every=0", "data.eval_path=")
    process = subprocess.Popen(train_command(assets, out, *overrides), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600
    while not (out / "metrics.jsonl").exists() or not read_metrics(out / "metrics.jsonl"):
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before its first step"
        time.sleep(0.2)
    (out / "PREEMPT").touch()  # what the Slurm launchers' USR1 trap does
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
    stopped_at = read_metrics(out / "metrics.jsonl")[-1]["step"]
    assert stopped_at < 50 and f"stopped after step {stopped_at} (found {out / 'PREEMPT'})" in output
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{stopped_at:08d}"

    # A deadline already spent: resume, stop before the next step, ask the launcher to requeue.
    (out / "PREEMPT").unlink()
    result = subprocess.run(train_command(assets, out, *overrides, "train.deadline_minutes=0.0001"),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"stopped after step {stopped_at} (the next step would pass train.deadline_minutes" in result.stdout
    assert (out / "PREEMPT").exists()

    (out / "PREEMPT").unlink()
    result = subprocess.run(train_command(assets, out, *overrides, f"train.max_steps={stopped_at + 1}"),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, stopped_at + 2))

    # Again on the finished run: one line says so; nothing is trained, logged or opened (wandb included).
    metrics = (out / "metrics.jsonl").read_bytes()
    again = subprocess.run(train_command(assets, out, *overrides, f"train.max_steps={stopped_at + 1}",
                                         "logging.wandb_mode=offline"), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.splitlines() == [
        f"{out} is complete (its checkpoint is at step {stopped_at + 1}, train.max_steps={stopped_at + 1}): nothing "
        "to train; raise train.max_steps to go on"]
    assert (out / "metrics.jsonl").read_bytes() == metrics and not (out / "wandb").exists()


def test_sigterm_stops_the_run_and_the_servers_it_started(assets, tmp_path):
    import os
    import signal
    import time

    out = tmp_path / "run"
    process = subprocess.Popen(train_command(assets, out, "train.max_steps=50", "checkpoint.save_every=0",
                                             "data.eval_path="), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.monotonic() + 600
    while not (out / "metrics.jsonl").exists() or not read_metrics(out / "metrics.jsonl"):
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before its first step"
        time.sleep(0.2)
    children = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
    assert children  # the rollout server at least
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    time.sleep(1)
    for pid in children:
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            continue
        # Exited but not yet reaped by init is fine; anything else was left running.
        assert Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z", f"child {pid} outlived the run"


def test_a_closed_stdout_ends_no_run_with_a_traceback(assets, tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen(train_command(assets, out, "train.max_steps=1", "checkpoint.save_every=0",
                                             "data.eval_path="), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # `megatron-gppo train ... | head -0`
    _, stderr = process.communicate(timeout=900)
    assert b"Traceback" not in stderr and b"Exception ignored" not in stderr, stderr[-3000:]
    assert process.returncode == 141  # 128 + SIGPIPE, as git answers a closed pipe
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1]  # the run itself went on to the end
