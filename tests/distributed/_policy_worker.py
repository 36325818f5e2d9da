"""Worker processes for the policy layout tests (spawned by test_policy_layouts.py).

A tiny Qwen2-shaped fp32 model (4 layers, hidden 64, 4 heads / 2 KV heads,
qkv bias, tied embeddings, vocab 251 so TP=2 pads one row) gets the same
seeded weights under every layout. `run_reference` computes, on one process
(TP=1), per-token log-probs and entropy, one RL step's loss, metrics, grad
norm, gradients and post-step parameters, all in full (unsharded) megatron
names. `run_layouts` brings up one gloo group and runs several layouts in it
one after another (megatron's parallel state is re-initialised in place, as
megatron's own tests do), comparing each rank's shard with the reference and
writing the max abs differences to `<out>/<layout>.rank<r>.json`.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import torch

TINY_QWEN2 = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 251,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 128,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
}
SEQ_LEN = 48
# Long-tailed sample lengths (26, 12, 44, 17, 7, 16, 4, 14): packed into rows of 44 they need 4 rows, not 8.
PROMPT_LENS = (6, 9, 4, 12, 5, 7, 3, 8)
RESPONSE_LENS = (20, 3, 40, 5, 2, 9, 1, 6)
TEMPERATURE = 0.8
MICRO_BATCH_SIZE = 1
LOSS_HPARAMS = {"eps_low": 0.2, "eps_high": 0.2, "beta1": 0.5, "beta2": 1.0, "entropy_coef": 0.01, "nll_coef": 0.1}
# Adam's first step is lr * g / (|g| + eps): with the default eps 1e-8 it is ~lr * sign(g),
# blind to the gradient's size and jumpy for |g| ~ eps. eps 1e-4 keeps the post-step
# parameters a smooth function of the gradients (a 1e-7 gradient difference moves a
# parameter by at most lr * 1e-7 / eps = 1e-6) and sensitive to a wrongly scaled gradient.
TRAIN = {"lr": 1e-3, "grad_clip": 1.0, "weight_decay": 0.01, "adam_eps": 1e-4}

# Layouts that also check `model.rewind`: a what-if step rewound leaves the real steps bit-identical.
REWIND_LAYOUTS = ("tp2", "pp2_vpp2", "dp2_distopt", "tp2_pp2")

# name: (ParallelConfig fields, TrainConfig fields); "<name>_packed" runs the layout on packed rows.
LAYOUTS = {
    "tp2": ({"tensor_parallel": 2}, {}),
    "tp2_sp": ({"tensor_parallel": 2, "sequence_parallel": True}, {}),
    "pp2": ({"pipeline_parallel": 2}, {}),
    "pp2_vpp2": ({"pipeline_parallel": 2, "virtual_pipeline": 2}, {}),
    "pp2_uneven": ({"pipeline_parallel": 2, "num_layers_in_first_stage": 1, "num_layers_in_last_stage": 3}, {}),
    "dp2": ({}, {}),
    "dp2_distopt": ({}, {"distributed_optimizer": True}),
    "tp2_pp2": ({"tensor_parallel": 2, "pipeline_parallel": 2}, {}),
}


def seeded_hf_state_dict(arch, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic HF-named Qwen2 weights (norm weights around 1, the rest N(0, 0.05))."""
    h, f, d = arch.hidden_size, arch.ffn_hidden_size, arch.head_dim
    q, kv = arch.num_attention_heads * d, arch.num_query_groups * d
    shapes = {"model.embed_tokens.weight": (arch.vocab_size, h), "model.norm.weight": (h,)}
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.q_proj.bias": (q,),
            p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h), p + "mlp.down_proj.weight": (h, f),
        })
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, h)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        values = torch.randn(shape, generator=gen) * 0.05
        state[name] = values + 1.0 if "norm" in name else values
    return state


