"""HF safetensors <-> megatron torch_dist checkpoints, one tensor (or one layer) in memory at a time.

`convert_hf_to_megatron` writes the TP=1 / PP=1 view of the model: each
megatron tensor is one chunk (layer tensors are `[1, ...]` chunks of a
`[num_layers, ...]` key), built from its HF tensors when the writer reaches
it. Megatron's `dist_checkpointing.load` reshards it to any TP / PP / virtual
PP. The vocabulary is stored unpadded; megatron zero-fills the rows it pads
for TP on load. Dtypes are kept.

`convert_megatron_to_hf` reads a converted checkpoint or a training
checkpoint (any TP / PP / DP, distributed optimizer or not: only the model
tensors are read), one layer at a time, into size-capped safetensors shards.

Both take the HF side files (config.json, generation_config.json, tokenizer)
along: the megatron checkpoint keeps them in `<checkpoint>/hf/`.
Outputs are built in a temporary sibling directory and renamed into place.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Iterator

import torch

from megatron_gppo.atomic import atomic_directory
from megatron_gppo.checkpoint import mapping_for_config
from megatron_gppo.checkpoint.dist_io import Chunk, TorchDistReader, save_chunks
from megatron_gppo.checkpoint.hf_io import HFWeights, ShardedSafetensorsWriter, copy_side_files, parse_size, read_config
from megatron_gppo.checkpoint.mapping import (
    CHECKPOINT_LAYER,
    EXTRA_STATE_MODULES,
    BoundMap,
    FamilyMapping,
    fuse,
    iter_layer_groups,
    split,
)
from megatron_gppo.model.arch import ModelArch

HF_SUBDIR = "hf"
# HF tensors that carry no weights of ours: recomputed buffers.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _progress(total: int, *, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, dynamic_ncols=True)


def _check_fresh(output_dir: Path) -> None:
    """A conversion never overwrites: `output_dir` must not exist or be empty."""
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise ValueError(f"{output_dir} already exists and is not empty; remove it or choose another output directory")


# ----------------------------------------------------------------------------
# HF -> megatron
# ----------------------------------------------------------------------------


def _check_tensor_names(weights: HFWeights, family: FamilyMapping, arch: ModelArch) -> None:
    expected = set(family.hf_names(arch))
    missing = sorted(expected - set(weights.keys()))
    if missing:
        raise ValueError(f"{weights.model_dir}: {family.architecture} tensor {missing[0]} is missing"
                         f" ({len(missing)} missing in all)")
    unused = sorted(
        name for name in set(weights.keys()) - expected
        if not name.endswith(_IGNORED_SUFFIXES)
        # Some tied checkpoints also store the (identical) head.
        and not (name == "lm_head.weight" and arch.tie_word_embeddings)
    )
    if unused:
        raise ValueError(f"{weights.model_dir}: tensor {unused[0]} has no megatron counterpart in the"
                         f" {family.architecture} mapping (unsupported variant?)")


def _expected_shapes(arch: ModelArch) -> dict[str, tuple[int, ...]]:
    """Megatron tensor shapes implied by config.json (layer tensors by their layer-relative name)."""
    h, d, heads = arch.hidden_size, arch.head_dim, arch.num_attention_heads
    qkv = (heads + 2 * arch.num_query_groups) * d
    return {
        "embedding.word_embeddings.weight": (arch.vocab_size, h),
        "output_layer.weight": (arch.vocab_size, h),
        "decoder.final_layernorm.weight": (h,),
        "self_attention.linear_qkv.layer_norm_weight": (h,),
        "self_attention.linear_qkv.weight": (qkv, h),
        "self_attention.linear_qkv.bias": (qkv,),
        "self_attention.q_layernorm.weight": (d,),
        "self_attention.k_layernorm.weight": (d,),
        "self_attention.linear_proj.weight": (h, heads * d),
        "mlp.linear_fc1.layer_norm_weight": (h,),
        "mlp.linear_fc1.weight": (2 * arch.ffn_hidden_size, h),
        "mlp.linear_fc2.weight": (h, arch.ffn_hidden_size),
    }


def hf_checkpoint_chunks(weights: HFWeights, maps: list[BoundMap], *, arch: ModelArch) -> list[tuple[Chunk, BoundMap]]:
    """The TP=1 chunk of every megatron tensor, with shapes and dtypes from the HF headers (nothing read).

    Raises ValueError when a tensor's shape does not match config.json.
    """
    num_layers = arch.num_layers
    chunks = []
    for m in maps:
        headers = [weights.header(name) for name in m.hf]
        shapes = [shape for shape, _ in headers]
        dtypes = {dtype for _, dtype in headers}
        if len(dtypes) != 1:
            raise ValueError(f"{m.hf} have different dtypes {sorted(dtypes)}; they are fused into one tensor")
        dtype = _safetensors_dtype(dtypes.pop())
        if m.kind in ("qkv", "gate_up"):
            shape = (sum(s[0] for s in shapes), *shapes[0][1:])
        else:
            shape = shapes[0]
        expected = _expected_shapes(arch).get(m.checkpoint_key.removeprefix(CHECKPOINT_LAYER))
        if expected is not None and shape != expected:
            raise ValueError(f"{m.hf[0]}: shape {list(shapes[0])} does not match config.json"
                             f" ({m.megatron} should be {list(expected)}, got {list(shape)})")
        if m.layer is None:
            chunk = Chunk(m.checkpoint_key, shape, (0,) * len(shape), shape, dtype)
        else:
            chunk = Chunk(m.checkpoint_key, (num_layers, *shape), (m.layer,) + (0,) * len(shape), (1, *shape), dtype)
        chunks.append((chunk, m))
    return chunks


def _safetensors_dtype(name: str) -> torch.dtype:
    table = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    if name not in table:
        raise ValueError(f"safetensors dtype {name} is not supported for conversion")
    return table[name]


def extra_state_objects(*, num_layers: int) -> dict[str, bytes]:
    """The per-layer `_extra_state` objects a local-spec GPTModel checkpoints (empty: `[None]`).

    Written so that a plain `dist_checkpointing.load(model.sharded_state_dict(), dir)` finds every key.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    payload = io.BytesIO()
    torch.save([None], payload)
    objects = {}
    for module in EXTRA_STATE_MODULES:
        for layer in range(num_layers):
            obj = ShardedObject(f"{CHECKPOINT_LAYER}{module}._extra_state", None, (num_layers,), (layer,), replica_id=0)
            objects[obj.unique_key] = payload.getvalue()
    return objects


