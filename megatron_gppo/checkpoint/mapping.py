"""Machinery shared by the per-family tables: Hugging Face <-> megatron tensor maps.

A family file (`qwen2.py`, `llama.py`, `qwen3.py`) is a `FamilyMapping`: an
explicit table of `TensorMap`s, each naming one megatron tensor, the HF
tensor(s) it is made of and how (`kind`):

- `copy`:    one HF tensor, same values;
- `qkv`:     q, k, v projections (weights `[out, hidden]` or biases `[out]`)
             fused per query group: for each of the `num_query_groups` groups,
             `[q rows (heads_per_group * head_dim); k rows (head_dim); v rows (head_dim)]`.
             Megatron splits this dim evenly over TP, so each rank holds whole groups;
- `gate_up`: `linear_fc1 = [gate; up]` along the output dim. Under TP each rank
             holds `[gate_r; up_r]`, not a contiguous slice of the full tensor;
- `vocab`:   the embedding / output layer, `[vocab, hidden]`. Megatron pads the
             rows to a multiple of TP; padded rows are dropped on the way out.
             Checkpoints written by the converter keep the true vocabulary and
             megatron zero-fills the padding on load (its embedding and output
             layer allow that shape mismatch).

Megatron names are "full": TP=1 / PP=1 with global layer numbers
(`decoder.layers.{i}.…`, i from 0), and canonical, i.e. the names megatron's
dist checkpoints use. The local (non-TE) layer spec names its two layer norms
`input_layernorm.weight` / `pre_mlp_layernorm.weight` and maps them to the TE
names when checkpointing (`sharded_state_dict_keys_map`); `LOCAL_SPEC_NAMES`
is that map.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Mapping

import torch

from megatron_gppo.model.arch import ModelArch

HF_LAYER = "model.layers.{}."
MEGATRON_LAYER = "decoder.layers.{}."
# Dist checkpoints stack layers along a leading axis under one key without the layer number.
CHECKPOINT_LAYER = "decoder.layers."

# Canonical (TE / checkpoint) name -> the local layer spec's parameter name, per layer.
LOCAL_SPEC_NAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
_CANONICAL_NAMES = {local: canonical for canonical, local in LOCAL_SPEC_NAMES.items()}

# Per-layer modules whose (empty) `_extra_state` megatron's local spec checkpoints as an object.
EXTRA_STATE_MODULES = (
    "self_attention.linear_proj",
    "self_attention.linear_qkv",
    "mlp.linear_fc1",
    "mlp.linear_fc2",
)


@dataclass(frozen=True)
class TensorMap:
    """One megatron tensor and the HF tensors it is made of (layer-relative names in layer tables)."""

    megatron: str
    hf: tuple[str, ...]
    kind: str = "copy"
    """copy, qkv, gate_up or vocab (see the module docstring)."""

    requires: str = ""
    """Present only when the architecture has it: "" (always), "qkv_bias" or "untied" (lm_head)."""


@dataclass(frozen=True)
class BoundMap:
    """A `TensorMap` with concrete names for one layer (or none, for embedding / final norm / head)."""

    megatron: str
    """Full megatron name, e.g. decoder.layers.3.self_attention.linear_qkv.weight."""

    hf: tuple[str, ...]
    kind: str
    layer: int | None
    checkpoint_key: str
    """The dist-checkpoint key: layers share one key, stacked along a leading [num_layers] axis."""


@dataclass(frozen=True, kw_only=True)
class FamilyMapping:
    """The complete HF <-> megatron table of one model family."""

    architecture: str
    """The exact Hugging Face `architectures[0]` string."""

    family: str
    """ModelArch.family."""

    model: tuple[TensorMap, ...]
    """Embedding, final norm, output layer."""

    layer: tuple[TensorMap, ...]
    """Per decoder layer, names relative to model.layers.{i}. / decoder.layers.{i}."""

    def bound_maps(self, arch: ModelArch) -> list[BoundMap]:
        """Every tensor of `arch` in order: embedding, layers 0..L-1, final norm, output layer."""
        if arch.family != self.family:
            raise ValueError(f"{self.architecture} mapping used for a {arch.family} model")
        present = [m for m in self.model if _required(m, arch)]
        maps = [_bind(m, None) for m in present if m.megatron.startswith("embedding.")]
        for i in range(arch.num_layers):
            maps += [_bind(m, i) for m in self.layer if _required(m, arch)]
        maps += [_bind(m, None) for m in present if not m.megatron.startswith("embedding.")]
        return maps

    def by_megatron_name(self, arch: ModelArch) -> dict[str, BoundMap]:
        return {m.megatron: m for m in self.bound_maps(arch)}

    def hf_names(self, arch: ModelArch) -> list[str]:
        return [name for m in self.bound_maps(arch) for name in m.hf]


def _required(entry: TensorMap, arch: ModelArch) -> bool:
    if entry.requires == "qkv_bias":
        return arch.qkv_bias
    if entry.requires == "untied":
        return not arch.tie_word_embeddings
    assert not entry.requires, entry.requires
    return True


def _bind(entry: TensorMap, layer: int | None) -> BoundMap:
    if layer is None:
        return BoundMap(entry.megatron, entry.hf, entry.kind, None, entry.megatron)
    return BoundMap(
        megatron=MEGATRON_LAYER.format(layer) + entry.megatron,
        hf=tuple(HF_LAYER.format(layer) + name for name in entry.hf),
        kind=entry.kind,
        layer=layer,
        checkpoint_key=CHECKPOINT_LAYER + entry.megatron,
    )


# ----------------------------------------------------------------------------
# Per-tensor fuse (HF -> megatron) and split (megatron -> HF)
# ----------------------------------------------------------------------------


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, arch: ModelArch) -> torch.Tensor:
    """HF q `[heads*d, ...]`, k, v `[groups*d, ...]` -> megatron `[groups*(heads/groups + 2)*d, ...]`."""
    groups = arch.num_query_groups
    q, k, v = (t.reshape(groups, -1, *t.shape[1:]) for t in (q, k, v))
    return torch.cat([q, k, v], dim=1).reshape(-1, *q.shape[2:])


def split_qkv(qkv: torch.Tensor, *, arch: ModelArch) -> list[torch.Tensor]:
    """Inverse of `fuse_qkv`: [q, k, v] (fresh tensors, not views of `qkv`)."""
    groups, head_dim = arch.num_query_groups, arch.head_dim
    q_rows = arch.num_attention_heads // groups * head_dim
    grouped = qkv.reshape(groups, q_rows + 2 * head_dim, *qkv.shape[1:])
    return [t.reshape(-1, *qkv.shape[1:]).clone() for t in grouped.split([q_rows, head_dim, head_dim], dim=1)]


def fuse(kind: str, tensors: list[torch.Tensor], *, arch: ModelArch) -> torch.Tensor:
    """The megatron tensor of `kind` from its HF tensors."""
    if kind == "qkv":
        return fuse_qkv(*tensors, arch=arch)
    if kind == "gate_up":
        return torch.cat(tensors)
    assert kind in ("copy", "vocab") and len(tensors) == 1, kind
    return tensors[0]


def split(kind: str, tensor: torch.Tensor, *, arch: ModelArch) -> list[torch.Tensor]:
    """The HF tensors of `kind` from a full megatron tensor (vocab rows beyond arch.vocab_size dropped)."""
    if kind == "qkv":
        return split_qkv(tensor, arch=arch)
    if kind == "gate_up":
        return [t.clone() for t in tensor.chunk(2)]
    if kind == "vocab":
        return [tensor[: arch.vocab_size]]
    assert kind == "copy", kind
    return [tensor]


def gather_tp_shards(kind: str, shards: list[torch.Tensor], *, dim: int) -> torch.Tensor:
    """The full tensor from its TP shards (rank order); `gate_up` shards are `[gate_r; up_r]`."""
    if kind == "gate_up":
        halves = [shard.chunk(2) for shard in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    return torch.cat(shards, dim=dim)


# ----------------------------------------------------------------------------
# Whole state dicts (small models, tests, the policy's full-state-dict load)
# ----------------------------------------------------------------------------


def canonical_name(name: str) -> str:
    """The checkpoint name of a full megatron name given in either the local-spec or the TE spelling."""
    if name.startswith("decoder.layers."):
        index, _, rest = name[len("decoder.layers."):].partition(".")
        return f"decoder.layers.{index}." + _CANONICAL_NAMES.get(rest, rest)
    return name


def local_spec_name(name: str) -> str:
    """The local layer spec's parameter name for a canonical full megatron name."""
    if name.startswith("decoder.layers."):
        index, _, rest = name[len("decoder.layers."):].partition(".")
        return f"decoder.layers.{index}." + LOCAL_SPEC_NAMES.get(rest, rest)
    return name


