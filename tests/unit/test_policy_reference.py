"""The Megatron policy on one process against plain PyTorch (Hugging Face transformers).

Same weights in both. The RL loss (CE-GPPO with entropy and NLL terms,
micro-batched, exact global token mean) must give the per-token log-probs,
entropies, loss and every parameter gradient of the same loss computed on the
Hugging Face model's full logits. Also: activation recompute (full,
selective) changes nothing, bf16 runs a step, and Qwen3 (qk norm, head_dim != hidden/heads) and
Llama 3 (llama3 rope scaling, tied) forward passes match their HF models.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from megatron_gppo.algorithm.losses import compute_policy_loss, loss_normalizers
from megatron_gppo.checkpoint import mapping, mapping_for
from megatron_gppo.config import ModelConfig, ParallelConfig, TrainConfig
from megatron_gppo.model.arch import ModelArch
from megatron_gppo.model.parallel import destroy_distributed, init_distributed
from megatron_gppo.model.policy import Policy, PolicyBatch

TOLERANCE = 1e-5
TEMPERATURE = 0.7
LOSS_HPARAMS = {"eps_low": 0.2, "eps_high": 0.28, "beta1": 0.5, "beta2": 1.0, "entropy_coef": 0.01, "nll_coef": 0.1}

COMMON = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "vocab_size": 250, "rms_norm_eps": 1e-6, "max_position_embeddings": 128,
          "hidden_act": "silu"}
CONFIGS = {
    "qwen2": {**COMMON, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "rope_theta": 10000.0,
              "tie_word_embeddings": False},
    "qwen3": {**COMMON, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "head_dim": 24,
              "rope_theta": 1000000.0, "tie_word_embeddings": False},
    "llama3": {**COMMON, "architectures": ["LlamaForCausalLM"], "model_type": "llama", "tie_word_embeddings": True,
               "max_position_embeddings": 256,
               "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 64}},
}
HF_CLASSES = {"qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
              "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
              "llama3": (transformers.LlamaConfig, transformers.LlamaForCausalLM)}


@pytest.fixture(scope="module")
def dims():
    arch = ModelArch.from_hf_config(CONFIGS["qwen2"])
    dims = init_distributed(ParallelConfig(), arch=arch, seed=1234)
    yield dims
    destroy_distributed()


def hf_model(name: str) -> torch.nn.Module:
    config_cls, model_cls = HF_CLASSES[name]
    config = config_cls(**{k: v for k, v in CONFIGS[name].items() if k != "architectures"})
    torch.manual_seed(0)
    model = model_cls(config).float()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            param.normal_(0, 0.05)
            if "norm" in param_name:
                param.add_(1.0)
    return model


def policy_like(model: torch.nn.Module, name: str, dims, *, dtype="float32", recompute="none") -> Policy:
    arch = ModelArch.from_hf_config(CONFIGS[name])
    policy = Policy(arch=arch, dims=dims, model=ModelConfig(dtype=dtype, recompute=recompute),
                    train=TrainConfig(lr=1e-3))
    hf_state = {k: v.detach() for k, v in model.state_dict().items()}
    policy.load_full_state_dict(mapping.hf_to_megatron(mapping_for(arch), hf_state, arch=arch, te_names=False))
    return policy


def make_batch() -> PolicyBatch:
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, COMMON["vocab_size"], (3, 24), generator=gen)
    loss_mask = torch.zeros(3, 24, dtype=torch.bool)
    loss_mask[0, 5:20] = True
    loss_mask[1, 9:24] = True
    loss_mask[2, 3:11] = True
    advantages = torch.tensor([[0.9], [-1.1], [0.4]]).expand(3, 24).contiguous()
    return PolicyBatch(tokens=tokens, loss_mask=loss_mask, advantages=advantages)


def reference_log_probs(model, tokens):
    """[B, T] log p(token t | tokens < t) and entropy at t (0 at t = 0), from the HF logits."""
    log_softmax = torch.log_softmax(model(tokens).logits.float() / TEMPERATURE, dim=-1)[:, :-1]
    log_probs = torch.zeros(tokens.shape)
    entropy = torch.zeros(tokens.shape)
    log_probs[:, 1:] = log_softmax.gather(2, tokens[:, 1:, None]).squeeze(2)
    entropy[:, 1:] = -(log_softmax.exp() * log_softmax).sum(-1)
    return log_probs, entropy


def max_diff(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def test_rl_loss_gradients_match_plain_pytorch(dims):
    model = hf_model("qwen2")
    policy = policy_like(model, "qwen2", dims)
    batch = make_batch()
    mask = batch.loss_mask

    ref_log_probs, ref_entropy = reference_log_probs(model, batch.tokens)
    ref_log_probs, ref_entropy = ref_log_probs * mask, ref_entropy * mask
    log_probs, entropy = policy.compute_log_probs(batch, temperature=TEMPERATURE, micro_batch_size=2)
    print(f"\nlog-probs max|diff|={max_diff(log_probs, ref_log_probs):.1e}"
          f" entropy max|diff|={max_diff(entropy, ref_entropy):.1e}")
    assert max_diff(log_probs, ref_log_probs) <= TOLERANCE
    assert max_diff(entropy, ref_entropy) <= TOLERANCE

    noise = torch.randn(mask.shape, generator=torch.Generator().manual_seed(4)) * 0.3
    old_log_probs = (ref_log_probs.detach() + noise) * mask
    batch = PolicyBatch(tokens=batch.tokens, loss_mask=mask, advantages=batch.advantages, old_log_probs=old_log_probs)

    model.zero_grad()
    ref_log_probs, ref_entropy = reference_log_probs(model, batch.tokens)
    ref_loss, ref_metrics = compute_policy_loss(
        "ce_gppo", log_probs=ref_log_probs, old_log_probs=old_log_probs, advantages=batch.advantages,
        loss_mask=mask, entropy=ref_entropy, **LOSS_HPARAMS,
        **loss_normalizers(loss_mask=mask, advantages=batch.advantages))
    ref_loss.backward()
    assert ref_metrics["clip_frac_low"] > 0 and ref_metrics["clip_frac_high"] > 0  # every region is exercised

    # micro_batch_size=1: three micro-batches of different token counts must add up exactly.
    loss, metrics = policy.forward_backward(batch, loss_name="ce_gppo", loss_hparams=LOSS_HPARAMS,
                                            temperature=TEMPERATURE, micro_batch_size=1)
    arch = ModelArch.from_hf_config(CONFIGS["qwen2"])
    ref_grads = mapping.hf_to_megatron(mapping_for(arch), {n: p.grad for n, p in model.named_parameters()},
                                       arch=arch, te_names=False)
    grads = {name: param.main_grad for name, param in policy.chunks[0].named_parameters()}
    assert grads.keys() == ref_grads.keys()
    grad_diff = max(max_diff(grads[name], ref_grads[name]) for name in grads)
    print(f"loss |diff|={abs(loss - ref_loss.item()):.1e} grads max|diff|={grad_diff:.1e}")
    assert abs(loss - ref_loss.item()) <= TOLERANCE
    assert max(abs(metrics[k] - ref_metrics[k]) for k in ref_metrics) <= TOLERANCE
    assert grad_diff <= TOLERANCE

    # The update touches every parameter that has a gradient.
    before = {name: param.detach().clone() for name, param in policy.chunks[0].named_parameters()}
    stats = policy.step(loss=loss)
    assert stats.update_successful and stats.lr == pytest.approx(1e-3)
    for name, param in policy.chunks[0].named_parameters():
        assert not torch.equal(param, before[name]), name


def test_activation_recompute_changes_nothing(dims):
    model = hf_model("qwen2")
    batch = make_batch()
    batch = PolicyBatch(tokens=batch.tokens, loss_mask=batch.loss_mask, advantages=batch.advantages,
                        old_log_probs=torch.full(batch.tokens.shape, -5.0) * batch.loss_mask)
    results = []
    for recompute in ("none", "full", "selective"):
        policy = policy_like(model, "qwen2", dims, recompute=recompute)
        loss, _ = policy.forward_backward(batch, loss_name="ce_gppo", loss_hparams=LOSS_HPARAMS,
                                          temperature=TEMPERATURE, micro_batch_size=2)
        results.append((loss, {n: p.main_grad.clone() for n, p in policy.chunks[0].named_parameters()}))
    (loss, grads), *recomputed = results
    for loss_recompute, grads_recompute in recomputed:
        assert loss == loss_recompute
        assert max(max_diff(grads[n], grads_recompute[n]) for n in grads) <= 1e-7


def test_bf16_policy_takes_a_step(dims):
    model = hf_model("qwen2")
    policy = policy_like(model, "qwen2", dims, dtype="bfloat16")
    assert policy.chunks[0].embedding.word_embeddings.weight.dtype == torch.bfloat16
    batch = make_batch()
    ref_log_probs, _ = reference_log_probs(model, batch.tokens)
    log_probs, _ = policy.compute_log_probs(batch, temperature=TEMPERATURE, micro_batch_size=3)
    assert max_diff(log_probs, ref_log_probs.detach() * batch.loss_mask) < 0.1
    batch = PolicyBatch(tokens=batch.tokens, loss_mask=batch.loss_mask, advantages=batch.advantages,
                        old_log_probs=log_probs)
    result = policy.forward_backward_step(batch, loss_name="ce_gppo", loss_hparams=LOSS_HPARAMS,
                                          temperature=TEMPERATURE, micro_batch_size=3)
    assert result.update_successful and torch.isfinite(torch.tensor(result.grad_norm))


@pytest.mark.parametrize("name", ["qwen3", "llama3"])
def test_other_families_match_hugging_face(dims, name):
    model = hf_model(name)
    policy = policy_like(model, name, dims)
    batch = make_batch()
    with torch.no_grad():
        ref_log_probs, ref_entropy = reference_log_probs(model, batch.tokens)
    log_probs, entropy = policy.compute_log_probs(batch, temperature=TEMPERATURE, micro_batch_size=3)
    assert max_diff(log_probs, ref_log_probs * batch.loss_mask) <= TOLERANCE
    assert max_diff(entropy, ref_entropy * batch.loss_mask) <= TOLERANCE


def test_lr_schedule_warms_up_then_decays():
    from megatron_gppo.model.optimizer import build_scheduler

    class StubOptimizer:
        param_groups = [{}]

    train = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=4, max_steps=10, lr_schedule="cosine")
    scheduler = build_scheduler(StubOptimizer(), train=train)
    lrs = []
    for _ in range(12):
        scheduler.step(increment=1)  # what optimizer_step does before each optimizer step
        lrs.append(StubOptimizer.param_groups[0]["lr"])
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])  # step 1 never runs at lr 0
    assert all(a > b for a, b in zip(lrs[3:9], lrs[4:10]))
    assert lrs[9:] == pytest.approx([1e-4] * 3)
