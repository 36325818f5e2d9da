"""A running (possibly TP / PP / VPP-sharded) megatron model: load checkpoint weights, stream HF-named tensors.

Both need `init_distributed` (megatron's parallel state) and this rank's model
chunks from `build_model_chunks`, bare or DDP-wrapped.

`load_megatron_weights(chunks, dir)` reads this rank's shards of the model from
a converted checkpoint (tools/convert_hf_to_megatron.py) or a training
checkpoint, at any layout (megatron's dist_checkpointing reshards). When an
optimizer keeps fp32 main weights, call `optimizer.reload_model_params()`
after it.

`iter_hf_tensors(chunks, arch=...)` yields `(hf_name, tensor)` pairs for weight
sync (see its docstring for the collective contract); `export_hf` writes them as
a Hugging Face model directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from megatron_gppo.checkpoint import mapping_for
from megatron_gppo.checkpoint.mapping import canonical_name, gather_tp_shards, split
from megatron_gppo.model.arch import ModelArch


def _bare(chunk: torch.nn.Module) -> torch.nn.Module:
    # DDP / Float16Module keep the model in `.module`.
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def enable_checkpoint_cpu_compat() -> None:
    """Cover megatron's lazily imported checkpoint strategies with the CPU compatibility layer."""
    import importlib

    # Imported lazily by megatron, so the first enable_cpu_compat() may not have covered them.
    for name in ("filesystem_async", "torch"):
        importlib.import_module(f"megatron.core.dist_checkpointing.strategies.{name}")

    from megatron_gppo.model.cpu_compat import enable_cpu_compat

    enable_cpu_compat()


def stored_keys(checkpoint_dir: str | Path) -> set[str]:
    """Every key (tensors and objects) of a torch_dist checkpoint."""
    from torch.distributed.checkpoint import FileSystemReader

    return set(FileSystemReader(str(checkpoint_dir)).read_metadata().state_dict_metadata)


def model_sharded_state_dict(chunks: list[torch.nn.Module], *, present: set[str] | None = None) -> dict:
    """`{"model0": ..., "model1": ...}` sharded state dicts of this rank's chunks (canonical keys).

    With `present` (a checkpoint's keys), `_extra_state` objects the checkpoint
    does not have are left out: they hold no weights, and a checkpoint written
    with the local spec has none for Transformer Engine's attention modules.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    pieces = {}
    for index, chunk in enumerate(chunks):
        state = _bare(chunk).sharded_state_dict()
        if present is not None:
            state = {
                name: value for name, value in state.items()
                if not (isinstance(value, ShardedObject) and value.unique_key not in present)
            }
        pieces[f"model{index}"] = state
    return pieces


@torch.no_grad()
def load_megatron_weights(chunks: list[torch.nn.Module], checkpoint_dir: str | Path) -> None:
    """Load this rank's part of the model weights in `checkpoint_dir` into `chunks` (in place)."""
    from megatron.core import dist_checkpointing

    checkpoint_dir = Path(checkpoint_dir)
    if not (checkpoint_dir / "metadata.json").is_file():
        raise ValueError(f"{checkpoint_dir} is not a megatron dist checkpoint (no metadata.json)")
    enable_checkpoint_cpu_compat()
    sharded = model_sharded_state_dict(chunks, present=stored_keys(checkpoint_dir))
    loaded = dist_checkpointing.load(sharded, str(checkpoint_dir))
    for index, chunk in enumerate(chunks):
        result = _bare(chunk).load_state_dict(loaded[f"model{index}"], strict=False)
        missing = [name for name in result.missing_keys if not name.endswith("_extra_state")]
        if missing or result.unexpected_keys:
            raise ValueError(f"{checkpoint_dir}: model weights do not match: missing {missing[:3]},"
                             f" unexpected {result.unexpected_keys[:3]}")


def full_megatron_name(chunk: torch.nn.Module, local_name: str) -> str:
    """Canonical full name (global layer number, checkpoint spelling) of a parameter of `chunk`."""
    if local_name.startswith("decoder.layers."):
        index, _, rest = local_name[len("decoder.layers."):].partition(".")
        layer = chunk.decoder.layers[int(index)]
        local_name = f"decoder.layers.{layer.layer_number - 1}.{rest}"
    return canonical_name(local_name)


