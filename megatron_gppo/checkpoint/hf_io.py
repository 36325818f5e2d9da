"""Hugging Face model directories: lazy safetensors reading, streaming sharded writing, side files.

`HFWeights` opens every safetensors file of a model directory (single
`model.safetensors`, or shards listed in `model.safetensors.index.json`) and
reads one tensor at a time on demand, so a conversion never holds the whole
model. Headers are checked on open: a corrupted or truncated file is a
one-line ValueError naming it.

`ShardedSafetensorsWriter` takes tensors one by one and writes
`model-0000k-of-0000N.safetensors` shards of at most `max_shard_bytes` plus
`model.safetensors.index.json`, as `save_pretrained` does.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

import torch

from megatron_gppo.atomic import atomic_directory

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Everything besides the weights that `from_pretrained` / tokenizers / SGLang read.
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)


def read_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    """config.json of a HF model directory, with one-line errors for a missing dir / file."""
    path = Path(model_dir)
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory")
    config = path / "config.json"
    if not config.is_file():
        raise ValueError(f"{path} has no config.json")
    try:
        return json.loads(config.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config} is not valid JSON ({exc})") from None


def copy_side_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy config / generation config / tokenizer files present in `src` to `dst`; returns their names."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


class HFWeights:
    """Read-only, lazy view of the safetensors weights of a HF model directory."""

    def __init__(self, model_dir: str | os.PathLike):
        from safetensors import safe_open

        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise ValueError(f"{self.model_dir} is not a directory")
        files = self._weight_files()
        self._handles = {}
        self._file_of: dict[str, str] = {}
        for name in files:
            path = self.model_dir / name
            if not path.is_file():
                raise ValueError(f"{path} is listed in {INDEX_FILE} but does not exist")
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as exc:  # safetensors raises its own SafetensorError (an Exception)
                raise ValueError(f"{path} is not a valid safetensors file (corrupted or truncated?): {exc}") from None
            self._handles[name] = handle
            for key in handle.keys():
                self._file_of[key] = name

    def _weight_files(self) -> list[str]:
        index = self.model_dir / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise ValueError(f"{index} is not a valid safetensors index ({exc})") from None
            return sorted(set(weight_map.values()))
        if (self.model_dir / SINGLE_FILE).is_file():
            return [SINGLE_FILE]
        found = sorted(p.name for p in self.model_dir.glob("*.safetensors"))
        if not found:
            raise ValueError(f"{self.model_dir} has no safetensors weights (model.safetensors or {INDEX_FILE})")
        return found

    def keys(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def header(self, name: str) -> tuple[tuple[int, ...], str]:
        """(shape, safetensors dtype name such as "BF16") of a tensor, without reading its data."""
        if name not in self._file_of:
            raise ValueError(f"{self.model_dir}: no tensor named {name}")
        piece = self._handles[self._file_of[name]].get_slice(name)
        return tuple(piece.get_shape()), str(piece.get_dtype())

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read from disk now (a fresh tensor, dtype as stored)."""
        if name not in self._file_of:
            raise ValueError(f"{self.model_dir}: no tensor named {name}")
        return self._handles[self._file_of[name]].get_tensor(name)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "HFWeights":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '1000' (bytes) -> bytes."""
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    upper = text.strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit):
            number = upper[: -len(unit)].strip()
            break
    else:
        number, factor = upper, 1
    try:
        value = int(float(number) * factor)
    except ValueError:
        raise ValueError(f"cannot parse size {text!r}; use e.g. 5GB, 500MB or 2GiB") from None
    if value <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return value


class ShardedSafetensorsWriter:
    """Write tensors one at a time into size-capped safetensors shards plus an index.

    A shard holds at least one tensor, so a tensor larger than the cap gets a
    shard of its own. Tensors are written as given (dtype, values); a tensor
    that owns its whole storage is kept by reference until its shard is
    written (do not modify it in place meanwhile), views are copied.
    """

    def __init__(self, output_dir: str | os.PathLike, *, max_shard_bytes: int):
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self._total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or any(name in shard for shard in self._shards):
            raise ValueError(f"tensor {name} written twice")
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        tensor = tensor.detach()
        shared = any(tensor.untyped_storage().data_ptr() == other.untyped_storage().data_ptr()
                     for other in self._pending.values())
        if shared or not tensor.is_contiguous() or tensor.untyped_storage().nbytes() != size:
            # safetensors refuses tensors that share storage (views of one fused tensor, tied
            # weights written under two names): copy them.
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        self._pending[name] = tensor
        self._pending_bytes += size
        self._total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        index = len(self._shards)
        save_file(self._pending, str(self.output_dir / f"shard-{index}.tmp"), metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Name the shards model-0000k-of-0000N.safetensors and write the index; returns the shard names."""
        if self._pending:
            self._flush()
        if not self._shards:
            return []
        count = len(self._shards)
        weight_map, names = {}, []
        for index, tensors in enumerate(self._shards):
            name = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self.output_dir / f"shard-{index}.tmp", self.output_dir / name)
            weight_map.update({tensor: name for tensor in tensors})
            names.append(name)
        index_json = {"metadata": {"total_size": self._total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.output_dir / INDEX_FILE).write_text(json.dumps(index_json, indent=2) + "\n")
        return names


def save_safetensors_atomic(named_tensors: Iterable[tuple[str, torch.Tensor]], output_dir: str | Path, *,
                            shard_bytes: int = 4 * 1024 ** 3, copy_files_from: str | Path | None = None) -> Path:
    """Write tensors as a Hugging Face safetensors checkpoint, all or nothing.

    Shards and `model.safetensors.index.json`, plus the `config.json` /
    tokenizer files of `copy_files_from`, go to a temporary directory that is
    renamed to `output_dir` at the end (replacing it), so a reader never sees
    a partial dump.
    """
    with atomic_directory(output_dir) as tmp:
        writer = ShardedSafetensorsWriter(tmp, max_shard_bytes=shard_bytes)
        for name, tensor in named_tensors:
            writer.add(name, tensor.detach().to("cpu"))
        if not writer.finish():
            raise ValueError("no tensors to save")
        if copy_files_from is not None:
            copy_side_files(copy_files_from, tmp)
    return Path(output_dir)


__all__ = ["HFWeights", "INDEX_FILE", "SIDE_FILES", "ShardedSafetensorsWriter", "copy_side_files", "parse_size",
           "read_config", "save_safetensors_atomic"]
