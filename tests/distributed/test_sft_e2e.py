"""`megatron-gppo sft` end to end: the exported HF model is the same at TP=2 as at TP=1, and it learned."""

import subprocess
import sys

import pytest
import torch

from megatron_gppo.metrics import read_metrics
from tests._tiny_models import load_model, save_tiny_run

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return save_tiny_run(tmp_path_factory.mktemp("sft"))


def sft(assets, out, *overrides):
    command = [sys.executable, "-m", "megatron_gppo.cli", "sft", "examples/configs/demo_sft.yaml",
               f"model.hf_path={assets / 'hf'}", f"data.train_path={assets / 'train.jsonl'}",
               f"train.output_dir={out}", "train.max_steps=4", "train.prompts_per_step=16",
               "train.micro_batch_size=8", *overrides]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "hf"


def test_sft_export_matches_across_layouts_and_lowers_the_loss(assets, tmp_path):
    single = sft(assets, tmp_path / "tp1")
    split = sft(assets, tmp_path / "tp2", "parallel.tensor_parallel=2")
    losses = [r["sft_loss"] for r in read_metrics(tmp_path / "tp1" / "metrics.jsonl")]
    assert len(losses) == 4 and losses[-1] < losses[0]

    reference, trained, trained_tp2 = load_model(assets / "hf"), load_model(single), load_model(split)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    logits = trained(ids).logits
    assert (logits - reference(ids).logits).abs().max() > 1e-3  # the weights did move
    assert (logits - trained_tp2(ids).logits).abs().max() < 1e-4
    for (name, a), (_, b) in zip(trained.state_dict().items(), trained_tp2.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-5), name
