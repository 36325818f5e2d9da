"""estimate_memory against the measured peak memory of real CPU training steps.

Two CE-GPPO steps of a 39M-parameter fp32 policy (see _memory_worker.py) on
one process (TP=1) and, meanwhile, on two gloo processes (TP=2, then PP=2
with two micro-batches). Memory is the peak RSS above the RSS before the
model was built (megatron_gppo.model.peak_memory). For every rank:

- the estimated total is within TOLERANCE of the measured peak;
- its parts are too: weights + gradients + optimizer state against what is
  still resident after the steps, activations + log-prob workspace against
  the peak above that (so a right total cannot hide two opposite errors);
- the estimated parameter count equals the built model's, exactly;
- PP=2's first stage holds both micro-batches, and counting one would miss.
"""

from __future__ import annotations

import json

import pytest
import torch.multiprocessing as mp

from megatron_gppo.ports import free_port

import _memory_worker as worker

pytestmark = pytest.mark.distributed

TOLERANCE = 0.25
GROUPS = ((1, ["tp1"]), (2, ["tp2", "pp2"]))
MiB = 2**20


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("memory")
    # The groups run at the same time (each process measures only itself): the one-process
    # group would leave a core idle otherwise.
    contexts = [mp.spawn(worker.run_layouts, args=(world_size, free_port(), names, str(out)),
                         nprocs=world_size, join=False)
                for world_size, names in GROUPS]
    for context in contexts:
        while not context.join():
            pass
    results = {}
    print("\nmeasured vs estimated MiB (static = weights + grads + optimizer; dynamic = the rest):")
    for world_size, names in GROUPS:
        for name in names:
            for rank in range(world_size):
                result = json.loads((out / f"{name}.rank{rank}.json").read_text())
                results[f"{name}.rank{rank}"] = result
                est = result["estimate"]
                print(f"  {name}.rank{rank}: peak {result['peak'] / MiB:.0f} vs {est['total'] / MiB:.0f}"
                      f" | static {result['static'] / MiB:.0f} vs {_static(est) / MiB:.0f}"
                      f" | dynamic {(result['peak'] - result['static']) / MiB:.0f} vs {_dynamic(est) / MiB:.0f}"
                      f" (activations {est['activations'] / MiB:.0f}, log-prob {est['logprob_workspace'] / MiB:.0f})")
    return results


def _static(estimate: dict) -> int:
    return estimate["weights"] + estimate["gradients"] + estimate["optimizer"]


def _dynamic(estimate: dict) -> int:
    return estimate["activations"] + estimate["logprob_workspace"]


def _relative_error(estimate: float, measured: float) -> float:
    return abs(estimate - measured) / measured


RUNS = [f"{name}.rank{rank}" for world_size, names in GROUPS for name in names for rank in range(world_size)]


@pytest.mark.parametrize("run", RUNS)
def test_total_matches_measured_peak(runs, run):
    result = runs[run]
    error = _relative_error(result["estimate"]["total"], result["peak"])
    assert error <= TOLERANCE, f"{run}: estimate {result['estimate']['total']}, measured peak {result['peak']}"


@pytest.mark.parametrize("run", RUNS)
def test_static_and_dynamic_parts_match(runs, run):
    result = runs[run]
    estimate = result["estimate"]
    assert all(estimate[key] > 0 for key in ("weights", "gradients", "optimizer", "activations")), estimate
    static_error = _relative_error(_static(estimate), result["static"])
    dynamic_error = _relative_error(_dynamic(estimate), result["peak"] - result["static"])
    assert static_error <= TOLERANCE and dynamic_error <= TOLERANCE, (
        f"{run}: static {_static(estimate)} vs {result['static']}, dynamic {_dynamic(estimate)} vs"
        f" {result['peak'] - result['static']}")


@pytest.mark.parametrize("run", RUNS)
def test_parameter_count_is_exact(runs, run):
    assert runs[run]["estimate"]["num_params"] == runs[run]["num_params"]


def test_pipeline_first_stage_holds_both_micro_batches(runs):
    """1F1B, PP=2, two micro-batches: rank 0 keeps both in flight, and one would be measurably wrong."""
    from megatron_gppo.model.arch import ModelArch
    from megatron_gppo.model.memory import estimate_memory
    from megatron_gppo.model.parallel import ParallelDims

    first = runs["pp2.rank0"]
    assert first["estimate"]["num_microbatches_in_flight"] == 2
    assert runs["pp2.rank1"]["estimate"]["num_microbatches_in_flight"] == 1
    one_in_flight = estimate_memory(
        arch=ModelArch.from_hf_config(worker.MODEL), dims=ParallelDims(pp=2, world_size=2),
        micro_batch_size=worker.MICRO_BATCH_SIZE, seq_length=worker.SEQ_LEN, dtype="float32",
        num_microbatches=1, device="cpu", pipeline_rank=0)
    assert _relative_error(_dynamic(one_in_flight.to_dict()), first["peak"] - first["static"]) > TOLERANCE
