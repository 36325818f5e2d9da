"""Trainer side of weight sync: stream Hugging Face-named tensors to every rollout server.

Three ways, all SGLang's protocol, all taking an iterator of `(hf_name, tensor)`
(the Megatron -> HF conversion happens before) and a weight version string
that every server reports afterwards (`/get_weight_version`, and
`meta_info.weight_version` of every later generation):

- `DistributedWeightSync`: the trainer (rank 0) and every server join a
  process group (`/init_weights_update_group`); per bucket the trainer posts
  `/update_weights_from_distributed` (names, dtypes, shapes) and, while the
  servers wait in the collective, broadcasts the bucket's tensors in order.
  gloo on CPU, NCCL on GPU. Call it on the one process that holds the full
  tensors.
- `DiskWeightSync`: an atomic safetensors dump (temporary directory, then
  rename) that the servers load with `/update_weights_from_disk`; the path
  must be visible to them.
- `TensorWeightSync`: colocated GPU only: CUDA IPC handles of each bucket go
  through `/update_weights_from_tensor`; nothing is copied over the wire.

The weight version is sent with the last bucket only, so it changes when the
whole update has landed.
"""

from __future__ import annotations

import base64
import logging
import io
import shutil
import threading
import time
import uuid
from concurrent.futures import FIRST_EXCEPTION, Future, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol, TypeVar

import torch

from megatron_gppo.checkpoint.hf_io import save_safetensors_atomic
from megatron_gppo.ports import free_port
from megatron_gppo.rollout.client import RolloutError, SGLangClient, wait_each
from megatron_gppo.rollout.sglang_requests import (DestroyWeightsUpdateGroupReqInput,
                                                   InitWeightsUpdateGroupReqInput, UpdateWeightFromDiskReqInput,
                                                   UpdateWeightsFromDistributedReqInput,
                                                   UpdateWeightsFromTensorReqInput, body)
from megatron_gppo.rollout.process_group import (broadcast_from_trainer, destroy_weight_update_group, dtype_name,
                                                 init_weight_update_group)

logger = logging.getLogger(__name__)
T = TypeVar("T")

NamedTensors = Iterable[tuple[str, torch.Tensor]]
MiB = 1024 ** 2


@dataclass
class SyncStats:
    num_tensors: int = 0
    num_bytes: int = 0
    num_buckets: int = 0
    seconds: float = 0.0

    @property
    def bytes_per_s(self) -> float:
        return self.num_bytes / self.seconds if self.seconds > 0 else 0.0


class WeightSync(Protocol):
    def sync(self, named_tensors: NamedTensors, *, version: str) -> SyncStats:
        ...

    def close(self) -> None:
        ...