def convert_hf_to_megatron(hf_dir: str | os.PathLike, output_dir: str | os.PathLike, *, progress: bool = True) -> Path:
    """Write the megatron torch_dist checkpoint of the HF model in `hf_dir` to `output_dir`."""
    hf_dir, output_dir = Path(hf_dir), Path(output_dir)
    config = read_config(hf_dir)
    family = mapping_for_config(config)
    arch = ModelArch.from_hf_config(config)
    with HFWeights(hf_dir) as weights:
        _check_tensor_names(weights, family, arch)
        chunks = hf_checkpoint_chunks(weights, family.bound_maps(arch), arch=arch)
        maps = {(c.key, c.offset): m for c, m in chunks}
        _check_fresh(output_dir)
        with atomic_directory(output_dir) as tmp:
            bar = _progress(len(chunks), desc="hf -> megatron", enabled=progress)

            def resolve(chunk: Chunk) -> torch.Tensor:
                m = maps[(chunk.key, chunk.offset)]
                tensor = fuse(m.kind, [weights.get(name) for name in m.hf], arch=arch)
                bar.update(1)
                return tensor.reshape(chunk.shape)

            save_chunks(tmp, chunks=[c for c, _ in chunks], resolve=resolve,
                        objects=extra_state_objects(num_layers=arch.num_layers))
            bar.close()
            copy_side_files(hf_dir, tmp / HF_SUBDIR)
    return output_dir