def hf_to_megatron(
    mapping: FamilyMapping, hf: Mapping[str, torch.Tensor], *, arch: ModelArch, te_names: bool = True
) -> dict[str, torch.Tensor]:
    """Full megatron state dict from a HF one (unpadded vocab; `te_names=False`: local-spec norm names)."""
    out = {}
    for m in mapping.bound_maps(arch):
        missing = [name for name in m.hf if name not in hf]
        if missing:
            raise ValueError(f"{mapping.architecture} checkpoint is missing tensor {missing[0]}")
        name = m.megatron if te_names else local_spec_name(m.megatron)
        out[name] = fuse(m.kind, [hf[n] for n in m.hf], arch=arch)
    return out


def megatron_to_hf(
    mapping: FamilyMapping, full: Mapping[str, torch.Tensor], *, arch: ModelArch
) -> dict[str, torch.Tensor]:
    """HF state dict from a full megatron one (either norm spelling; padded vocab rows dropped)."""
    canonical = {canonical_name(name): tensor for name, tensor in full.items()}
    out = {}
    for m in mapping.bound_maps(arch):
        if m.megatron not in canonical:
            raise ValueError(f"megatron state dict is missing tensor {m.megatron}")
        out.update(zip(m.hf, split(m.kind, canonical[m.megatron], arch=arch)))
    return out


def iter_layer_groups(maps: list[BoundMap]) -> Iterator[tuple[int | None, list[BoundMap]]]:
    """Consecutive runs of `maps` that belong to the same layer (None: outside the layers)."""
    group: list[BoundMap] = []
    for m in maps:
        if group and group[-1].layer != m.layer:
            yield group[-1].layer, group
            group = []
        group.append(m)
    if group:
        yield group[-1].layer, group


__all__ = [
    "BoundMap", "CHECKPOINT_LAYER", "EXTRA_STATE_MODULES", "FamilyMapping", "LOCAL_SPEC_NAMES", "TensorMap",
    "canonical_name", "fuse", "fuse_qkv", "gather_tp_shards", "hf_to_megatron", "iter_layer_groups",
    "local_spec_name", "megatron_to_hf", "split", "split_qkv",
]
