"""Check a megatron checkpoint against its HF model: same tokens, compare logits, at a given layout.

`reference_logits` runs transformers; `megatron_logits` runs this rank's model
chunks through megatron's pipeline schedule (forward only) and all-gathers the
vocab-parallel logits. `run_rank` is one process of the check (torchrun, or
spawned by `verify_conversion`), and the rank holding the full logits
(last pipeline stage, TP rank 0, DP rank 0) writes the comparison.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_gppo.ports import free_port

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True, kw_only=True)
class VerifyLayout:
    tp: int = 1
    pp: int = 1
    vpp: int = 1

    @property
    def world_size(self) -> int:
        return self.tp * self.pp


def sample_tokens(*, vocab_size: int, batch_size: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """`[batch, seq]` int64 token ids drawn uniformly from the vocabulary."""
    return torch.randint(0, vocab_size, (batch_size, seq_len), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def reference_logits(hf_dir: str | Path, tokens: torch.Tensor, *, dtype: str) -> torch.Tensor:
    """`[batch, seq, vocab]` fp32 logits of the HF model (eager attention, `dtype` weights)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=_DTYPES[dtype], attn_implementation="eager")
    return model.eval()(tokens).logits.float()


@torch.no_grad()
def megatron_logits(chunks: list[torch.nn.Module], tokens: torch.Tensor, *, vocab_size: int) -> torch.Tensor | None:
    """`[batch, seq, vocab]` fp32 logits on last-stage ranks (None on the others); one row per micro-batch."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rows = [row[None] for row in tokens]  # [1, s] micro-batches
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if len(chunks) > 1 and len(rows) % pp:
        # The interleaved schedule wants a multiple of PP micro-batches; the extra rows are dropped below.
        rows += [rows[-1]] * (pp - len(rows) % pp)

    def forward_step(data_iterator, model):
        ids = next(data_iterator)
        positions = torch.arange(ids.shape[1], device=ids.device)[None]
        hidden = model(ids, positions, None)  # [s, 1, h] on the last stage (PolicyGPTModel)

        def loss_func(output, non_loss_data=False):
            logits = (output.float() @ model.output_weight().float().t()).transpose(0, 1)  # [1, s, V/TP]
            if tp > 1:
                parts = [torch.empty_like(logits) for _ in range(tp)]
                torch.distributed.all_gather(parts, logits.contiguous(), group=tp_group)
                logits = torch.cat(parts, dim=-1)
            return torch.zeros((), device=output.device), {"logits": logits[..., :vocab_size]}

        return hidden, loss_func

    for chunk in chunks:
        chunk.eval()
    outputs = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=[iter(rows) for _ in chunks] if len(chunks) > 1 else iter(rows),
        model=chunks,
        num_microbatches=len(rows),
        seq_length=tokens.shape[1],
        micro_batch_size=1,
        forward_only=True,
    )
    if not parallel_state.is_pipeline_last_stage():
        return None
    return torch.cat([out["logits"] for out in outputs])[: len(tokens)]


def compare(reference: torch.Tensor, logits: torch.Tensor) -> dict:
    diff = (reference - logits).abs()
    return {
        "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
        "top1_agreement": float((reference.argmax(-1) == logits.argmax(-1)).float().mean()),
    }


def run_rank(
    rank: int,
    *,
    layout: VerifyLayout,
    megatron_dir: str,
    reference_path: str,
    result_path: str,
    dtype: str,
    port: int,
    environ: dict[str, str] | None = None,
) -> None:
    """One process of the check: build the model at `layout`, load, forward, compare on the reporting rank."""
    from megatron.core import parallel_state

    from megatron_gppo.checkpoint.live import load_megatron_weights
    from megatron_gppo.config import ModelConfig, ParallelConfig
    from megatron_gppo.model.arch import ModelArch
    from megatron_gppo.model.parallel import destroy_distributed, init_distributed
    from megatron_gppo.model.provider import build_model_chunks

    reference = torch.load(reference_path, weights_only=True)
    arch = ModelArch.from_hf_config(reference["config"])
    if environ is None:
        environ = {"RANK": str(rank), "WORLD_SIZE": str(layout.world_size), "LOCAL_RANK": str(rank),
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    parallel = ParallelConfig(tensor_parallel=layout.tp, pipeline_parallel=layout.pp, virtual_pipeline=layout.vpp)
    dims = init_distributed(parallel, arch=arch, seed=0, environ=environ)
    try:
        chunks = build_model_chunks(arch, dims, model=ModelConfig(dtype=dtype))
        load_megatron_weights(chunks, megatron_dir)
        logits = megatron_logits(chunks, reference["tokens"], vocab_size=arch.vocab_size)
        if logits is not None and parallel_state.get_tensor_model_parallel_rank() == 0 \
                and parallel_state.get_data_parallel_rank() == 0:
            result = {**compare(reference["logits"], logits), "tp": layout.tp, "pp": layout.pp, "vpp": layout.vpp}
            Path(result_path).write_text(json.dumps(result))
    finally:
        destroy_distributed()


def _spawned(rank: int, kwargs: dict) -> None:
    run_rank(rank, **kwargs)


def verify_conversion(
    hf_dir: str | Path,
    megatron_dir: str | Path,
    *,
    layout: VerifyLayout,
    dtype: str = "float32",
    batch_size: int = 2,
    seq_len: int = 32,
    seed: int = 0,
) -> dict:
    """Logit comparison of the HF model and the megatron checkpoint at `layout` (spawns TP x PP processes).

    Raises ValueError for bad input (missing directories, unsupported
    architecture, a layout that does not divide the model).
    """
    import torch.multiprocessing as mp

    from megatron_gppo.checkpoint.hf_io import read_config
    from megatron_gppo.model.arch import ModelArch
    from megatron_gppo.checkpoint import mapping_for_config
    from megatron_gppo.model.parallel import ParallelDims, validate_layout

    config = read_config(hf_dir)
    mapping_for_config(config)
    arch = ModelArch.from_hf_config(config)
    validate_layout(ParallelDims(tp=layout.tp, pp=layout.pp, vpp=layout.vpp, world_size=layout.world_size), arch)
    if not (Path(megatron_dir) / "metadata.json").is_file():
        raise ValueError(f"{megatron_dir} is not a megatron dist checkpoint (no metadata.json)")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; choose one of {', '.join(_DTYPES)}")
    seq_len = min(seq_len, arch.max_position_embeddings)
    tokens = sample_tokens(vocab_size=arch.vocab_size, batch_size=batch_size, seq_len=seq_len, seed=seed)
    with tempfile.TemporaryDirectory(prefix="verify-") as tmp:
        reference_path, result_path = os.path.join(tmp, "reference.pt"), os.path.join(tmp, "result.json")
        torch.save({"config": config, "tokens": tokens,
                    "logits": reference_logits(hf_dir, tokens, dtype=dtype)}, reference_path)
        kwargs = dict(layout=layout, megatron_dir=str(megatron_dir), reference_path=reference_path,
                      result_path=result_path, dtype=dtype, port=free_port())
        if layout.world_size == 1:
            run_rank(0, **kwargs, environ={})
        else:
            mp.spawn(_spawned, args=(kwargs,), nprocs=layout.world_size, join=True)
        return json.loads(Path(result_path).read_text())


__all__ = ["VerifyLayout", "compare", "megatron_logits", "reference_logits", "run_rank", "sample_tokens",
           "verify_conversion"]
