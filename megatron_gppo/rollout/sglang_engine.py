"""`RolloutEngine` over SGLang-protocol servers: generation through the client, weights through a `WeightSync`."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

from megatron_gppo.rollout.client import SGLangClient
from megatron_gppo.rollout.engine import SamplingParams
from megatron_gppo.rollout.local_servers import LocalServers
from megatron_gppo.rollout.weight_sync import (MiB, DiskWeightSync, DistributedWeightSync, SyncStats,
                                               TensorWeightSync, WeightSync)
from megatron_gppo.types import Sample

if TYPE_CHECKING:
    import torch

    from megatron_gppo.config import RolloutConfig


class SGLangEngine:
    """The trainer's rollout engine; see `engine.RolloutEngine` for the contract."""

    def __init__(self, *, client: SGLangClient, weight_sync: WeightSync, local_servers: LocalServers | None = None
                 ) -> None:
        self.client = client
        self.weight_sync = weight_sync
        self.local_servers = local_servers
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
        local = None
        urls: Sequence[str] = config.server_urls
        if config.backend == "local":
            local = LocalServers(model_path=model_path, num_servers=config.num_local_servers, api_key=config.api_key,
                                 num_threads=num_threads, log_dir=work_dir / "server_logs")
            urls = local.start()
        try:
            client = SGLangClient.from_config(config, server_urls=urls, progress=progress)
            bucket_bytes = config.weight_sync_bucket_mb * MiB
            weight_sync: WeightSync
            if config.weight_sync == "distributed":
                import torch

                backend = "nccl" if config.backend == "sglang" and torch.cuda.is_available() else "gloo"
                # Local servers share this host; remote ones need an address they can route to.
                address = config.weight_sync_address or ("127.0.0.1" if local else socket.gethostname())
                weight_sync = DistributedWeightSync(client=client, bucket_bytes=bucket_bytes, backend=backend,
                                                    master_address=address, master_port=config.weight_sync_port)
            elif config.weight_sync == "disk":
                weight_sync = DiskWeightSync(client=client, output_dir=work_dir / "weights", copy_files_from=model_path)
            else:
                weight_sync = TensorWeightSync(client=client, bucket_bytes=bucket_bytes)
        except BaseException:
            if local is not None:
                local.stop()
            raise
        return cls(client=client, weight_sync=weight_sync, local_servers=local)

    def generate(self, prompts: Sequence[Sequence[int]], *, sampling: SamplingParams, n: int = 1) -> list[list[Sample]]:
        return self.client.generate(prompts, sampling=sampling, n=n)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *, version: str) -> None:
        self.last_sync = self.weight_sync.sync(named_tensors, version=version)

    def weight_versions(self) -> dict[str, str]:
        return self.client.weight_versions()

    def health(self) -> dict[str, bool]:
        return self.client.health()

    def pause(self) -> None:
        self.client.pause()

    def resume(self) -> None:
        self.client.resume()

    def release_memory(self) -> None:
        self.client.release_memory()

    def resume_memory(self) -> None:
        self.client.resume_memory()

    def close(self) -> None:
        try:
            self.weight_sync.close()
        finally:
            self.client.close()
            if self.local_servers is not None:
                self.local_servers.stop()

    def __enter__(self) -> SGLangEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["SGLangEngine"]
