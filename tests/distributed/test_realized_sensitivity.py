"""`logging.realized_sensitivity_beta_step`: the what-if updates measure what a run with the larger beta does.

A beta1=0 step's what-if with beta1 + 0.5 (and beta2 + 0.5), rewound, must
predict exactly the entropy that a real step at beta1 = 0.5 (beta2 = 1.5)
ends with on the same batch, from the same weights; the real step itself must
be the step a run without the diagnostic takes.
"""

from __future__ import annotations

import json

import pytest
import torch.multiprocessing as mp

from megatron_gppo.ports import free_port

import _policy_worker as worker

pytestmark = pytest.mark.distributed


def test_what_if_updates_give_the_entropy_of_a_run_with_the_larger_beta(tmp_path):
    path = tmp_path / "metrics.json"
    mp.spawn(worker.run_realized_sensitivity, args=(free_port(), str(path)), nprocs=1, join=True)
    results = json.loads(path.read_text())
    base = results["base"]
    assert base["clip_frac_low"] > 0 and base["clip_frac_high"] > 0
    for beta in ("beta1", "beta2"):
        raised = results[beta]["realized_entropy_change"] - base["realized_entropy_change"]
        assert abs(raised) > 1e-6, f"raising {beta} changed nothing: the test cannot tell"
        assert 0.5 * base[f"realized_entropy_sensitivity_{beta}"] == pytest.approx(raised, rel=1e-6, abs=1e-10)
    # The what-ifs were rewound: the real step at the base betas is unchanged (the first update saw
    # the same weights as in the other runs, so their first-update metrics agree too).
    assert results["beta1"]["entropy"] == base["entropy"]
