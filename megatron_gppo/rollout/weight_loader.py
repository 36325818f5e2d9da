"""Server side of weight updates: receive or read Hugging Face-named tensors, load them into the model."""

from __future__ import annotations

import base64
import io
import pickle
from pathlib import Path
from typing import Any, Iterable

import torch

from megatron_gppo.rollout.process_group import dtype_from_name

# Checkpoint entries that are not parameters of a transformers model (SGLang skips them too).
_SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)


class UpdateJournal:
    """The weights an unfinished update has overwritten, so that a failure can put them all back.

    An update may span several requests (the trainer sends buckets, the last
    one with the new weight version). The first time the update writes a
    parameter, its previous storage is kept here; `commit` forgets them when
    the update is complete, `rollback` restores them when a later part fails.
    At most one copy of the model is held.
    """

    def __init__(self) -> None:
        self._previous: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(self, target: torch.Tensor, *, replaced: bool) -> None:
        """Remember `target`'s values before its first write (`replaced`: its storage will be swapped, not written)."""
        if id(target) not in self._previous:
            self._previous[id(target)] = (target, target.data if replaced else target.detach().clone())

    @property
    def num_kept(self) -> int:
        return len(self._previous)

    def commit(self) -> None:
        self._previous.clear()

    def rollback(self) -> int:
        """Restore every kept tensor; returns how many."""
        for target, previous in self._previous.values():
            target.data = previous
        count = len(self._previous)
        self._previous.clear()
        return count


def load_named_tensors(model: torch.nn.Module, named_tensors: Iterable[tuple[str, torch.Tensor]], *,
                       adopt: bool = False, journal: UpdateJournal | None = None) -> int:
    """Put tensors into the model's parameters/buffers by name, casting dtype; returns how many.

    Every name, shape and value is checked before anything is written, so a
    bad update leaves the model unchanged. Tied weights share one Parameter,
    so updating either name updates both. With `adopt`, a tensor that already
    has the parameter's dtype, device and layout becomes its storage instead
    of being copied (the caller must not touch it afterwards). With a
    `journal`, the previous values are kept there for a rollback.
    """
    targets = dict(model.named_parameters(remove_duplicate=False))
    targets.update(dict(model.named_buffers(remove_duplicate=False)))
    pending = []
    for name, tensor in named_tensors:
        if name.endswith(_SKIPPED_SUFFIXES):
            continue
        target = targets.get(name)
        if target is None:
            raise ValueError(f"the model has no parameter named {name!r}")
        if tuple(target.shape) != tuple(tensor.shape):
            raise ValueError(f"{name}: shape {tuple(tensor.shape)} does not match the model's {tuple(target.shape)}")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{name}: holds NaN or infinite values")
        pending.append((target, tensor))
    with torch.no_grad():
        for target, tensor in pending:
            replace = adopt and tensor.dtype == target.dtype and tensor.device == target.device and \
                tensor.is_contiguous()
            if journal is not None:
                journal.keep(target, replaced=replace)
            if replace:
                target.data = tensor
            else:
                target.copy_(tensor)
    return len(pending)


def read_safetensors_dir(path: str | Path) -> list[tuple[str, torch.Tensor]]:
    """All tensors of the `*.safetensors` files in a Hugging Face model directory.

    Every file is read in full before anything is returned; a shard that is
    truncated or not safetensors, or a link that leads out of the directory,
    is a ValueError naming the file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"model_path {str(path)!r} is not a directory")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in {path}")
    root = path.resolve()
    named: list[tuple[str, torch.Tensor]] = []
    for file in files:
        if not file.resolve().is_relative_to(root):
            raise ValueError(f"{file} leads out of {path} (to {file.resolve()}); refusing to read it")
        try:
            named.extend(load_file(str(file)).items())
        except SafetensorError as err:
            raise ValueError(f"{file} is not a complete safetensors file ({err})") from None
    return named


def receive_bucket(*, names: list[str], dtypes: list[str], shapes: list[list[int]], group: Any
                   ) -> list[tuple[str, torch.Tensor]]:
    """Receive one bucket broadcast by the trainer (rank 0), tensor by tensor in the given order."""
    from megatron_gppo.rollout.process_group import broadcast_from_trainer

    if not (len(names) == len(dtypes) == len(shapes)):
        raise ValueError(f"names, dtypes and shapes differ in length: {len(names)}, {len(dtypes)}, {len(shapes)}")
    tensors = [torch.empty([int(d) for d in shape], dtype=dtype_from_name(dtype))
               for dtype, shape in zip(dtypes, shapes)]
    broadcast_from_trainer(tensors, group=group)
    return list(zip(names, tensors))


class _TensorUnpickler(pickle.Unpickler):
    """Only torch's tensor/storage rebuild functions: the payload arrives over HTTP."""

    _ALLOWED_BUILTINS = {"tuple", "list", "dict", "int", "float", "str", "bool", "slice", "getattr"}

    def find_class(self, module: str, name: str) -> Any:
        if module == "builtins" and name in self._ALLOWED_BUILTINS:
            return super().find_class(module, name)
        if (module, name) == ("torch.multiprocessing.reductions", "rebuild_cuda_tensor"):
            return _rebuild_cuda_tensor
        if module == "torch" or module.startswith("torch.") or module == "collections":
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} from a weight payload")


def _rebuild_cuda_tensor(*args: Any) -> torch.Tensor:
    """torch's `rebuild_cuda_tensor`, for a sender that names the GPU by UUID (as SGLang's senders do)."""
    from torch.multiprocessing import reductions

    device = args[6]
    if isinstance(device, str):
        matches = [i for i in range(torch.cuda.device_count())
                   if str(torch.cuda.get_device_properties(i).uuid) == device]
        if not matches:
            raise ValueError(f"the weight payload's GPU {device} is not visible to this server")
        args = (*args[:6], matches[0], *args[7:])
    return reductions.rebuild_cuda_tensor(*args)


def deserialize_named_tensors(payload: str | bytes) -> list[tuple[str, torch.Tensor]]:
    """One entry of SGLang's `serialized_named_tensors`: base64 of a ForkingPickler dump of [(name, tensor)].

    CUDA tensors arrive as IPC handles naming their GPU by UUID, CPU tensors
    as shared-memory files (the sender must be on the same host and keep them
    alive until the answer); they are copied to the CPU here.
    """
    import torch.multiprocessing  # noqa: F401  registers torch's rebuild functions

    data = base64.b64decode(payload, validate=True) if isinstance(payload, str) else payload
    named = _TensorUnpickler(io.BytesIO(data)).load()
    if not isinstance(named, list) or not all(isinstance(item, (tuple, list)) and len(item) == 2 for item in named):
        raise ValueError("serialized_named_tensors must hold a list of (name, tensor) pairs")
    return [(str(name), tensor.detach().to("cpu", copy=True)) for name, tensor in named]


__all__ = ["UpdateJournal", "deserialize_named_tensors", "load_named_tensors", "read_safetensors_dir", "receive_bucket"]