# ----------------------------------------------------------------------------
# megatron -> HF
# ----------------------------------------------------------------------------


def _checkpoint_hf_config(megatron_dir: Path, hf_config_dir: str | os.PathLike | None) -> Path:
    source = Path(hf_config_dir) if hf_config_dir else megatron_dir / HF_SUBDIR
    if not (source / "config.json").is_file():
        raise ValueError(f"no HF config.json in {source}; pass --hf-config with the original HF model directory")
    return source


def iter_checkpoint_hf_tensors(
    reader: TorchDistReader, family: FamilyMapping, arch: ModelArch, *, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(hf_name, tensor) of a megatron checkpoint, read one layer at a time."""
    for layer, group in iter_layer_groups(family.bound_maps(arch)):
        requests = []
        for m in group:
            # Saved through a DDP wrapper, megatron prefixes every key with "module.".
            key = m.checkpoint_key
            if key not in reader.tensors and f"module.{key}" in reader.tensors:
                key = f"module.{key}"
            shape = reader.shape(key)
            if m.layer is None:
                requests.append((key, (0,) * len(shape), shape))
            else:
                if shape[0] != arch.num_layers:
                    raise ValueError(f"checkpoint has {shape[0]} layers in {key}, the HF config {arch.num_layers}")
                requests.append((key, (layer,) + (0,) * (len(shape) - 1), (1, *shape[1:])))
        for m, tensor in zip(group, reader.read(requests)):
            if m.layer is not None:
                tensor = tensor[0]
            for name, piece in zip(m.hf, split(m.kind, tensor, arch=arch)):
                yield name, piece if dtype is None else piece.to(dtype)


def convert_megatron_to_hf(
    megatron_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    hf_config_dir: str | os.PathLike | None = None,
    max_shard_size: str = "5GB",
    dtype: str | None = None,
    progress: bool = True,
) -> Path:
    """Write HF safetensors shards + index + side files for the megatron checkpoint in `megatron_dir`.

    `dtype` (bfloat16 / float16 / float32) casts every tensor; None keeps the stored dtypes.
    """
    megatron_dir, output_dir = Path(megatron_dir), Path(output_dir)
    if not megatron_dir.is_dir():
        raise ValueError(f"{megatron_dir} is not a directory")
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; choose one of {', '.join(_DTYPES)}")
    max_bytes = parse_size(max_shard_size)
    side = _checkpoint_hf_config(megatron_dir, hf_config_dir)
    config = read_config(side)
    family = mapping_for_config(config)
    arch = ModelArch.from_hf_config(config)
    reader = TorchDistReader(megatron_dir)
    _check_fresh(output_dir)
    with atomic_directory(output_dir) as tmp:
        copy_side_files(side, tmp)
        if dtype is not None:
            config_path = tmp / "config.json"
            written = json.loads(config_path.read_text())
            written["torch_dtype"] = dtype
            if "dtype" in written:  # transformers 5 spelling
                written["dtype"] = dtype
            config_path.write_text(json.dumps(written, indent=2) + "\n")
        writer = ShardedSafetensorsWriter(tmp, max_shard_bytes=max_bytes)
        names = family.hf_names(arch)
        bar = _progress(len(names), desc="megatron -> hf", enabled=progress)
        for name, tensor in iter_checkpoint_hf_tensors(reader, family, arch, dtype=_DTYPES.get(dtype)):
            writer.add(name, tensor)
            bar.update(1)
        bar.close()
        writer.finish()
    return output_dir


__all__ = [
    "HF_SUBDIR", "convert_hf_to_megatron", "convert_megatron_to_hf", "extra_state_objects", "hf_checkpoint_chunks",
    "iter_checkpoint_hf_tensors",
]
