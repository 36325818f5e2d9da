"""TP / PP / VPP / DP / SP layouts of the Megatron policy reproduce TP=1 on real gloo groups.

Same seeded weights and batch everywhere (see _policy_worker.py). For each
layout: per-token log-probs and entropy, the RL loss (CE-GPPO with entropy
and NLL terms, exact global token mean), its metrics, the gradients, the
grad norm and the parameters after one AdamW step must match TP=1 within
TOLERANCE (fp32; reduction order differs between layouts). The TP=2 layout
also checks that the fused and unfused log-prob paths give the same loss and
gradients. After it, one more step whose gradient holds a NaN on one rank
only must change nothing on any rank (no partial update, no lr-schedule step).
In four layouts, a what-if step with other betas, rewound (`model.rewind`),
must leave the real steps that follow bit-identical.

The `*_packed` layouts run the same samples packed several to a row
(packing.py: long-tailed lengths, rows of the longest sample, balanced over
DP ranks) against the padded TP=1 reference: packing must change nothing
but float rounding.

Three process groups in all: the TP=1 reference (1 process), one 2-process
group running twelve layouts one after another, one 4-process group (TP2xPP2, padded and packed).
"""

from __future__ import annotations

import json

import pytest
import torch.multiprocessing as mp

from megatron_gppo.ports import free_port

import _policy_worker as worker

pytestmark = pytest.mark.distributed

TOLERANCE = 1e-5
GROUPS = (
    (2, ["tp2", "tp2_sp", "pp2", "pp2_vpp2", "pp2_uneven", "dp2", "dp2_distopt",
         "tp2_packed", "tp2_sp_packed", "pp2_packed", "pp2_vpp2_packed", "dp2_packed"]),
    (4, ["tp2_pp2", "tp2_pp2_packed"]),
)


@pytest.fixture(scope="module")
def layout_diffs(tmp_path_factory):
    out = tmp_path_factory.mktemp("policy_layouts")
    ref_path = str(out / "reference.pt")
    mp.spawn(worker.run_reference, args=(free_port(), ref_path), nprocs=1, join=True)
    for world_size, names in GROUPS:
        mp.spawn(worker.run_layouts, args=(world_size, free_port(), names, ref_path, str(out)),
                 nprocs=world_size, join=True)
    diffs = {}
    for world_size, names in GROUPS:
        for name in names:
            per_rank = [json.loads((out / f"{name}.rank{r}.json").read_text()) for r in range(world_size)]
            diffs[name] = {key: max(d[key] for d in per_rank if key in d) for key in per_rank[0]}
    print("\nmax |layout - TP1| per quantity:")
    for name, values in diffs.items():
        print(f"  {name:12s} " + "  ".join(f"{k}={v:.1e}" for k, v in values.items()))
    return diffs


@pytest.mark.parametrize("layout", [name for _, names in GROUPS for name in names])
def test_layout_matches_tp1(layout_diffs, layout):
    too_far = {k: v for k, v in layout_diffs[layout].items() if not v <= TOLERANCE and k not in REWIND_KEYS}
    assert not too_far, f"{layout}: differences above {TOLERANCE}: {too_far}"


REWIND_KEYS = ("what_if_moved_params", "rewound_steps_vs_real", "rewound_schedule_vs_real")


@pytest.mark.parametrize("layout", worker.REWIND_LAYOUTS)
def test_a_rewound_what_if_step_leaves_the_real_steps_bit_identical(layout_diffs, layout):
    diffs = layout_diffs[layout]
    assert diffs["what_if_moved_params"] > 1e-4, "the what-if step (other betas) must have changed the weights"
    assert diffs["rewound_steps_vs_real"] == 0.0 and diffs["rewound_schedule_vs_real"] == 0.0, diffs
