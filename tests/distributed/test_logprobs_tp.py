"""Fused log-probs + entropy (and the softmax moments) with TP=2 (two gloo processes) against TP=1 naive."""

import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_gppo.model.logprobs import vocab_parallel_log_probs, vocab_parallel_softmax_moments
from megatron_gppo.ports import free_port

pytestmark = pytest.mark.distributed

TP = 2
NUM_TOKENS, HIDDEN, PADDED_VOCAB = 37, 16, 1000  # 500 rows per rank
CHUNK, BLOCK = 16, 96  # 500 % 96 != 0 and 37 % 16 != 0
TOL = dict(atol=1e-5, rtol=1.3e-6)  # fp32
CASES = {
    "fp32_t0.7": dict(vocab_size=PADDED_VOCAB, temperature=0.7, with_entropy=True),
    "vocab_padding": dict(vocab_size=990, temperature=1.0, with_entropy=True),
    # Rank 1's rows are all padding: its shard contributes nothing but must not break the reduction.
    "rank1_all_padding": dict(vocab_size=480, temperature=1.0, with_entropy=True),
    "no_entropy": dict(vocab_size=PADDED_VOCAB, temperature=0.7, with_entropy=False),
}


def make_case(case):
    """Full (unsharded) inputs of a case, identical in every process."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(NUM_TOKENS, HIDDEN, generator=gen)
    weight = torch.randn(PADDED_VOCAB, HIDDEN, generator=gen) * 0.5
    labels = torch.randint(0, case["vocab_size"], (NUM_TOKENS,), generator=gen)
    # Labels in both shards when the true vocab reaches rank 1, and masked positions.
    top = case["vocab_size"] - 1
    labels[:4] = torch.tensor([0, min(499, top), min(500, top), top])
    labels[[7, 20]] = -100
    w_logp, w_ent = torch.randn(2, NUM_TOKENS, generator=gen)
    return hidden, weight, labels, w_logp, w_ent


def _tp_worker(rank, port, out_dir):
    """Runs every case on this rank's vocab slice and saves outputs and gradients."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=TP, timeout=timedelta(seconds=60))
    try:
        group = dist.new_group(list(range(TP)))
        results = {}
        for name, case in CASES.items():
            hidden, weight, labels, w_logp, w_ent = make_case(case)
            rows = PADDED_VOCAB // TP
            hidden = hidden.requires_grad_()
            shard = weight[rank * rows : (rank + 1) * rows].clone().requires_grad_()
            log_probs, entropy = vocab_parallel_log_probs(
                hidden, shard, labels, tp_group=group, chunk_size=CHUNK, block_size=BLOCK,
                temperature=case["temperature"], vocab_size=case["vocab_size"], with_entropy=case["with_entropy"],
            )
            loss = (log_probs * w_logp).sum()
            if entropy is not None:
                loss = loss + (entropy * w_ent).sum()
            loss.backward()
            results[name] = dict(log_probs=log_probs, entropy=entropy, grad_hidden=hidden.grad, grad_shard=shard.grad,
                                 moments=vars(vocab_parallel_softmax_moments(
                                     hidden, shard, labels, tp_group=group, chunk_size=CHUNK, block_size=BLOCK,
                                     temperature=case["temperature"], vocab_size=case["vocab_size"])))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def naive(hidden, weight, labels, *, temperature, vocab_size):
    logits = hidden @ weight[:vocab_size].t() / temperature
    log_p = torch.log_softmax(logits, dim=-1)
    valid = labels != -100
    log_probs = log_p.gather(1, torch.where(valid, labels, 0).unsqueeze(1)).squeeze(1) * valid
    entropy = -(log_p.exp() * log_p).sum(-1) * valid
    return log_probs, entropy


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("logprobs_tp")
    # A failing worker raises here (ProcessRaisedException carries its traceback).
    mp.spawn(_tp_worker, args=(free_port(), str(out_dir)), nprocs=TP, join=True)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(TP)]


@pytest.mark.parametrize("name", list(CASES))
def test_tp2_matches_tp1_naive(tp_results, name):
    case = CASES[name]
    hidden, weight, labels, w_logp, w_ent = make_case(case)
    hidden.requires_grad_()
    weight.requires_grad_()
    log_probs, entropy = naive(hidden, weight, labels, temperature=case["temperature"], vocab_size=case["vocab_size"])
    loss = (log_probs * w_logp).sum() + ((entropy * w_ent).sum() if case["with_entropy"] else 0)
    loss.backward()

    want = dict(log_probs=log_probs.detach(), entropy=entropy.detach(), grad_hidden=hidden.grad)
    if not case["with_entropy"]:
        want.pop("entropy")
    for rank, got in enumerate(r[name] for r in tp_results):
        # Outputs are replicated, and grad_hidden is already summed over the group.
        for key, value in want.items():
            torch.testing.assert_close(got[key], value, **TOL, msg=lambda m: f"rank {rank} {key}: {m}")
        if not case["with_entropy"]:
            assert got["entropy"] is None
    grad_weight = torch.cat([r[name]["grad_shard"] for r in tp_results])
    torch.testing.assert_close(grad_weight, weight.grad, **TOL)
    assert (grad_weight[case["vocab_size"] :] == 0).all()


@pytest.mark.parametrize("name", list(CASES))
def test_tp2_softmax_moments_match_the_full_softmax(tp_results, name):
    case = CASES[name]
    hidden, weight, labels, _, _ = make_case(case)
    log_p = torch.log_softmax(hidden.double() @ weight[:case["vocab_size"]].double().t() / case["temperature"], -1)
    valid = labels != -100
    p_squared = log_p.exp().square()
    want = {"sum_p2": p_squared.sum(-1) * valid, "sum_p2_log_p": (p_squared * log_p).sum(-1) * valid}
    for rank, result in enumerate(r[name] for r in tp_results):
        for key, value in want.items():
            torch.testing.assert_close(result["moments"][key], value.float(), atol=1e-7, rtol=1e-5,
                                       msg=lambda m: f"rank {rank} {key}: {m}")
