"""Whether a Slurm cluster answers, once per test session (`sinfo` against a stopped controller takes seconds)."""

import shutil
import subprocess

import pytest


def _cluster_up() -> bool:
    if shutil.which("sbatch") is None:
        return False
    return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=30).returncode == 0


CLUSTER_UP = _cluster_up()

# `pytestmark = SLURM_MARKS` in a module whose tests submit jobs.
SLURM_MARKS = [
    pytest.mark.slurm,
    pytest.mark.skipif(not CLUSTER_UP, reason="no Slurm cluster: sbatch missing or sinfo fails"
                       " (as root: slurm/local_cluster.sh start, or make test)"),
]
