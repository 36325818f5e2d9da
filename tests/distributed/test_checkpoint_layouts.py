"""Converted checkpoints at TP=1, TP=2, PP=2 (and PP=2 x VPP=2) reproduce transformers' logits.

For every tiny family (Qwen2 with qkv bias and untied embeddings, Qwen2 tied,
Llama with GQA and a vocab that TP=2 pads, Qwen3 with q/k norm): the
megatron model loaded from the converted checkpoint gives the HF logits
within ATOL (fp32), streaming it back as HF-named tensors (the weight-sync
API) gives every HF tensor bit for bit, and a training checkpoint saved at
TP=2 loads at PP=2 with the same logits and converts back to the original HF
tensors. Two process groups: TP=1 (1 process) and one 2-process group for
the other layouts; plus tools/verify_conversion.py once at TP=2.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from megatron_gppo.ports import free_port

import _checkpoint_worker as worker

pytestmark = pytest.mark.distributed

ATOL = 1e-4
FAMILIES = worker.FAMILIES
# PP=2 loads every family from its TP=2 training checkpoint (resharding), and one family from the converted one.
TWO_PROCESS_PLAN = [(f, "tp2", "meg") for f in FAMILIES] + [(f, "pp2", "run_tp2") for f in FAMILIES] \
    + [("qwen3_qknorm", "pp2", "meg"), ("qwen2_untied", "pp2_vpp2", "meg")]
CASES = [(f, "tp1", "meg") for f in FAMILIES] + TWO_PROCESS_PLAN


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoint_layouts")
    worker.prepare(root)
    mp.spawn(worker.run_layouts, args=(1, free_port(), str(root), [(f, "tp1", "meg") for f in FAMILIES]),
             nprocs=1, join=True)
    mp.spawn(worker.run_layouts, args=(2, free_port(), str(root), TWO_PROCESS_PLAN), nprocs=2, join=True)
    results = {}
    for family, layout, source in CASES:
        name = f"{family}.{layout}" + ("" if source == "meg" else f".from_{source}")
        results[name] = [json.loads(p.read_text()) for p in sorted(root.glob(f"{name}.rank*.json"))]
    print("\nmax |megatron - transformers| logit difference:")
    for name, ranks in results.items():
        diffs = [r["max_abs_logit_diff"] for r in ranks if "max_abs_logit_diff" in r]
        print(f"  {name:38s} {max(diffs):.2e}")
    return root, results


@pytest.mark.parametrize("case", [".".join(c[:2]) + ("" if c[2] == "meg" else f".from_{c[2]}") for c in CASES])
def test_logits_match_and_stream_is_bit_exact(layouts, case):
    _, results = layouts
    ranks = results[case]
    assert len(ranks) == (1 if ".tp1" in case else 2)
    reporting = [r for r in ranks if "max_abs_logit_diff" in r]
    assert reporting, "no rank reported logits"
    for r in reporting:
        assert r["max_abs_logit_diff"] <= ATOL, r
        assert r["top1_agreement"] == 1.0, r
    for r in ranks:
        assert r["stream_names_match"] and r["stream_bit_exact"], r
    if ".tp1" in case:
        assert ranks[0]["plain_load"]


@pytest.mark.parametrize("family", FAMILIES)
def test_tp2_training_checkpoint_converts_back_to_the_original(layouts, family, tmp_path):
    from megatron_gppo.checkpoint.convert import convert_megatron_to_hf
    from megatron_gppo.checkpoint.training import find_latest
    from tests._checkpoint_models import load_hf_tensors

    root, _ = layouts
    run = root / family / "run_tp2"
    latest = find_latest(run)
    assert latest.name == "step_00000003"
    state = json.loads((latest / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["extra"] == {"sampler": {"epoch": 1, "index": 7}}
    convert_megatron_to_hf(latest, tmp_path / "hf", progress=False)
    original, back = load_hf_tensors(root / family / "hf"), load_hf_tensors(tmp_path / "hf")
    assert sorted(original) == sorted(back)
    assert all(torch.equal(original[n], back[n]) for n in original)


def test_verify_tool_at_tp2(layouts):
    root, _ = layouts
    tool = Path(__file__).resolve().parents[2] / "tools" / "verify_conversion.py"
    result = subprocess.run([sys.executable, str(tool), "--hf-dir", str(root / "llama_gqa" / "hf"),
                             "--megatron-dir", str(root / "llama_gqa" / "meg"), "--tp", "2"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert line["ok"] and line["tp"] == 2 and line["max_abs_logit_diff"] <= ATOL and line["top1_agreement"] == 1.0
