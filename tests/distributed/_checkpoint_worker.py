"""Worker processes for tests/distributed/test_checkpoint_layouts.py (spawned with torch.multiprocessing).

`prepare` (in the pytest process) builds each tiny family model, converts it
to a megatron checkpoint and stores the transformers logits of a fixed token
batch plus the HF tensors. `run_layouts` brings up one gloo group and, for
every family, runs several layouts one after another (megatron's parallel
state is re-initialised in place): load the converted checkpoint, compare the
logits, stream the model back as HF-named tensors (`iter_hf_tensors`,
all_stages=True) and compare them bit for bit. At TP=2 it also saves a
training checkpoint (model only), which the PP=2 layout loads again.
Each rank writes `<root>/<family>.<layout>.rank<r>.json`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests._checkpoint_models import FAMILIES, load_hf_tensors, save_family_model  # noqa: E402

# name: (tensor_parallel, pipeline_parallel, virtual_pipeline)
LAYOUTS = {"tp1": (1, 1, 1), "tp2": (2, 1, 1), "pp2": (1, 2, 1), "pp2_vpp2": (1, 2, 2)}


def prepare(root: Path) -> None:
    from megatron_gppo.checkpoint.convert import convert_hf_to_megatron
    from megatron_gppo.checkpoint.verify import reference_logits, sample_tokens

    for family in FAMILIES:
        hf = save_family_model(family, root / family / "hf")
        convert_hf_to_megatron(hf, root / family / "meg", progress=False)
        config = json.loads((hf / "config.json").read_text())
        tokens = sample_tokens(vocab_size=config["vocab_size"], batch_size=2, seq_len=24, seed=1)
        torch.save({"tokens": tokens, "logits": reference_logits(hf, tokens, dtype="float32"),
                    "hf": load_hf_tensors(hf)}, root / family / "reference.pt")


def _check_layout(root: Path, family: str, layout: str, *, rank: int, world_size: int, port: int,
                  load_from: Path) -> dict:
    from megatron.core import dist_checkpointing, parallel_state

    from megatron_gppo.checkpoint.live import iter_hf_tensors, load_megatron_weights, model_sharded_state_dict
    from megatron_gppo.checkpoint.training import load_training_checkpoint, save_training_checkpoint
    from megatron_gppo.checkpoint.verify import compare, megatron_logits
    from megatron_gppo.config import ModelConfig, ParallelConfig
    from megatron_gppo.model.arch import ModelArch
    from megatron_gppo.model.parallel import init_distributed
    from megatron_gppo.model.provider import build_model_chunks

    base = root / family
    reference = torch.load(base / "reference.pt")
    arch = ModelArch.from_hf_config(base / "hf")
    tp, pp, vpp = LAYOUTS[layout]
    environ = {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    dims = init_distributed(ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, virtual_pipeline=vpp),
                            arch=arch, seed=1234, environ=environ)
    chunks = build_model_chunks(arch, dims, model=ModelConfig(dtype="float32"))
    result: dict = {}
    if load_from.name == "meg":
        load_megatron_weights(chunks, load_from)
    else:
        load_training_checkpoint(load_from, model=chunks)
    logits = megatron_logits(chunks, reference["tokens"], vocab_size=arch.vocab_size)
    if logits is not None:
        result.update(compare(reference["logits"], logits))

    streamed = dict(iter_hf_tensors(chunks, arch=arch, all_stages=True))
    expected = reference["hf"]
    result["stream_names_match"] = sorted(streamed) == sorted(expected)
    result["stream_bit_exact"] = result["stream_names_match"] and all(
        torch.equal(streamed[n], expected[n]) and streamed[n].dtype == expected[n].dtype for n in expected)

    if layout == "tp1":
        # A plain megatron load (no filtering of keys) finds everything the converter wrote.
        dist_checkpointing.load(model_sharded_state_dict(chunks), str(load_from))
        result["plain_load"] = True
    if layout == "tp2":
        save_training_checkpoint(base / "run_tp2", step=3, model=chunks, hf_dir=base / "hf",
                                 extra={"sampler": {"epoch": 1, "index": 7}})
    result["pp_rank"] = parallel_state.get_pipeline_model_parallel_rank()
    return result


def run_layouts(rank: int, world_size: int, port: int, root: str, plan: list[tuple[str, str, str]]) -> None:
    """`plan`: (family, layout, load_from) where load_from is "meg" or "run_tp2" (the latest training checkpoint)."""
    from megatron_gppo.checkpoint.training import find_latest
    from megatron_gppo.model.parallel import destroy_distributed

    root_path = Path(root)
    try:
        for family, layout, source in plan:
            load_from = root_path / family / "meg" if source == "meg" else find_latest(root_path / family / source)
            result = _check_layout(root_path, family, layout, rank=rank, world_size=world_size, port=port,
                                   load_from=load_from)
            name = f"{family}.{layout}" + ("" if source == "meg" else f".from_{source}")
            (root_path / f"{name}.rank{rank}.json").write_text(json.dumps(result))
    finally:
        destroy_distributed()


__all__ = ["FAMILIES", "LAYOUTS", "prepare", "run_layouts"]
