"""slurm/convert.sbatch on a real Slurm cluster (`slurm/local_cluster.sh start` makes a one-node one).

The job converts a tiny Qwen2 to megatron, verifies it at TP2 x PP2 and only
then renames it into place; the result converts back to HF bit for bit. User
errors fail with one `error:` line in the job log, before anything is written;
a cancelled job and a failed verification leave nothing at OUT.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests._checkpoint_models import load_hf_tensors
from tests._slurm import SLURM_MARKS
from tests._tiny_models import save_test_model

ROOT = Path(__file__).resolve().parents[2]
JOB = "slurm/convert.sbatch"


pytestmark = SLURM_MARKS


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return save_test_model(tmp_path_factory.mktemp("convert") / "hf")


def _env(**values: str) -> dict:
    job_vars = ("HF_PATH", "OUT", "TP", "PP", "VPP", "VERIFY", "VERIFY_ARGS", "GPPO_DIR", "SETUP_SCRIPT", "SRUN_ARGS")
    env = {k: v for k, v in os.environ.items() if k not in job_vars}
    return {**env, "PYTHON": sys.executable, **values}


def _submit(tmp_path: Path, env: dict, *, wait: bool = True) -> subprocess.CompletedProcess:
    flag = "--wait" if wait else "--parsable"
    return subprocess.run(["sbatch", flag, f"--output={tmp_path}/job-%j.out", JOB], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def _job_log(tmp_path: Path) -> str:
    return "\n".join(p.read_text() for p in tmp_path.glob("job-*.out"))


def _error_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("error:")]


def test_converts_verifies_and_round_trips_bit_exactly(hf, tmp_path):
    out = tmp_path / "ckpt" / "qwen-mcore"
    result = _submit(tmp_path, _env(HF_PATH=str(hf), OUT=str(out), TP="2", PP="2"))
    log = _job_log(tmp_path)
    assert result.returncode == 0, log
    assert '"tp": 2, "pp": 2' in log and '"ok": true' in log, log
    assert (out / "metadata.json").is_file() and (out / "hf" / "config.json").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["qwen-mcore"]  # no staging left beside it

    back = tmp_path / "back"
    subprocess.run([sys.executable, "tools/convert_megatron_to_hf.py", "--megatron-dir", str(out), "--output-dir",
                    str(back), "--no-progress"], cwd=ROOT, check=True, capture_output=True)
    src, dst = load_hf_tensors(hf), load_hf_tensors(back)
    assert sorted(src) == sorted(dst)
    for name, tensor in src.items():
        assert dst[name].dtype == tensor.dtype and torch.equal(dst[name], tensor), name


@pytest.mark.parametrize("case", ["no_hf_path", "hf_path_missing", "not_a_model", "out_not_empty", "bad_layout"])
def test_user_errors_fail_with_one_line_and_write_nothing(hf, tmp_path, case):
    out = tmp_path / "ckpt" / "out"
    values = {"HF_PATH": str(hf), "OUT": str(out)}
    expected = {
        "no_hf_path": "error: set HF_PATH to the Hugging Face model directory to convert",
        "hf_path_missing": f"error: HF_PATH={tmp_path / 'nope'} is not a directory",
        "not_a_model": f"error: HF_PATH={tmp_path} has no config.json",
        "out_not_empty": f"error: OUT={out} already exists and is not empty",
        "bad_layout": "error: layout TP=3 PP=1 VPP=1: tensor_parallel=3 does not divide num_attention_heads=4",
    }[case]
    if case == "no_hf_path":
        del values["HF_PATH"]
    elif case == "hf_path_missing":
        values["HF_PATH"] = str(tmp_path / "nope")
    elif case == "not_a_model":
        values["HF_PATH"] = str(tmp_path)
    elif case == "out_not_empty":
        out.mkdir(parents=True)
        (out / "keep.txt").write_text("mine")
    elif case == "bad_layout":
        values["TP"] = "3"
    result = _submit(tmp_path, _env(**values))
    log = _job_log(tmp_path)
    assert result.returncode == 2, log
    (line,) = _error_lines(log)
    assert line.startswith(expected), log
    if case == "out_not_empty":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not (tmp_path / "ckpt").exists()


def test_failed_verification_keeps_the_checkpoint_aside_and_does_not_write_out(hf, tmp_path):
    out = tmp_path / "ckpt" / "out"
    # No logit difference is <= -1.
    result = _submit(tmp_path, _env(HF_PATH=str(hf), OUT=str(out), VERIFY_ARGS="--atol -1"))
    log = _job_log(tmp_path)
    assert result.returncode != 0, log
    (line,) = _error_lines(log)
    (kept,) = (tmp_path / "ckpt").iterdir()
    assert kept.name.startswith("out.unverified-") and str(kept) in line
    assert (kept / "metadata.json").is_file()


def test_cancelled_job_leaves_nothing_at_out(hf, tmp_path):
    # A PYTHON that converts for real but hangs in verification, where the job is cancelled.
    marker = tmp_path / "verifying"
    python = tmp_path / "python"
    python.write_text(
        "#!/usr/bin/env bash\n"
        f'for a in "$@"; do [[ $a == */verify_conversion.py ]] && {{ touch {marker}; exec sleep 600; }}; done\n'
        f'exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    out = tmp_path / "ckpt" / "out"
    result = _submit(tmp_path, {**_env(HF_PATH=str(hf), OUT=str(out)), "PYTHON": str(python)}, wait=False)
    job_id = result.stdout.strip().split(";")[0]
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert time.monotonic() < deadline, _job_log(tmp_path)
            time.sleep(0.5)
        (staging,) = (tmp_path / "ckpt").iterdir()
        assert staging.name == f".out.convert-{job_id}" and (staging / "ckpt" / "metadata.json").is_file()
    finally:
        subprocess.run(["scancel", job_id], check=True)
    deadline = time.monotonic() + 120
    while subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout.strip():
        assert time.monotonic() < deadline, "job did not end after scancel"
        time.sleep(0.5)
    log = _job_log(tmp_path)
    assert "terminated; removing" in log, log
    assert list((tmp_path / "ckpt").iterdir()) == [], log
