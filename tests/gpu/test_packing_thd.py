"""Packed rows on Transformer Engine: THD sequences (`PackedSeqParams`) against TE's padded causal path.

The CPU tests (tests/distributed/test_policy_layouts.py) check packing with
megatron's local attention and a block-diagonal mask; on a GPU with
Transformer Engine the same rows run as one THD sequence per micro-batch
with `cu_seqlens`, which only flash / fused attention in bf16 supports.
"""

import json

import pytest
import torch
import torch.multiprocessing as mp

from megatron_gppo.model.provider import has_transformer_engine
from megatron_gppo.ports import free_port
from tests.distributed import _policy_worker as worker

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not (torch.cuda.is_available() and has_transformer_engine()),
                                 reason="THD packing needs a CUDA device and Transformer Engine")]

# bf16 logits differ by a few units of its 8-bit mantissa between two attention kernels.
BF16_LOG_PROB_TOLERANCE = 0.1


def test_thd_packed_rows_match_padded_rows(tmp_path):
    path = tmp_path / "packed_vs_padded.json"
    mp.spawn(worker.run_packed_vs_padded, args=(free_port(), str(path), "bfloat16"), nprocs=1, join=True)
    result = json.loads(path.read_text())
    assert result["packed_thd"] and result["num_packed_rows"] < len(worker.PROMPT_LENS)
    assert result["log_probs"] <= BF16_LOG_PROB_TOLERANCE and result["entropy"] <= BF16_LOG_PROB_TOLERANCE, result
    assert abs(result["loss_packed"] - result["loss_padded"]) <= 1e-2 * max(1.0, abs(result["loss_padded"])), result
