"""The Megatron policy on CUDA: bf16 log-probs, entropy and RL loss against fp32 on the same weights."""

import pytest
import torch
import torch.multiprocessing as mp

from megatron_gppo.ports import free_port
from tests.distributed import _policy_worker as worker

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# bf16 keeps 8 mantissa bits: log-probs of a 4-layer model move by a few hundredths.
BF16_TOLERANCE = 0.1


def test_bf16_policy_matches_fp32_on_cuda(tmp_path):
    results = {}
    for dtype in ("float32", "bfloat16"):
        path = tmp_path / f"{dtype}.pt"
        mp.spawn(worker.run_log_probs_and_loss, args=(free_port(), str(path), dtype), nprocs=1, join=True)
        results[dtype] = torch.load(path, weights_only=True)
    fp32, bf16 = results["float32"], results["bfloat16"]
    assert fp32["device"].startswith("cuda") and bf16["device"].startswith("cuda")
    mask = worker.full_batch().loss_mask
    for key in ("log_probs", "entropy"):
        diff = (bf16[key] - fp32[key]).abs()[mask].max().item()
        print(f"FIGURE {{\"figure\": \"policy_bf16_vs_fp32\", \"quantity\": \"{key}\", \"max_abs_diff\": {diff}}}")
        assert diff <= BF16_TOLERANCE, key
    assert abs(bf16["loss"] - fp32["loss"]) <= BF16_TOLERANCE * max(1.0, abs(fp32["loss"]))
