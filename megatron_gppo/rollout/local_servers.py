"""`megatron-gppo serve` processes on this machine, for the `local` backend and the tests.

Each server binds 127.0.0.1 on a port it picks itself (`--port 0`) and
prints its URL on a ready line, which is read back from its log file, so
there is no race for free ports. Servers are stopped by pid: SIGTERM, then
SIGKILL if they do not exit.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

_READY = re.compile(r"ready at (http://\S+)")


# A server is no rank of the trainer's job: launcher variables it inherits
# (torchrun's, Slurm's) would only confuse torch.distributed inside it.
_LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                       "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")


def _server_env() -> dict[str, str]:
    return {key: value for key, value in os.environ.items()
            if key not in _LAUNCHER_VARIABLES and not key.startswith(("TORCHELASTIC_", "TORCH_ELASTIC_"))}


class LocalServers:
    """Start `num_servers` servers on `model_path`; use as a context manager or call `stop()`.

    `num_threads` is torch's thread count per server; 0 splits this machine's
    cores between the servers (they would oversubscribe them otherwise). With
    `record_requests`, server `i` logs every request it gets to
    `log_dir/requests-<i>.jsonl`.
    """

    def __init__(self, *, model_path: str | Path, num_servers: int = 1, api_key: str = "", dtype: str = "float32",
                 num_threads: int = 0, extra_args: Sequence[str] = (), log_dir: str | Path | None = None,
                 startup_timeout_s: float = 300.0, record_requests: bool = False) -> None:
        if num_servers < 1:
            raise ValueError(f"num_servers must be >= 1, got {num_servers}")
        self.model_path = str(model_path)
        self.num_servers = num_servers
        self.api_key = api_key
        self.dtype = dtype
        self.num_threads = num_threads or max(1, (os.cpu_count() or 1) // num_servers)
        self.extra_args = list(extra_args)
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="megatron-gppo-serve-"))
        self.startup_timeout_s = startup_timeout_s
        self.record_requests = record_requests
        self.processes: list[subprocess.Popen] = []
        self.urls: list[str] = []
        self.log_paths: list[Path] = []

    def __enter__(self) -> LocalServers:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> list[str]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            for i in range(self.num_servers):
                self.processes.append(self._spawn(i))
                self.log_paths.append(self.log_dir / f"server-{i}.log")
            self.urls = [self._wait_ready(i) for i in range(self.num_servers)]
        except BaseException:
            self.stop()
            raise
        return self.urls

    def _spawn(self, index: int, *, log_mode: str = "w") -> subprocess.Popen:
        # --verbose: a server's log file is the place for its libraries' warnings.
        command = [sys.executable, "-m", "megatron_gppo.cli", "--verbose", "serve",
                   "--model-path", self.model_path, "--host", "127.0.0.1", "--port", "0", "--dtype", self.dtype,
                   "--num-threads", str(self.num_threads), "--random-seed", str(index), *self.extra_args]
        if self.api_key:
            command += ["--api-key", self.api_key]
        if self.record_requests:
            command += ["--request-log", str(self.log_dir / f"requests-{index}.jsonl")]
        with open(self.log_dir / f"server-{index}.log", log_mode) as log:
            return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=_server_env())

    def dead(self) -> list[int]:
        """Indices of the servers whose process has exited."""
        return [i for i, process in enumerate(self.processes) if process.poll() is not None]

    def restart(self, index: int) -> str:
        """Start server `index` again (its log goes on in the same file); returns its new URL.

        It serves the weights in `model_path` until it gets others. RuntimeError / TimeoutError
        when it does not come up.
        """
        assert self.processes[index].poll() is not None, f"server {index} is still running"
        log_path = self.log_paths[index]
        start = len(log_path.read_text(errors="replace")) if log_path.exists() else 0
        self.processes[index] = self._spawn(index, log_mode="a")
        self.urls[index] = self._wait_ready(index, from_char=start)
        return self.urls[index]

    def _wait_ready(self, index: int, *, from_char: int = 0) -> str:
        """The URL on server `index`'s ready line, read from its log after character `from_char`."""
        deadline = time.monotonic() + self.startup_timeout_s
        process, log_path = self.processes[index], self.log_paths[index]
        while time.monotonic() < deadline:
            match = _READY.search(log_path.read_text(errors="replace")[from_char:])
            if match:
                return match.group(1)
            if process.poll() is not None:
                tail = log_path.read_text(errors="replace")[from_char:][-2000:]
                raise RuntimeError(f"rollout server {index} exited with code {process.returncode}:\n{tail}")
            time.sleep(0.1)
        raise TimeoutError(f"rollout server {index} not ready after {self.startup_timeout_s:.0f}s (log: {log_path})")

    def kill(self, index: int) -> None:
        """SIGKILL one server (to test failover)."""
        process = self.processes[index]
        os.kill(process.pid, signal.SIGKILL)
        process.wait()

    def stop(self, *, timeout_s: float = 15.0) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for process in self.processes:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()


__all__ = ["LocalServers"]
