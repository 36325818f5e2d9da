"""Run megatron-core on a machine without CUDA, without touching torch itself.

megatron-core 0.16 assumes CUDA in a handful of places (see
docs/megatron-core-on-cpu.md): `torch.cuda.current_device()` in layer
construction and the pipeline schedules, `device="cuda"` factory calls,
`torch.cuda.synchronize` / streams / events, the CUDA RNG tracker,
`param.type() == 'torch.cuda.FloatTensor'` checks in the optimizer, and a
`.cuda()` on the duplicated tied output weight.

Patching `torch` globally was seen to corrupt Hugging Face models (wrong rotary
`inv_freq` after `from_pretrained`), so everything here is scoped:

- the global name `torch` inside each loaded `megatron.*` module is replaced by
  `_MegatronTorch`, a proxy that forwards everything to the real torch except
  `torch.cuda.*` device/stream/RNG calls and the `device=` of factory functions;
- megatron's own functions that cannot be reached through that name
  (RNG state get/set, grad clipping, the tied-embedding sync) are replaced in
  megatron's namespaces only;
- the `.type()` answer the optimizer checks is given per parameter, only while
  the optimizer is being built (`cuda_type_names`).

`enable_cpu_compat()` is idempotent and does nothing when CUDA is available.
Call it again after importing further megatron modules so they are covered too.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
import types
from typing import Any, Iterable, Iterator

import torch

# Megatron subpackages the project uses; imported up front so one call covers them.
_MEGATRON_MODULES = (
    "megatron.core.parallel_state",
    "megatron.core.tensor_parallel",
    "megatron.core.transformer",
    "megatron.core.models.gpt",
    "megatron.core.pipeline_parallel",
    "megatron.core.distributed",
    "megatron.core.optimizer",
    "megatron.core.optimizer_param_scheduler",
    "megatron.core.dist_checkpointing",
    "megatron.core.rerun_state_machine",
)

_FACTORIES = (
    "tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn",
    "randint", "randperm", "eye", "linspace", "empty_strided", "zeros_like", "ones_like",
    "empty_like", "full_like", "rand_like", "randn_like",
)

_CPU = torch.device("cpu")


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


def _on_cpu(factory):
    def call(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = _CPU
        kwargs.pop("pin_memory", None)
        return factory(*args, **kwargs)

    call.__name__ = factory.__name__
    call.__doc__ = factory.__doc__
    return call


class _NullStream:
    """Stands in for torch.cuda.Stream; megatron instantiates and subclasses it."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None):
        return event or _NullEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _NullEvent:
    """Stands in for torch.cuda.Event."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other) -> float:
        return 0.0


class _NullNvtx:
    @staticmethod
    def range_push(msg) -> None:
        pass

    @staticmethod
    def range_pop() -> None:
        pass

    @staticmethod
    def range(msg, *args, **kwargs):
        return contextlib.nullcontext()


class _CudaOnCpu(types.ModuleType):
    """`torch.cuda` as megatron sees it on a CPU machine: the CPU is "the device"."""

    Stream = _NullStream
    Event = _NullEvent
    nvtx = _NullNvtx

    def __init__(self):
        super().__init__("torch.cuda")

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device() -> torch.device:
        return _CPU

    @staticmethod
    def synchronize(device=None) -> None:
        pass

    @staticmethod
    def current_stream(device=None) -> _NullStream:
        return _NullStream()

    default_stream = current_stream

    @staticmethod
    def stream(stream=None):
        return contextlib.nullcontext()

    @staticmethod
    def set_stream(stream) -> None:
        pass

    @staticmethod
    def empty_cache() -> None:
        pass

    @staticmethod
    def memory_allocated(device=None) -> int:
        return 0

    memory_reserved = max_memory_allocated = memory_allocated

    # The "CUDA" RNG of megatron's tracker is the CPU default generator.
    @staticmethod
    def get_rng_state(device=None) -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state, device=None) -> None:
        torch.set_rng_state(state)

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)


class _MegatronTorch(types.ModuleType):
    """The `torch` name inside megatron's modules: real torch, CPU "cuda"."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CudaOnCpu()
        for name in _FACTORIES:
            setattr(self, name, _on_cpu(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def _get_rng_state(device="cuda", clone=False, graph_safe=False) -> torch.Tensor:
    return torch.get_rng_state()


def _set_rng_state(new_state, device=-1, graph_safe=False) -> None:
    torch.set_rng_state(new_state)


def _clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """megatron's clip_grad_by_total_norm_fp32 minus its `grad.type()` CUDA assertion."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


class _SkipRngWarning(logging.Filter):
    # On CPU the tracker's "CUDA" generator is the CPU generator, so every
    # random op inside tracker.fork() trips this (harmless) warning.
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _patch_tied_embedding_sync() -> None:
    """megatron copies the tied embedding to the last stage with `weight.data.cuda()` + all-reduce."""
    from megatron.core.models.common.language_module.language_module import LanguageModule

    original = LanguageModule.setup_embeddings_and_output_layer
    if getattr(original, "_cpu_compat", False):
        return

    def setup_embeddings_and_output_layer(self) -> None:
        # Run megatron's version with the cross-stage sync switched off for this
        # instance, then do the same all-reduce on CPU tensors.
        self._is_in_embd_group = lambda: False
        try:
            original(self)
        finally:
            del self._is_in_embd_group
        shared = self.share_embeddings_and_output_weights or getattr(self.config, "mtp_num_layers", 0)
        if (shared and self.config.pipeline_model_parallel_size > 1
                and torch.distributed.is_initialized() and self._is_in_embd_group()):
            torch.distributed.all_reduce(self.shared_embedding_or_output_weight().data, group=self.embd_group)

    setup_embeddings_and_output_layer._cpu_compat = True
    LanguageModule.setup_embeddings_and_output_layer = setup_embeddings_and_output_layer


_PROXY: _MegatronTorch | None = None


def enable_cpu_compat() -> bool:
    """Make the loaded megatron modules run on CPU; returns whether it is active.

    Idempotent; a no-op (returning False) when CUDA is available.
    """
    global _PROXY
    if torch.cuda.is_available():
        return False
    for name in _MEGATRON_MODULES:
        importlib.import_module(name)
    if _PROXY is None:
        _PROXY = _MegatronTorch()
    for name, module in list(sys.modules.items()):
        if not name.startswith("megatron.") or module is None:
            continue
        namespace = vars(module)
        if namespace.get("torch") is torch:
            namespace["torch"] = _PROXY
        if namespace.get("_get_cuda_rng_state") is not None and name.endswith("tensor_parallel.random"):
            namespace["_get_cuda_rng_state"] = _get_rng_state
            namespace["_set_cuda_rng_state"] = _set_rng_state
        if "clip_grad_by_total_norm_fp32" in namespace:
            namespace["clip_grad_by_total_norm_fp32"] = _clip_grad_by_total_norm_fp32
    _patch_tied_embedding_sync()
    rng_logger = logging.getLogger("megatron.core.tensor_parallel.random")
    if not any(isinstance(f, _SkipRngWarning) for f in rng_logger.filters):
        rng_logger.addFilter(_SkipRngWarning())
    return True


def is_cpu_compat_enabled() -> bool:
    return _PROXY is not None


_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}


@contextlib.contextmanager
def cuda_type_names(params: Iterable[torch.nn.Parameter]) -> Iterator[None]:
    """While building a megatron optimizer on CPU, let `param.type()` answer the CUDA name.

    megatron's Float16 and distributed optimizers pick their code path with
    `param.type() == 'torch.cuda.FloatTensor'`. The override is an instance
    attribute on these parameters only and is removed on exit. No-op unless
    the CPU compatibility layer is active.
    """
    if not is_cpu_compat_enabled():
        yield
        return
    params = list(params)
    for param in params:
        name = _CUDA_TYPE_NAMES.get(param.dtype)
        if name is not None:
            param.type = _type_answering(param, name)
    try:
        yield
    finally:
        for param in params:
            vars(param).pop("type", None)


def _type_answering(param: torch.Tensor, name: str):
    def type_(dtype=None, non_blocking=False, **kwargs):
        if dtype is None:
            return name
        return torch.Tensor.type(param, dtype, non_blocking, **kwargs)

    return type_


__all__ = ["cuda_type_names", "enable_cpu_compat", "is_cpu_compat_enabled"]
