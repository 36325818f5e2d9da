"""`RolloutEngine` over SGLang-protocol servers: the client, plus weight sync and the servers it started."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from megatron_gppo.rollout.client import SGLangClient
from megatron_gppo.rollout.local_servers import LocalServers
from megatron_gppo.rollout.weight_sync import (MiB, DiskWeightSync, DistributedWeightSync, SyncStats,
                                               TensorWeightSync, WeightSync)

if TYPE_CHECKING:
    import torch

    from megatron_gppo.config import RolloutConfig


class SGLangEngine(SGLangClient):
    """The trainer's rollout engine (see `engine.RolloutEngine`).

    An `SGLangClient` (generation, health, pause, memory release) that also
    streams new weights to every server through a `WeightSync`, and stops the
    local servers it started when closed.
    """

    def __init__(self, *, local_servers: LocalServers | None = None, **client_args) -> None:
        super().__init__(**client_args)
        self.local_servers = local_servers
        self.weight_sync: WeightSync | None = None
        self.last_sync: SyncStats | None = None

    @classmethod
    def from_config(cls, config: RolloutConfig, *, model_path: str | Path, work_dir: str | Path,
                    progress: bool = True, num_threads: int = 0) -> SGLangEngine:
        """Start local servers (backend `local`) or use the configured URLs, and pick the weight sync.

        `model_path` is the initial HF checkpoint (served by local servers,
        and the source of config/tokenizer files for disk syncs); `work_dir`
        holds server logs and disk-sync dumps.
        """
        work_dir = Path(work_dir)
        api_key = config.api_key.get_secret_value()
        local = None
        urls = config.server_urls
        if config.backend == "local":
            local = LocalServers(model_path=model_path, num_servers=config.num_local_servers, api_key=api_key,
                                 num_threads=num_threads, log_dir=work_dir / "server_logs")
            urls = local.start()
        try:
            engine = cls(local_servers=local, server_urls=urls, router_url=config.router_url, api_key=api_key,
                         max_concurrency=config.max_concurrency, request_timeout_s=config.request_timeout_s,
                         max_retries=config.max_retries, progress=progress)
            engine.weight_sync = _weight_sync(config, client=engine, local=local is not None,
                                              model_path=model_path, work_dir=work_dir)
        except BaseException:
            if local is not None:
                local.stop()
            raise
        return engine

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *, version: str) -> None:
        """Stream Hugging Face-named tensors to every server; afterwards all report `version`."""
        assert self.weight_sync is not None, "build the engine with from_config"
        self.last_sync = self.weight_sync.sync(named_tensors, version=version)

    def close(self) -> None:
        try:
            if self.weight_sync is not None:
                self.weight_sync.close()
        finally:
            super().close()
            if self.local_servers is not None:
                self.local_servers.stop()

    def __enter__(self) -> SGLangEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _weight_sync(config: RolloutConfig, *, client: SGLangClient, local: bool, model_path: str | Path,
                 work_dir: Path) -> WeightSync:
    bucket_bytes = config.weight_sync_bucket_mb * MiB
    if config.weight_sync == "distributed":
        import torch

        backend = "nccl" if config.backend == "sglang" and torch.cuda.is_available() else "gloo"
        # Local servers share this host; remote ones need an address they can route to.
        address = config.weight_sync_address or ("127.0.0.1" if local else socket.gethostname())
        return DistributedWeightSync(client=client, bucket_bytes=bucket_bytes, backend=backend,
                                     master_address=address, master_port=config.weight_sync_port)
    if config.weight_sync == "disk":
        return DiskWeightSync(client=client, output_dir=work_dir / "weights", copy_files_from=model_path)
    return TensorWeightSync(client=client, bucket_bytes=bucket_bytes)


__all__ = ["SGLangEngine"]
