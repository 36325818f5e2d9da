"""Move weights between a full megatron state dict and this rank's model chunks.

"Full" means TP=1 / PP=1 megatron names with global layer numbers
(`decoder.layers.{i}.…`, i from 0) and the true (unpadded) vocabulary, as
`megatron_gppo.checkpoint.mapping.hf_to_megatron` produces (either layer-norm
spelling: local spec or Transformer Engine). `shard_like`
cuts the piece of one full tensor that a local parameter holds:

- the layer index comes from the layer's own `layer_number`, so any PP / VPP
  / uneven split is handled;
- TP: megatron tags split parameters with `tensor_model_parallel` and
  `partition_dim`; the vocab rows are padded first; `linear_fc1` of a gated
  MLP is [gate; up] and each half is split separately;
- with tied embeddings the last stage's `output_layer.weight` is the
  embedding.
"""

from __future__ import annotations

import re

import torch
from megatron.core import parallel_state

from megatron_gppo.model.provider import PolicyGPTModel

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
# The local layer spec's norm names and Transformer Engine's (fused into the next linear).
_NORM_ALIASES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}
_NORM_ALIASES.update({te: local for local, te in _NORM_ALIASES.items()})


def global_name(chunk: PolicyGPTModel, local_name: str) -> str:
    """The full-state-dict name of `local_name` in `chunk`."""
    match = _LAYER.match(local_name)
    if match:
        layer = chunk.decoder.layers[int(match.group(1))]
        local_name = f"decoder.layers.{layer.layer_number - 1}." + local_name[match.end():]
    if local_name == "output_layer.weight" and chunk.share_embeddings_and_output_weights:
        return "embedding.word_embeddings.weight"
    return local_name


def shard_like(param: torch.Tensor, full: torch.Tensor, *, name: str, tp_rank: int, tp_size: int) -> torch.Tensor:
    """The part of `full` that the local `param` (named `name` locally) holds on TP rank `tp_rank`."""
    if not getattr(param, "tensor_model_parallel", False) or tp_size == 1:
        if name.endswith(("word_embeddings.weight", "output_layer.weight")):
            return _pad_rows(full, param.shape[0])
        return full
    dim = param.partition_dim
    if name.endswith(("word_embeddings.weight", "output_layer.weight")):
        full = _pad_rows(full, param.shape[0] * tp_size)
    if name.endswith("linear_fc1.weight") or name.endswith("linear_fc1.bias"):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, dim=0)[tp_rank], up.chunk(tp_size, dim=0)[tp_rank]])
    return full.chunk(tp_size, dim=dim)[tp_rank]


def _pad_rows(tensor: torch.Tensor, num_rows: int) -> torch.Tensor:
    return torch.nn.functional.pad(tensor, (0, 0, 0, num_rows - tensor.shape[0]))


@torch.no_grad()
def load_full_state_dict(chunks: list[PolicyGPTModel], full: dict[str, torch.Tensor]) -> None:
    """Copy this rank's shards of the full state dict into `chunks` (bare, not DDP-wrapped).

    Every parameter must be found; extra entries in `full` are ignored.
    """
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            key = _find(full, global_name(chunk, name))
            if key is None:
                raise KeyError(f"{global_name(chunk, name)} (local {name}) is missing from the state dict")
            param.copy_(shard_like(param, full[key], name=name, tp_rank=tp_rank, tp_size=tp_size))


def _find(full: dict[str, torch.Tensor], key: str) -> str | None:
    """`key`, or its other layer-norm spelling (local spec <-> Transformer Engine), if in `full`."""
    if key in full:
        return key
    match = _LAYER.match(key)
    if match and key[match.end():] in _NORM_ALIASES:
        alias = match.group(0) + _NORM_ALIASES[key[match.end():]]
        return alias if alias in full else None
    return None


__all__ = ["global_name", "load_full_state_dict", "shard_like"]
