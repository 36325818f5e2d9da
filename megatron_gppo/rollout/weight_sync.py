"""Trainer side of weight sync: stream Hugging Face-named tensors to every rollout server.

Three ways, all SGLang's protocol, all taking an iterator of `(hf_name, tensor)`
(the Megatron -> HF conversion happens before) and a weight version string
that every server reports afterwards (`/model_info`, and
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
- `TensorWeightSync`: colocated servers only: each bucket goes through
  `/update_weights_from_tensor` as CUDA IPC handles (GPU) or shared-memory
  files (CPU); nothing is copied over the wire.

The weight version is sent with the last bucket only, so it changes when the
whole update has landed. Servers that have them (SGLang >= 0.5.21, and our CPU
server) get the tensor and distributed updates inside a weight-update session
(`/begin_weight_update` ... `/end_weight_update`), which they require; older
ones are told apart by probing (`SGLangClient.has_update_sessions`). The
servers must not be generating (SGLang fails an update whose cache flush finds
requests running, and up to 0.5.21 its scheduler dies of it):
`SGLangEngine.update_weights` pauses generation and flushes the cache first.
"""

from __future__ import annotations

import base64
import io
import logging
import shutil
import threading
import time
import uuid
from concurrent.futures import FIRST_EXCEPTION, Future, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from multiprocessing.reduction import ForkingPickler
from typing import Callable, Iterable, Iterator, Protocol, TypeVar

import torch

from megatron_gppo.checkpoint.hf_io import save_safetensors_atomic
from megatron_gppo.ports import free_port
from megatron_gppo.rollout.client import RolloutError, SGLangClient, wait_each
from megatron_gppo.rollout.sglang_requests import (BeginWeightUpdateReqInput, DestroyWeightsUpdateGroupReqInput,
                                                   EndWeightUpdateReqInput, InitWeightsUpdateGroupReqInput,
                                                   UpdateWeightFromDiskReqInput,
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
    """A weight update failed part-way."""


@contextmanager
def update_session(client: SGLangClient) -> Iterator[None]:
    """A weight-update session on every server that has them, closed even when the update fails."""
    urls = [url for url, has in client.has_update_sessions().items() if has]
    end = body(EndWeightUpdateReqInput())
    begun = client.request_each("/begin_weight_update", body(BeginWeightUpdateReqInput()), urls=urls)
    try:
        wait_each(begun)
        yield
    except BaseException:
        opened = [url for url, future in begun.items() if future.exception() is None]
        try:
            client.call_each("/end_weight_update", end, urls=opened)
        except RolloutError as err:  # a server that died has no session left; report the first failure
            logger.warning("weight-update session not closed everywhere: %s", str(err).splitlines()[0])
        raise
    client.call_each("/end_weight_update", end, urls=urls)


def _beside_servers(collective: Callable[[], T], futures: dict[str, Future]) -> T:
    """Run our side of a collective while the servers' HTTP calls (their side) are in flight.

    Fails as soon as a server answers with an error instead of waiting in a
    collective that can no longer complete; the collective then stays blocked
    on a daemon thread until the group's timeout. Our side returning proves
    nothing (an NCCL broadcast returns once queued on the GPU), so any failure
    makes the caller drop the group: the next update builds a new one.
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
        raise WeightSyncError("; ".join(str(f.exception()) for f in failed.values()))
    try:
        result = local.result()
    except BaseException as err:
        raise WeightSyncError(f"trainer side of the collective failed: {err}") from err
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
        with update_session(self.client):
            return self._broadcast(named_tensors, version=version)

    def _broadcast(self, named_tensors: NamedTensors, *, version: str) -> SyncStats:
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
            except WeightSyncError:
                # Possibly stuck in a half-done collective (its thread ends at the group's timeout).
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


# Position of the device index in the arguments torch's CUDA tensor reduction pickles
# (`rebuild_cuda_tensor(..., storage_device, ...)`); SGLang replaces it the same way.
_CUDA_DEVICE_ARG = 6


class _PayloadPickler(ForkingPickler):
    """torch's multiprocessing pickler, naming GPUs by UUID as SGLang's patched torch does.

    A server started with its own CUDA_VISIBLE_DEVICES numbers the GPUs
    differently from the trainer; SGLang maps a UUID back to its own index
    (`srt/utils/patch_torch.py`). CPU tensors go through shared-memory files,
    which any process on the host can open (file descriptors, torch's
    default, do not survive HTTP).
    """

    def reducer_override(self, obj):
        if isinstance(obj, torch.Tensor) and obj.is_cuda:
            from torch.multiprocessing import reductions

            rebuild, args = reductions.reduce_tensor(obj)
            uuid_ = str(torch.cuda.get_device_properties(args[_CUDA_DEVICE_ARG]).uuid)
            return rebuild, (*args[:_CUDA_DEVICE_ARG], uuid_, *args[_CUDA_DEVICE_ARG + 1:])
        return NotImplemented


def serialize_named_tensors(named: list[tuple[str, torch.Tensor]]) -> str:
    """One entry of SGLang's `serialized_named_tensors`: base64 of a pickle of [(name, tensor)].

    Like SGLang's `MultiprocessingSerializer.serialize(..., output_str=True)`, with GPUs named by UUID and
    CPU tensors in shared memory. The caller keeps the tensors alive until the servers answer.
    """
    import torch.multiprocessing as mp

    buffer = io.BytesIO()
    strategy = mp.get_sharing_strategy()
    mp.set_sharing_strategy("file_system")
    try:
        _PayloadPickler(buffer).dump(named)
    finally:
        mp.set_sharing_strategy(strategy)
    return base64.b64encode(buffer.getvalue()).decode("utf-8")


def tensor_update(tensors: list[tuple[str, torch.Tensor]], *, tp_size: int, version: str | None) -> dict:
    """The `/update_weights_from_tensor` body of one bucket for a server of `tp_size` ranks; `version` on
    the update's last bucket only (which also flushes the cache).

    One pickle per server TP rank: each unpickling takes its own reference to the CUDA memory. Every rank
    loads the full HF tensors and shards them itself.
    """
    return body(UpdateWeightsFromTensorReqInput(
        serialized_named_tensors=[serialize_named_tensors(tensors) for _ in range(tp_size)],
        flush_cache=version is not None, **({"weight_version": version} if version is not None else {})))


class TensorWeightSync:
    """Colocated servers: per bucket, shared tensors (CUDA IPC or CPU shared memory) through `/update_weights_from_tensor`."""

    def __init__(self, *, client: SGLangClient, bucket_bytes: int = 512 * MiB) -> None:
        self.client = client
        self.bucket_bytes = bucket_bytes

    def sync(self, named_tensors: NamedTensors, *, version: str) -> SyncStats:
        tp_sizes = {url: int(info.get("tp_size", 1)) for url, info in self.client.server_info().items()}
        stats = SyncStats()
        start = time.perf_counter()
        with update_session(self.client):
            for bucket, is_last in _with_last(iter_buckets(named_tensors, bucket_bytes=self.bucket_bytes)):
                # A copy: sharing a CPU tensor moves its storage into shared memory, which the trainer's
                # own parameters must not do.
                tensors = [(name, t.detach().clone() if not t.is_cuda else t.detach().contiguous())
                           for name, t in bucket]
                per_url = {url: tensor_update(tensors, tp_size=tp_size, version=version if is_last else None)
                           for url, tp_size in tp_sizes.items()}
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
           "WeightSyncError", "iter_buckets", "serialize_named_tensors", "tensor_update", "update_session"]
