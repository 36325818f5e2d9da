"""The sbatch launchers on a real Slurm cluster (`slurm/local_cluster.sh start` makes a one-node one).

Multi-node shapes are checked with `sbatch --test-only`. The local cluster's
`scale` partition adds 15 power-saved cloud nodes that never boot to its one
real node, so the scheduler can place 2, 4 and 16 nodes there without running
anything; on another cluster the default partition must have enough nodes.
"""

import os
import re
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_gppo.metrics import read_metrics
from tests._slurm import SLURM_MARKS
from tests._tiny_models import save_tiny_run, tiny_run_overrides

ROOT = Path(__file__).resolve().parents[2]
LAUNCHERS = ["slurm/colocated.sbatch", "slurm/disaggregated.sbatch"]
NO_NODES = "Requested node configuration is not available"


pytestmark = SLURM_MARKS


def _shape_partition() -> str:
    """`scale` on the local cluster (see slurm/local_cluster.sh), else the default partition."""
    names = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, check=True).stdout.split()
    return "scale" if "scale" in names else next(name.rstrip("*") for name in names if name.endswith("*"))


def _num_hosts(nodelist: str) -> int:
    hostnames = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return len(hostnames.stdout.split())


def _test_only(launcher: str, num_nodes: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "CONFIG": "examples/configs/demo_cpu.yaml", "MODEL_PATH": "unused"}
    return subprocess.run(["sbatch", "--test-only", f"--partition={_shape_partition()}", f"--nodes={num_nodes}",
                           launcher], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("num_nodes", [2, 4, 16])
def test_test_only_accepts_multi_node_shapes(launcher, num_nodes):
    result = _test_only(launcher, num_nodes)
    # "sbatch: Job 7 to start at <time> using 32 processors on nodes cloud[1-15],vm in partition scale"
    assert result.returncode == 0 and "to start at" in result.stderr, result.stderr
    assert _num_hosts(result.stderr.split(" on nodes ")[1].split()[0]) == num_nodes, result.stderr


def test_test_only_rejects_more_nodes_than_the_partition_has():
    # sinfo hides powered-down cloud nodes; the partition's node list has them all.
    partition = subprocess.run(["scontrol", "show", "partition", _shape_partition()], capture_output=True, text=True,
                               check=True).stdout.split()
    nodelist = next(field for field in partition if field.startswith("Nodes=")).removeprefix("Nodes=")
    result = _test_only(LAUNCHERS[0], _num_hosts(nodelist) + 1)
    assert result.returncode != 0 and NO_NODES in result.stderr, result.stderr


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return save_tiny_run(tmp_path_factory.mktemp("slurm"))


def _tiny_overrides(assets) -> str:
    return " ".join([*tiny_run_overrides(assets), "train.max_steps=2", "train.eval_every=0",
                     "checkpoint.save_every=1", "checkpoint.keep_last=1"])


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


def test_colocated_job_with_its_own_servers_releases_their_memory_while_training(assets, tmp_path):
    env = {"MODEL_PATH": str(assets / "hf"), "OVERRIDES": _tiny_overrides(assets), "SERVER_PORT": "30500",
           "SERVER_CMD": '"$PYTHON" -m megatron_gppo.cli serve --model-path "$MODEL_PATH" --host 0.0.0.0 --port "$PORT"'}
    result = _sbatch_wait("slurm/colocated.sbatch", tmp_path, env)
    run = tmp_path / "run"
    assert result.returncode == 0, _batch_log(tmp_path) + _job_logs(run)
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [0, 1, 2]
    (node_log,) = run.glob("slurm-logs/*/attempt-0/*.log")
    text = node_log.read_text()
    assert "wait_healthy: up after" in text
    assert text.count("memory released") == 2 and text.count("memory resumed") == 2, text[-3000:]


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


def _job_field(job_id: str, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, check=True).stdout
    return next(item for item in out.split() if item.startswith(f"{field}=")).split("=", 1)[1]


def _wait_until(predicate, *, what: str, timeout_s: float = 600, poll_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout_s}s waiting for {what}"
        time.sleep(poll_s)


def _processes_with_env(name: str, value: str) -> list[int]:
    """Pids of the live processes whose environment has `name=value` (what a job's processes inherit)."""
    entry = f"{name}={value}".encode()
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if entry in environ.read_bytes().split(b"\0"):
                pids.append(int(environ.parent.name))
        except OSError:  # gone, or not ours to read
            pass
    return pids


def _has_metrics(run: Path) -> bool:
    return (run / "metrics.jsonl").exists() and bool(read_metrics(run / "metrics.jsonl"))


def test_test_only_accepts_a_heterogeneous_disaggregated_job():
    # Slurm never puts two components of a heterogeneous job on one node, so on the
    # one-node cluster this mode is only shape-checked: 1 rollout node : 2 trainer nodes.
    partition = f"--partition={_shape_partition()}"
    env = {**os.environ, "CONFIG": "examples/configs/demo_cpu.yaml", "MODEL_PATH": "unused"}
    result = subprocess.run(["sbatch", "--test-only", partition, "--nodes=1", ":", partition, "--nodes=2",
                             "slurm/disaggregated.sbatch"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and "to start at" in result.stderr, result.stderr


def test_usr1_checkpoints_requeues_and_resumes_from_that_step(assets, tmp_path):
    run = tmp_path / "run"
    overrides = (f"model.hf_path={assets / 'hf'} {_tiny_overrides(assets)} train.max_steps=30 "
                 "checkpoint.save_every=0 data.eval_path=")
    env = {**os.environ, "CONFIG": "examples/configs/demo_cpu.yaml", "RUN_DIR": str(run), "GPUS_PER_NODE": "1",
           "PYTHON": sys.executable, "OVERRIDES": overrides}
    job_id = subprocess.run(["sbatch", "--parsable", f"--output={tmp_path}/batch-%j.out", "slurm/colocated.sbatch"],
                            cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout.strip()
    try:
        _wait_until(lambda: _has_metrics(run), what="the first step")
        # What Slurm sends SIGNAL_SECONDS before the time limit (#SBATCH --signal=B:USR1@300).
        subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
        _wait_until(lambda: _job_field(job_id, "Restarts") == "1", what="the requeue")
        # Slurm holds a requeued job for a while before it is eligible again; shorten the wait. Not to
        # `now`: slurmd refuses a launch whose credential dates from the second the old one was revoked
        # in ("Job credential revoked") and the job then fails instead of running.
        if _job_field(job_id, "JobState") == "PENDING":
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now+2"], check=False)
        _wait_until(lambda: _job_field(job_id, "JobState") in ("COMPLETED", "FAILED", "CANCELLED"),
                    what="the second attempt to finish")
    finally:
        subprocess.run(["scancel", job_id], check=False)
    batch_log, job_logs = _batch_log(tmp_path), _job_logs(run)
    assert _job_field(job_id, "JobState") == "COMPLETED", batch_log + job_logs
    assert "stopped for preemption; requeueing" in batch_log
    (first,) = run.glob("slurm-logs/*/attempt-0/*.log")
    (second,) = run.glob("slurm-logs/*/attempt-1/*.log")
    stopped = re.search(r"stopped after step (\d+) \(found .*PREEMPT\)", first.read_text())
    assert stopped, job_logs
    step = int(stopped.group(1))
    assert 1 <= step < 30 and f"Resuming from step {step} " in second.read_text(), job_logs
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == list(range(1, 31))
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000030"
    # Nothing of either attempt outlives the job, the USR1 watchdog of attempt 0 included.
    _wait_until(lambda: not _processes_with_env("RUN_DIR", str(run)),
                what="the job's processes to exit", timeout_s=45)


def test_a_dead_task_fails_the_job_instead_of_hanging(assets, tmp_path):
    model = tmp_path / "hf"  # a path of its own, to find this job's server by its command line
    shutil.copytree(assets / "hf", model)
    run = tmp_path / "run"
    env = {"MODEL_PATH": str(model), "OVERRIDES": f"{_tiny_overrides(assets)} train.max_steps=1000",
           "ROLLOUT_NODES": "1", "TRAIN_ON_ROLLOUT_NODES": "1"}
    env = {**os.environ, "CONFIG": "examples/configs/demo_cpu.yaml", "RUN_DIR": str(run), "GPUS_PER_NODE": "1",
           "PYTHON": sys.executable, **env}
    job = subprocess.Popen(["sbatch", "--wait", "--nodes=1", f"--output={tmp_path}/batch-%j.out",
                            "slurm/disaggregated.sbatch"],
                           cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server = ["pgrep", "-f", "--", f"serve --model-path {model} "]
    try:
        _wait_until(lambda: _has_metrics(run), what="the first step")
        (pid,) = subprocess.run(server, capture_output=True, text=True, check=True).stdout.split()
        os.kill(int(pid), signal.SIGKILL)
        started = time.monotonic()
        job.wait(timeout=300)
    finally:
        job.kill()
    batch_log = _batch_log(tmp_path)
    assert job.returncode != 0, batch_log
    assert "the rollout servers exited" in batch_log and "failing the job" in batch_log, batch_log
    print(f"job ended {time.monotonic() - started:.1f}s after the server was killed")
    assert read_metrics(run / "metrics.jsonl")[-1]["step"] < 1000
    # Nothing left behind. `sbatch --wait` returns once slurmctld marks the job failed; slurmd
    # may still be signalling the other step's processes (SIGTERM, then SIGKILL after KillWait,
    # 30 s by default), so allow that long.
    trainer = ["pgrep", "-f", "--", f"train.output_dir={run}"]
    _wait_until(lambda: all(subprocess.run(command, capture_output=True).returncode == 1
                            for command in (server, trainer)),
                what="the job's server and trainer processes to exit", timeout_s=45)