def iter_buckets(named_tensors: NamedTensors, *, bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group tensors in order into buckets of at most `bucket_bytes` (a larger tensor gets a bucket alone)."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def _with_last(items: Iterator[list]) -> Iterator[tuple[list, bool]]:
    """Yield (item, is_last), reading one item ahead."""
    previous = next(items, None)
    while previous is not None:
        current = next(items, None)
        yield previous, current is None
        previous = current


def _bucket_bytes(bucket: list[tuple[str, torch.Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for _, t in bucket)


class WeightSyncError(RolloutError):
    """A weight update failed; `group_usable` says whether the process group can carry the next one."""

    def __init__(self, message: str, *, group_usable: bool) -> None:
        super().__init__(message)
        self.group_usable = group_usable


_SETTLE_S = 5.0


def _beside_servers(collective: Callable[[], T], futures: dict[str, Future]) -> T:
    """Run our side of a collective while the servers' HTTP calls (their side) are in flight.

    Fails as soon as a server answers with an error instead of waiting in a
    collective that can no longer complete; the collective then stays blocked
    on a daemon thread until the group's timeout.
    """
    local: Future = Future()

    def run() -> None:
        try:
            local.set_result(collective())
        except BaseException as err:
            local.set_exception(err)
    threading.Thread(target=run, name="weight-sync-collective", daemon=True).start()
    wait([local, *futures.values()], return_when=FIRST_EXCEPTION)
    failed = {url: f for url, f in futures.items() if f.done() and f.exception() is not None}
    if failed:
        # A server that received everything and then refused to load (a bad name) leaves the group usable.
        wait([local], timeout=_SETTLE_S)
        usable = local.done() and local.exception() is None
        raise WeightSyncError("; ".join(str(f.exception()) for f in failed.values()), group_usable=usable)
    try:
        result = local.result()
    except BaseException as err:
        raise WeightSyncError(f"trainer side of the collective failed: {err}", group_usable=False) from err
    wait_each(futures)
    return result


class DistributedWeightSync:
    """Bucketed broadcast over a process group shared with every server."""

    def __init__(self, *, client: SGLangClient, bucket_bytes: int = 512 * MiB, backend: str = "gloo",
                 master_address: str = "127.0.0.1", master_port: int = 0, group_name: str = "weight_update_group",
                 timeout_s: float = 600.0) -> None:
        """`master_address` must be reachable from every server; port 0 picks a free one per connection.
        Each connection's group is named `<group_name>-<random suffix>`."""
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
        self.client = client
        self.bucket_bytes = bucket_bytes
        self.backend = backend
        self.master_address = master_address
        self.master_port = master_port
        self.group_name = group_name
        self.timeout_s = timeout_s
        self.group = None
        self.active_group_name = ""

    def connect(self) -> None:
        """Create the group: this process is rank 0, server `i`'s TP workers follow at its rank offset."""
        tp_sizes = {url: int(info.get("tp_size", 1)) for url, info in self.client.server_info().items()}
        offsets, world_size = {}, 1
        for url in self.client.server_urls:
            offsets[url] = world_size
            world_size += tp_sizes[url]
        port = self.master_port or free_port(self.master_address)
        # A fresh name per connection: a group left behind by a failed sync (here, or on the servers by a
        # trainer that died) keeps its name and cannot block this one.
        self.active_group_name = f"{self.group_name}-{uuid.uuid4().hex[:8]}"
        base = dict(master_address=self.master_address, master_port=port, world_size=world_size,
                    group_name=self.active_group_name, backend=self.backend)
        # The servers' answers come only once everyone, us included, has joined.
        futures = self.client.request_each("/init_weights_update_group", per_url={
            url: body(InitWeightsUpdateGroupReqInput(**base, rank_offset=offsets[url]))
            for url in self.client.server_urls})
        self.group = _beside_servers(lambda: init_weight_update_group(rank=0, timeout_s=self.timeout_s, **base),
                                     futures)

    def sync(self, named_tensors: NamedTensors, *, version: str) -> SyncStats:
        if self.group is None:
            self.connect()
        stats = SyncStats()
        start = time.perf_counter()
        device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")
        for bucket, is_last in _with_last(iter_buckets(named_tensors, bucket_bytes=self.bucket_bytes)):
            tensors = [t.detach().to(device).contiguous() for _, t in bucket]
            update = UpdateWeightsFromDistributedReqInput(
                names=[name for name, _ in bucket], dtypes=[dtype_name(t.dtype) for t in tensors],
                shapes=[list(t.shape) for t in tensors], group_name=self.active_group_name, flush_cache=is_last,
                **({"weight_version": version} if is_last else {}))
            # The servers block in the broadcast until we send, so post first and broadcast while they wait.
            futures = self.client.request_each("/update_weights_from_distributed", body(update))
            try:
                _beside_servers(lambda tensors=tensors: broadcast_from_trainer(tensors, group=self.group), futures)
            except WeightSyncError as err:
                if not err.group_usable:
                    # Stuck in a half-done collective (its thread ends at the group's timeout):
                    # the next sync makes a new group.
                    self.group = None
                raise
            stats.num_buckets += 1
            stats.num_tensors += len(bucket)
            stats.num_bytes += _bucket_bytes(bucket)
        stats.seconds = time.perf_counter() - start
        return stats

    def close(self) -> None:
        if self.group is None:
            return
        try:
            self.client.call_each("/destroy_weights_update_group",
                                  body(DestroyWeightsUpdateGroupReqInput(group_name=self.active_group_name)))
        except RolloutError as err:  # a server that is gone has no group to destroy
            logger.warning("weight update group %s not destroyed everywhere: %s", self.active_group_name,
                           str(err).splitlines()[0])
        finally:
            destroy_weight_update_group(self.group)
            self.group = None


class DiskWeightSync:
    """Dump to `output_dir/weights-<version>`, then every server reloads from there."""

    def __init__(self, *, client: SGLangClient, output_dir: str | Path, shard_bytes: int = 4 * 1024 ** 3,
                 copy_files_from: str | Path | None = None, keep_last: int = 1) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.client = client
        self.output_dir = Path(output_dir)
        self.shard_bytes = shard_bytes
        self.copy_files_from = copy_files_from
        self.keep_last = keep_last
        self._written: list[Path] = []

    def sync(self, named_tensors: NamedTensors, *, version: str) -> SyncStats:
        stats = SyncStats()
        start = time.perf_counter()

        def counted() -> NamedTensors:
            for name, tensor in named_tensors:
                stats.num_tensors += 1
                stats.num_bytes += tensor.numel() * tensor.element_size()
                yield name, tensor
        path = save_safetensors_atomic(counted(), self.output_dir / f"weights-{version}", shard_bytes=self.shard_bytes,
                                       copy_files_from=self.copy_files_from)
        self.client.call_each("/update_weights_from_disk", body(UpdateWeightFromDiskReqInput(
            model_path=str(path.resolve()), weight_version=version, flush_cache=True)))
        stats.num_buckets = 1
        stats.seconds = time.perf_counter() - start
        if path in self._written:
            self._written.remove(path)
        self._written.append(path)
        while len(self._written) > self.keep_last:
            shutil.rmtree(self._written.pop(0), ignore_errors=True)
        return stats

    def close(self) -> None:
        pass


def serialize_named_tensors(named: list[tuple[str, torch.Tensor]]) -> str:
    """SGLang's `MultiprocessingSerializer.serialize(..., output_str=True)`: base64 of a ForkingPickler dump.

    CUDA tensors pickle as IPC handles; the caller keeps them alive until the servers answer.
    """
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401  registers torch's reductions with ForkingPickler

    buffer = io.BytesIO()
    ForkingPickler(buffer).dump(named)
    return base64.b64encode(buffer.getvalue()).decode("utf-8")


class TensorWeightSync:
    """Colocated GPU: per bucket, CUDA IPC handles through `/update_weights_from_tensor`."""

    def __init__(self, *, client: SGLangClient, bucket_bytes: int = 512 * MiB) -> None:
        self.client = client
        self.bucket_bytes = bucket_bytes
        self._tp_sizes: dict[str, int] | None = None

    def sync(self, named_tensors: NamedTensors, *, version: str) -> SyncStats:
        if self._tp_sizes is None:
            self._tp_sizes = {url: int(info.get("tp_size", 1)) for url, info in self.client.server_info().items()}
        stats = SyncStats()
        start = time.perf_counter()
        for bucket, is_last in _with_last(iter_buckets(named_tensors, bucket_bytes=self.bucket_bytes)):
            tensors = [(name, t.detach().contiguous()) for name, t in bucket]
            if any(not t.is_cuda for _, t in tensors):
                raise ValueError("weight_sync 'tensor' needs CUDA tensors (colocated GPU runs); use 'distributed' "
                                 "or 'disk' on CPU")
            serialized = serialize_named_tensors(tensors)
            per_url = {}
            for url, tp_size in self._tp_sizes.items():
                # One entry per server TP rank; each rank loads the full HF tensors and shards them itself.
                per_url[url] = body(UpdateWeightsFromTensorReqInput(
                    serialized_named_tensors=[serialized] * tp_size, load_format=None, flush_cache=is_last,
                    **({"weight_version": version} if is_last else {})))
            wait_each(self.client.request_each("/update_weights_from_tensor", per_url=per_url))
            stats.num_buckets += 1
            stats.num_tensors += len(bucket)
            stats.num_bytes += _bucket_bytes(bucket)
            del tensors  # the servers have copied them
        stats.seconds = time.perf_counter() - start
        return stats

    def close(self) -> None:
        pass


__all__ = ["DiskWeightSync", "DistributedWeightSync", "SyncStats", "TensorWeightSync", "WeightSync",
           "WeightSyncError", "iter_buckets", "serialize_named_tensors"]