def _gather_tp(param: torch.Tensor, kind: str) -> torch.Tensor:
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return param.detach()
    shards = [torch.empty_like(param) for _ in range(tp)]
    dist.all_gather(shards, param.detach().contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return gather_tp_shards(kind, shards, dim=param.partition_dim)


def _local_hf_tensors(chunks: list[torch.nn.Module], arch: ModelArch) -> Iterator[tuple[str, torch.Tensor]]:
    maps = mapping_for(arch).by_megatron_name(arch)
    for chunk in map(_bare, chunks):
        for local_name, param in chunk.named_parameters():
            name = full_megatron_name(chunk, local_name)
            if name == "output_layer.weight" and arch.tie_word_embeddings:
                continue  # the last stage's copy of the tied embedding; the first stage yields it
            entry = maps.get(name)
            if entry is None:
                raise ValueError(f"parameter {local_name} ({name}) has no entry in the {arch.family} mapping")
            yield from zip(entry.hf, split(entry.kind, _gather_tp(param, entry.kind), arch=arch))


def iter_hf_tensors(
    chunks: list[torch.nn.Module], *, arch: ModelArch, all_stages: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream the model as Hugging Face `(name, tensor)` pairs (full, unsharded tensors).

    Collective: every rank of a tensor-parallel group must run the generator
    to the end, in step (each TP-split tensor is all-gathered, one at a time),
    and every TP rank receives the full tensors. Data-parallel replicas do not
    communicate; each yields the same tensors.

    Pipeline stages: by default each stage yields only its own layers (global
    layer numbers in the names), the first stage the embedding, the last the
    final norm and lm_head (untied only; a tied model has only
    `model.embed_tokens.weight`, as HF saves it). With `all_stages=True`
    every rank of the pipeline group yields every tensor, stage 0 first (each
    tensor is broadcast from its stage, one at a time), so one rank can send
    the whole model.

    Tensors are in the parameters' dtype and device; at TP=1 some are the
    parameters themselves (read-only views): copy what you keep past the
    next optimizer step. Memory: one gathered tensor at a time. Padded vocab
    rows are dropped; q/k/v and gate/up are split back into separate tensors.
    """
    from megatron.core import parallel_state

    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if not all_stages or pp == 1:
        yield from _local_hf_tensors(chunks, arch)
        return
    group = parallel_state.get_pipeline_model_parallel_group()
    my_stage = parallel_state.get_pipeline_model_parallel_rank()
    ranks = dist.get_process_group_ranks(group)
    device = next(_bare(chunks[0]).parameters()).device
    for stage in range(pp):
        local = _local_hf_tensors(chunks, arch) if stage == my_stage else None
        while True:
            item = next(local, None) if local is not None else None
            header = [None if item is None else (item[0], tuple(item[1].shape), item[1].dtype)]
            dist.broadcast_object_list(header, src=ranks[stage], group=group)
            if header[0] is None:
                break
            name, shape, dtype = header[0]
            tensor = item[1].contiguous() if item is not None else torch.empty(shape, dtype=dtype, device=device)
            dist.broadcast(tensor, src=ranks[stage], group=group)
            yield name, tensor


def export_hf(chunks: list[torch.nn.Module], *, arch: ModelArch, output_dir: str | Path,
              copy_files_from: str | Path) -> Path:
    """Write the model as a Hugging Face checkpoint to `output_dir`, all or nothing.

    Collective over the whole job (see `iter_hf_tensors`); global rank 0
    writes the safetensors and the config / tokenizer files of
    `copy_files_from`, an HF directory of the same architecture.
    """
    from megatron_gppo.checkpoint.hf_io import save_safetensors_atomic

    tensors = iter_hf_tensors(chunks, arch=arch, all_stages=True)
    if dist.get_rank() == 0:
        save_safetensors_atomic(tensors, output_dir, copy_files_from=copy_files_from)
    else:
        for _ in tensors:  # take part in the gathers
            pass
    dist.barrier()
    return Path(output_dir)


__all__ = [
    "enable_checkpoint_cpu_compat", "export_hf", "full_megatron_name", "iter_hf_tensors", "load_megatron_weights",
    "model_sharded_state_dict", "stored_keys",
]