def full_batch(*, old_log_probs: torch.Tensor | None = None):
    """The 4 x 32 test batch (fixed tokens, right padding, varied prompt / response lengths)."""
    from megatron_gppo.model.policy import PolicyBatch

    gen = torch.Generator().manual_seed(1)
    num_rows = len(PROMPT_LENS)
    tokens = torch.randint(0, TINY_QWEN2["vocab_size"], (num_rows, SEQ_LEN), generator=gen)
    loss_mask = torch.zeros(num_rows, SEQ_LEN, dtype=torch.bool)
    for row, (prompt, response) in enumerate(zip(PROMPT_LENS, RESPONSE_LENS)):
        loss_mask[row, prompt:prompt + response] = True
        tokens[row, prompt + response:] = 0  # padding
    advantages = torch.tensor([1.0, -0.5, 0.8, -1.2, 0.3, -0.9, 1.4, -0.2]).unsqueeze(1)
    advantages = advantages.expand(num_rows, SEQ_LEN).contiguous()
    if old_log_probs is None:
        old_log_probs = torch.zeros(num_rows, SEQ_LEN)
    return PolicyBatch(tokens=tokens, loss_mask=loss_mask, advantages=advantages, old_log_probs=old_log_probs)


def _setup(rank: int, world_size: int, port: int, parallel_fields: dict, train_fields: dict, *,
           dtype: str = "float32"):
    from megatron_gppo.config import ModelConfig, ParallelConfig, TrainConfig
    from megatron_gppo.checkpoint.qwen2 import hf_to_megatron
    from megatron_gppo.model.arch import ModelArch
    from megatron_gppo.model.parallel import init_distributed
    from megatron_gppo.model.policy import Policy

    arch = ModelArch.from_hf_config(TINY_QWEN2)
    environ = {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    dims = init_distributed(ParallelConfig(**parallel_fields), arch=arch, seed=1234, environ=environ)
    policy = Policy(arch=arch, dims=dims, model=ModelConfig(dtype=dtype),
                    train=TrainConfig(**{**TRAIN, **train_fields}))
    policy.load_full_state_dict(hf_to_megatron(seeded_hf_state_dict(arch), arch=arch))
    return policy


def _step(policy, batch, *, micro_batch_size: int = MICRO_BATCH_SIZE, fused: bool = True):
    """log-probs, then one RL step; returns everything the comparison needs."""
    log_probs, entropy = policy.compute_log_probs(batch, temperature=TEMPERATURE, micro_batch_size=2 * micro_batch_size,
                                                  fused=fused)
    loss, metrics = policy.forward_backward(batch, loss_name="ce_gppo", loss_hparams=LOSS_HPARAMS,
                                            temperature=TEMPERATURE, micro_batch_size=micro_batch_size, fused=fused)
    grads = {name: param.main_grad.detach().clone() for chunk in policy.model for name, param in _named(chunk)}
    return log_probs, entropy, loss, metrics, grads


def _named(ddp_chunk):
    from megatron_gppo.model.weights import global_name

    chunk = ddp_chunk.module
    return [(global_name(chunk, name), param) for name, param in chunk.named_parameters()]


def run_reference(rank: int, port: int, path: str) -> None:
    """TP=1 on one process: the numbers every layout must reproduce."""
    torch.set_num_threads(1)
    policy = _setup(0, 1, port, {}, {})
    log_probs, _ = policy.compute_log_probs(full_batch(), temperature=TEMPERATURE, micro_batch_size=4)
    # The sampling policy: the current one, perturbed so that every CE-GPPO region is populated.
    noise = torch.randn(log_probs.shape, generator=torch.Generator().manual_seed(2)) * 0.3
    old_log_probs = (log_probs + noise) * full_batch().loss_mask
    batch = full_batch(old_log_probs=old_log_probs)
    log_probs, entropy, loss, metrics, grads = _step(policy, batch)
    stats = policy.step(loss=loss)
    params = {name: param.detach().clone() for chunk in policy.model for name, param in _named(chunk)}
    torch.save({"old_log_probs": old_log_probs, "log_probs": log_probs, "entropy": entropy, "loss": loss,
                "metrics": metrics, "grad_norm": stats.grad_norm, "grads": grads, "params": params}, path)


def run_layouts(rank: int, world_size: int, port: int, names: list[str], ref_path: str, out_dir: str) -> None:
    from megatron.core import parallel_state

    from megatron_gppo.model.weights import shard_like

    torch.set_num_threads(1)
    ref = torch.load(ref_path)
    for name in names:
        packed = name.endswith("_packed")
        parallel_fields, train_fields = LAYOUTS[name.removesuffix("_packed")]
        policy = _setup(rank, world_size, port, parallel_fields, train_fields)
        tp_rank, tp = parallel_state.get_tensor_model_parallel_rank(), policy.dims.tp
        mine = _this_rank(policy, full_batch(old_log_probs=ref["old_log_probs"]), packed=packed)
        # The reference's per-token outputs laid out like this rank's batch (the layout depends on lengths only).
        expected = _this_rank(policy, replace(full_batch(), old_log_probs=ref["log_probs"],
                                              rollout_log_probs=ref["entropy"]), packed=packed)
        log_probs, entropy, loss, metrics, grads = _step(policy, mine.batch, micro_batch_size=mine.rows_per_micro_batch)
        batch = mine.batch
        if packed:
            assert batch.num_rows * policy.dims.dp < len(PROMPT_LENS), "no two samples share a row"
        diffs = {
            "log_probs": _max_diff(log_probs, expected.batch.old_log_probs),
            "entropy": _max_diff(entropy, expected.batch.rollout_log_probs),
            "loss": abs(loss - ref["loss"]),
            "metrics": max(abs(metrics[k] - ref["metrics"][k]) for k in ref["metrics"]),
        }
        params = dict(p for chunk in policy.model for p in _named(chunk))
        if not train_fields.get("distributed_optimizer"):
            # (With the distributed optimizer each rank's grad buffer is only reduced on its own shard.)
            diffs["grads"] = max(
                _max_diff(grads[k], shard_like(params[k], ref["grads"][k], name=k, tp_rank=tp_rank, tp_size=tp))
                for k in grads)
        if name == "tp2":
            # The unfused reference log-prob path must give the same RL loss and gradients.
            _, _, loss_unfused, _, grads_unfused = _step(policy, batch, micro_batch_size=mine.rows_per_micro_batch,
                                                         fused=False)
            diffs["fused_vs_unfused_loss"] = abs(loss - loss_unfused)
            diffs["fused_vs_unfused_grads"] = max(_max_diff(grads[k], grads_unfused[k]) for k in grads)
            policy.forward_backward(batch, loss_name="ce_gppo", loss_hparams=LOSS_HPARAMS,
                                    temperature=TEMPERATURE, micro_batch_size=mine.rows_per_micro_batch)
        stats = policy.step(loss=loss)
        diffs["grad_norm"] = abs(stats.grad_norm - ref["grad_norm"])
        diffs["params"] = max(
            _max_diff(param, shard_like(param, ref["params"][key], name=key, tp_rank=tp_rank, tp_size=tp))
            for key, param in params.items())
        diffs.update(_poisoned_step(policy, mine.batch, micro_batch_size=mine.rows_per_micro_batch, rank=rank))
        del policy
        if name in REWIND_LAYOUTS:
            diffs.update(_rewound_steps(lambda: _setup(rank, world_size, port, parallel_fields, train_fields),
                                        mine.batch, micro_batch_size=mine.rows_per_micro_batch))
        Path(out_dir, f"{name}.rank{rank}.json").write_text(json.dumps(diffs))


def _rewound_steps(new_policy, batch, *, micro_batch_size: int) -> dict[str, float]:
    """Two real steps, each after a what-if step (other betas) that is rewound, against the two real steps alone.

    The first what-if runs on fresh Adam state, which it creates and the rewind must drop; the second on the
    moments of a real step. The parameters must come out bit for bit the same.
    """
    from megatron_gppo.model.rewind import TrainingSnapshot

    def step(policy, hparams):
        loss, _ = policy.forward_backward(batch, loss_name="ce_gppo", loss_hparams=hparams, temperature=TEMPERATURE,
                                          micro_batch_size=micro_batch_size)
        policy.step(loss=loss)

    def params(policy):
        return [p.detach().clone() for chunk in policy.model for p in chunk.parameters()]

    policy = new_policy()
    expected = []
    for _ in range(2):
        step(policy, LOSS_HPARAMS)
        expected.append(params(policy))
    expected_schedule = policy.scheduler.num_steps
    del policy
    policy, diffs = new_policy(), {"what_if_moved_params": 0.0, "rewound_steps_vs_real": 0.0}
    for want in expected:
        before = params(policy)
        snapshot = TrainingSnapshot.take(chunks=policy.model, optimizer=policy.optimizer, scheduler=policy.scheduler)
        step(policy, {**LOSS_HPARAMS, "beta1": 2.0, "beta2": 0.0})
        diffs["what_if_moved_params"] = max(_max_diff(a, b) for a, b in zip(params(policy), before))
        snapshot.restore(scheduler=policy.scheduler)
        step(policy, LOSS_HPARAMS)
        diffs["rewound_steps_vs_real"] = max(diffs["rewound_steps_vs_real"],
                                             *(_max_diff(a, b) for a, b in zip(params(policy), want)))
    diffs["rewound_schedule_vs_real"] = float(policy.scheduler.num_steps - expected_schedule)
    return diffs


def _poisoned_step(policy, batch, *, micro_batch_size: int, rank: int) -> dict[str, float]:
    """A step whose gradient is NaN in one element on the last rank only: no rank may change anything."""
    _, _, loss, _, _ = _step(policy, batch, micro_batch_size=micro_batch_size)
    if rank == torch.distributed.get_world_size() - 1:
        next(p for chunk in policy.model for p in chunk.parameters()).main_grad.view(-1)[0] = float("nan")
    before = [p.detach().clone() for chunk in policy.model for p in chunk.parameters()]
    schedule_before = policy.scheduler.num_steps
    stats = policy.step(loss=loss)
    after = [p.detach() for chunk in policy.model for p in chunk.parameters()]
    return {"nan_step_reported_successful": float(stats.update_successful),
            "nan_step_changed_params": max(_max_diff(a, b) for a, b in zip(after, before)),
            "nan_step_advanced_lr_schedule": float(policy.scheduler.num_steps - schedule_before)}


def run_packed_vs_padded(rank: int, port: int, path: str, dtype: str) -> None:
    """One process: log-probs, entropy and the RL loss of the test batch, padded and packed.

    On a GPU with Transformer Engine the packed rows run as THD sequences
    (`PackedSeqParams`), the padded ones with TE's causal mask.
    """
    policy = _setup(0, 1, port, {}, {}, dtype=dtype)
    padded = full_batch()
    log_probs, entropy = policy.compute_log_probs(padded, temperature=TEMPERATURE, micro_batch_size=2)
    noise = torch.randn(log_probs.shape, generator=torch.Generator().manual_seed(2)) * 0.3
    old_log_probs = (log_probs.float().cpu() + noise) * padded.loss_mask
    packed = _this_rank(policy, replace(padded, old_log_probs=log_probs.float().cpu(),
                                        rollout_log_probs=entropy.float().cpu()), packed=True)
    packed_log_probs, packed_entropy = policy.compute_log_probs(packed.batch, temperature=TEMPERATURE,
                                                                micro_batch_size=packed.rows_per_micro_batch)
    losses = {}
    for name, mine in (("padded", _this_rank(policy, full_batch(old_log_probs=old_log_probs), packed=False)),
                       ("packed", _this_rank(policy, full_batch(old_log_probs=old_log_probs), packed=True))):
        losses[name], _ = policy.forward_backward(mine.batch, loss_name="ce_gppo", loss_hparams=LOSS_HPARAMS,
                                                  temperature=TEMPERATURE, micro_batch_size=mine.rows_per_micro_batch)
    Path(path).write_text(json.dumps({
        "packed_thd": policy.packed_thd,
        "num_packed_rows": packed.batch.num_rows,
        "log_probs": _max_diff(packed_log_probs.cpu(), packed.batch.old_log_probs),
        "entropy": _max_diff(packed_entropy.cpu(), packed.batch.rollout_log_probs),
        "loss_padded": losses["padded"], "loss_packed": losses["packed"],
    }))


def run_log_probs_and_loss(rank: int, port: int, path: str, dtype: str) -> None:
    """One process in `dtype`: log-probs and entropy of the test batch, and the RL loss against fixed old
    log-probs (tests/gpu compares bf16 with fp32 on CUDA)."""
    policy = _setup(0, 1, port, {}, {}, dtype=dtype)
    batch = full_batch()
    log_probs, entropy = policy.compute_log_probs(batch, temperature=TEMPERATURE, micro_batch_size=4)
    old_log_probs = torch.full(log_probs.shape, -2.0) * batch.loss_mask
    loss, _ = policy.forward_backward(full_batch(old_log_probs=old_log_probs), loss_name="ce_gppo",
                                      loss_hparams=LOSS_HPARAMS, temperature=TEMPERATURE,
                                      micro_batch_size=MICRO_BATCH_SIZE)
    device = str(next(policy.model[0].parameters()).device)
    torch.save({"log_probs": log_probs.float().cpu(), "entropy": entropy.float().cpu(), "loss": float(loss),
                "device": device}, path)


def run_realized_sensitivity(rank: int, port: int, path: str) -> None:
    """`trainer.train_on_batch` on the test batch with its what-if updates at beta1=0, beta2=1, then the real
    step at beta1=0.5 and at beta2=1.5, each from the same fresh policy; writes the metrics of all three."""
    from megatron_gppo.config import load_config
    from megatron_gppo.driver import RolloutBatch
    from megatron_gppo.trainer import train_on_batch

    # Two epochs of two minibatches and a narrow clip range, so the later updates clip tokens on both sides.
    config = load_config(None, ["train.num_epochs=2", "train.num_minibatches=2", "train.micro_batch_size=2",
                                "algorithm.eps_low=0.001", "algorithm.eps_high=0.001",
                                "logging.realized_sensitivity_beta_step=0.5", f"rollout.temperature={TEMPERATURE}"])
    batch = replace(full_batch(), rollout_log_probs=torch.zeros(len(PROMPT_LENS), SEQ_LEN))
    results = {}
    for name, (beta1, beta2) in {"base": (0.0, 1.0), "beta1": (0.5, 1.0), "beta2": (0.0, 1.5)}.items():
        policy = _setup(rank, 1, port, {}, {})
        results[name] = train_on_batch(policy, RolloutBatch(batch=batch, beta1=beta1, beta2=beta2, metrics={}),
                                       config=config)
        del policy
    Path(path).write_text(json.dumps(results))


def _this_rank(policy, batch, *, packed: bool):
    from megatron.core import parallel_state

    from megatron_gppo.packing import rank_batch

    return rank_batch(batch, num_minibatches=1, dp_rank=parallel_state.get_data_parallel_rank(),
                      dp_size=policy.dims.dp, micro_batch_size=MICRO_BATCH_SIZE, pack=packed,
                      seq_multiple=policy.dims.tp if policy.dims.sequence_parallel else 1)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = (a.double() - b.double()).abs().max().item()
    return diff if not math.isnan(diff) else float("inf")


if __name__ == "__main__":
    raise SystemExit("spawned by tests/distributed/test_policy_layouts.py")
