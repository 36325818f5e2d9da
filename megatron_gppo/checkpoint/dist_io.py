"""Megatron `torch_dist` checkpoints written and read tensor by tensor, without a model or process group.

Megatron-core's `dist_checkpointing` (backend torch_dist) stores a directory
of `metadata.json` (backend), `common.pt` (non-sharded state), and a
`torch.distributed.checkpoint` (DCP) payload: `.metadata` plus `*.distcp`
files. Every tensor has a global shape and is stored as chunks; layer
tensors share one key with a leading `[num_layers]` axis. Any layout can load
it because DCP reads the overlap of the chunks it wants with the chunks stored.

`save_chunks` writes such a checkpoint through DCP with a planner whose
`resolve_data` produces each chunk only when the writer asks for it (one
thread, one file per chunk), so memory stays at about one tensor: a 70B
model converts on a machine with a few GB of RAM beyond its largest tensor. `TorchDistReader` reads any region of any
stored tensor (a converted checkpoint or a training checkpoint saved at any
TP / PP / DP) the same way.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

# What megatron's dist_checkpointing.save writes for the torch_dist backend (megatron-core 0.16).
MEGATRON_METADATA = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}


@dataclass(frozen=True)
class Chunk:
    """One stored piece of a checkpoint tensor: `shape` at `offset` inside `global_shape`."""

    key: str
    global_shape: tuple[int, ...]
    offset: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: torch.dtype


class _LazySavePlanner(DefaultSavePlanner):
    """Plans the given chunks and byte objects; produces each chunk's data only when it is written."""

    def __init__(self, chunks: Sequence[Chunk], resolve: Callable[[Chunk], torch.Tensor], objects: dict[str, bytes]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._chunks = {(c.key, c.offset): c for c in chunks}
        self._resolve = resolve
        self._objects = objects

    def create_local_plan(self) -> SavePlan:
        items = [
            WriteItem(
                index=MetadataIndex(c.key, torch.Size(c.offset)),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=torch.Size(c.offset), sizes=torch.Size(c.shape)),
                    properties=TensorProperties(dtype=c.dtype),
                    size=torch.Size(c.global_shape),
                ),
            )
            for c in self._chunks.values()
        ]
        items += [WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO) for key in self._objects]
        self.plan = SavePlan(items)
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        if write_item.type == WriteItemType.BYTE_IO:
            return io.BytesIO(self._objects[write_item.index.fqn])
        chunk = self._chunks[(write_item.index.fqn, tuple(write_item.index.offset))]
        tensor = self._resolve(chunk)
        assert tuple(tensor.shape) == chunk.shape and tensor.dtype == chunk.dtype, (chunk, tensor.shape, tensor.dtype)
        return tensor.contiguous()


def save_chunks(
    checkpoint_dir: str | os.PathLike,
    *,
    chunks: Sequence[Chunk],
    resolve: Callable[[Chunk], torch.Tensor],
    objects: dict[str, bytes] | None = None,
) -> None:
    """Write a megatron torch_dist checkpoint of `chunks` (data from `resolve`) and byte `objects`.

    `resolve(chunk)` is called once per chunk, in the order given, and must
    return a tensor of exactly `chunk.shape` and `chunk.dtype`. The directory
    must exist.
    """
    # One file per chunk: torch's writer keeps every tensor of a file alive until the file is closed.
    writer = FileSystemWriter(str(checkpoint_dir), single_file_per_rank=False, thread_count=1, sync_files=True)
    planner = _LazySavePlanner(chunks, resolve, objects or {})
    with _no_process_group_warning():
        dcp.save({}, storage_writer=writer, planner=planner, no_dist=True)
    torch.save({}, Path(checkpoint_dir) / "common.pt")
    (Path(checkpoint_dir) / "metadata.json").write_text(json.dumps(MEGATRON_METADATA))


@contextlib.contextmanager
def _no_process_group_warning() -> Iterator[None]:
    # DCP warns that it runs without torch.distributed; that is the point here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


class _CachedReader(FileSystemReader):
    """FileSystemReader that parses `.metadata` once."""

    _metadata: Metadata | None = None

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if self._metadata is None:
            self._metadata = super().read_metadata(*args, **kwargs)
        return self._metadata


class _RegionLoadPlanner(DefaultLoadPlanner):
    """Reads requested regions of stored tensors into given buffers."""

    def __init__(self, regions: dict[tuple[str, tuple[int, ...]], torch.Tensor]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._regions = regions

    def create_local_plan(self) -> LoadPlan:
        items = []
        for (key, offset), buffer in self._regions.items():
            stored = self.metadata.state_dict_metadata[key]
            chunk = ChunkStorageMetadata(offsets=torch.Size(offset), sizes=buffer.shape)
            items += create_read_items_for_chunk_list(key, stored, [chunk])
        return LoadPlan(items)

    def resolve_tensor(self, read_item):
        buffer = self._regions[(read_item.dest_index.fqn, tuple(read_item.dest_index.offset))]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            buffer = buffer.narrow(dim, start, length)
        return buffer

    def commit_tensor(self, read_item, tensor) -> None:
        pass


class TorchDistReader:
    """Random access to the tensors of a megatron torch_dist checkpoint."""

    def __init__(self, checkpoint_dir: str | os.PathLike):
        self.checkpoint_dir = Path(checkpoint_dir)
        if not self.checkpoint_dir.is_dir():
            raise ValueError(f"{self.checkpoint_dir} is not a directory")
        meta_path = self.checkpoint_dir / "metadata.json"
        if not meta_path.is_file() or not (self.checkpoint_dir / ".metadata").is_file():
            raise ValueError(f"{self.checkpoint_dir} is not a megatron dist checkpoint (no metadata.json / .metadata)")
        backend = json.loads(meta_path.read_text()).get("sharded_backend")
        if backend != "torch_dist":
            raise ValueError(f"{self.checkpoint_dir}: sharded_backend {backend!r} is not supported, only torch_dist")
        self._reader = _CachedReader(str(self.checkpoint_dir))
        try:
            metadata = self._reader.read_metadata()
        except Exception as exc:  # unpickling a damaged file raises many types
            raise ValueError(f"{self.checkpoint_dir}/.metadata is unreadable (corrupted?): {exc}") from None
        self.tensors: dict[str, TensorStorageMetadata] = {
            key: md for key, md in metadata.state_dict_metadata.items() if isinstance(md, TensorStorageMetadata)
        }

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._metadata(key).size)

    def dtype(self, key: str) -> torch.dtype:
        return self._metadata(key).properties.dtype

    def _metadata(self, key: str) -> TensorStorageMetadata:
        if key not in self.tensors:
            raise ValueError(f"{self.checkpoint_dir}: no tensor {key} in the checkpoint")
        return self.tensors[key]

    def read(self, requests: Sequence[tuple[str, tuple[int, ...], tuple[int, ...]]]) -> list[torch.Tensor]:
        """Read regions `(key, offset, shape)` (in stored dtype), in one pass over the files."""
        regions = {}
        for key, offset, shape in requests:
            regions[(key, tuple(offset))] = torch.empty(shape, dtype=self.dtype(key))
        with _no_process_group_warning():
            dcp.load({}, storage_reader=self._reader, planner=_RegionLoadPlanner(regions), no_dist=True)
        return [regions[(key, tuple(offset))] for key, offset, _ in requests]


__all__ = ["Chunk", "MEGATRON_METADATA", "TorchDistReader", "save_chunks"]
