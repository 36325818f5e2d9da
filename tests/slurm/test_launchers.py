"""The sbatch launchers on a real Slurm cluster (`slurm/local_cluster.sh start` makes a one-node one).

A one-node cluster cannot allocate 2, 4 or 16 nodes: `sbatch --test-only`
answers "Requested node configuration is not available" for any node count
above what the cluster has. So the multi-node shapes are checked as: the same
script is accepted at one node, and at N nodes the only complaint is the node
count (an option or script error would be reported differently). On a cluster
with enough nodes the N-node request must simply be accepted.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_gppo.metrics import read_metrics
from megatron_gppo.tasks.arithmetic import split_problems, write_jsonl
from tests._tiny_models import save_test_model

ROOT = Path(__file__).resolve().parents[2]
LAUNCHERS = ["slurm/colocated.sbatch", "slurm/disaggregated.sbatch"]
NO_NODES = "Requested node configuration is not available"


def _cluster_up() -> bool:
    if shutil.which("sbatch") is None:
        return False
    return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=30).returncode == 0


pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(not _cluster_up(), reason="no Slurm cluster: sbatch missing or sinfo fails"
                       " (as root: slurm/local_cluster.sh start)"),
]


def _num_cluster_nodes() -> int:
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True, check=True).stdout
    return len(set(out.split()))


def _test_only(launcher: str, num_nodes: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "CONFIG": "examples/configs/demo_cpu.yaml", "MODEL_PATH": "unused"}
    return subprocess.run(["sbatch", "--test-only", f"--nodes={num_nodes}", launcher], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("num_nodes", [2, 4, 16])
def test_test_only_accepts_multi_node_shapes(launcher, num_nodes):
    one = _test_only(launcher, 1)
    assert one.returncode == 0 and "to start at" in one.stderr, one.stderr
    many = _test_only(launcher, num_nodes)
    if num_nodes <= _num_cluster_nodes():
        assert many.returncode == 0 and "to start at" in many.stderr, many.stderr
    else:
        assert many.returncode != 0 and many.stderr.strip() == f"allocation failure: {NO_NODES}", many.stderr


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    train, held_out = split_problems(num_train=64, num_eval=4, seed=0)
    write_jsonl(train, root / "train.jsonl")
    write_jsonl(held_out, root / "eval.jsonl")
    save_test_model(root / "hf")
    return root


def _tiny_overrides(assets) -> str:
    return " ".join([
        f"data.train_path={assets / 'train.jsonl'}", f"data.eval_path={assets / 'eval.jsonl'}",
        "train.prompts_per_step=4", "rollout.num_samples_per_prompt=4", "rollout.max_new_tokens=6",
        "train.micro_batch_size=8", "train.eval_samples_per_prompt=2", "algorithm.max_refill_rounds=0",
        "logging.wandb_mode=disabled", "train.max_steps=2", "train.eval_every=0", "checkpoint.save_every=1",
        "checkpoint.keep_last=1",
    ])


def _sbatch_wait(launcher: str, out: Path, env: dict) -> subprocess.CompletedProcess:
    env = {**os.environ, "CONFIG": "examples/configs/demo_cpu.yaml", "RUN_DIR": str(out / "run"),
           "GPUS_PER_NODE": "1", "PYTHON": sys.executable, **env}
    return subprocess.run(["sbatch", "--wait", "--nodes=1", f"--output={out}/batch-%j.out", launcher], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)


def _batch_log(out: Path) -> str:
    return "\n".join(p.read_text() for p in out.glob("batch-*.out"))


def _job_logs(run: Path) -> str:
    return "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in sorted(run.glob("slurm-logs/*/*/*.log")))


def test_colocated_job_writes_metrics(assets, tmp_path):
    overrides = f"model.hf_path={assets / 'hf'} {_tiny_overrides(assets)}"
    result = _sbatch_wait("slurm/colocated.sbatch", tmp_path, {"OVERRIDES": overrides})
    run = tmp_path / "run"
    assert result.returncode == 0, _batch_log(tmp_path) + _job_logs(run)
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [0, 1, 2]
    (log_dir,) = run.glob("slurm-logs/*/attempt-0")
    assert [p.name for p in log_dir.iterdir()] == [f"node-0-{os.uname().nodename.split('.')[0]}.log"]


def test_disaggregated_job_shares_the_node_and_writes_metrics(assets, tmp_path):
    router = shutil.which("sglang-router", path=str(Path(sys.executable).parent)) or shutil.which("sglang-router")
    env = {"MODEL_PATH": str(assets / "hf"), "OVERRIDES": _tiny_overrides(assets), "ROLLOUT_NODES": "1",
           "TRAIN_ON_ROLLOUT_NODES": "1", "ROUTER": "1" if router else "0"}
    result = _sbatch_wait("slurm/disaggregated.sbatch", tmp_path, env)
    run = tmp_path / "run"
    batch_log = _batch_log(tmp_path)
    assert result.returncode == 0, batch_log + _job_logs(run)
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [0, 1, 2]
    assert "/health_generate" in batch_log and "trainer exited with status 0" in batch_log
    # Every server, and the router, ended with the job.
    assert subprocess.run(["pgrep", "-f", "--", f"--model-path {assets / 'hf'}"], capture_output=True).returncode == 1
