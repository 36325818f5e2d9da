"""CPU demo (interim): the CE-GPPO loss registry on a small softmax policy.

The full demo (a tiny Qwen2 model trained by SFT then CE-GPPO through Megatron
and a local rollout server) replaces this once the trainer lands. Until then
this script shows the algorithm core end to end on a verifiable task: a
tabular softmax policy answers `a+b` (one token out of 19 answers), rewards are
exact-match, advantages are group-normalised, and several update epochs per
batch push ratios out of the clip range, where CE-GPPO's beta1/beta2 matter.

    python examples/demo_cpu.py
"""

import torch

from megatron_gppo.algorithm import compute_policy_loss, group_advantages

NUM_STEPS, GROUP_SIZE, NUM_EPOCHS, LR = 60, 8, 4, 0.05
PROBLEMS = [(a, b) for a in range(10) for b in range(10)]
ANSWERS = torch.tensor([a + b for a, b in PROBLEMS])
RUNS = {
    "ppo": ("ppo", {}),
    "ce_gppo beta1=0.0": ("ce_gppo", {"beta1": 0.0, "beta2": 1.0}),
    "ce_gppo beta1=1.0": ("ce_gppo", {"beta1": 1.0, "beta2": 1.0}),
}


def entropy_of(logits: torch.Tensor) -> float:
    log_p = logits.log_softmax(-1)
    return float(-(log_p.exp() * log_p).sum(-1).mean())


def train(loss_name: str, hparams: dict, *, seed: int = 0) -> list[tuple[int, float, float]]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.nn.Parameter(0.5 * torch.randn(len(PROBLEMS), 19, generator=generator))
    optimizer = torch.optim.Adam([logits], lr=LR)
    history = []
    for step in range(NUM_STEPS):
        with torch.no_grad():
            contexts = torch.arange(len(PROBLEMS)).repeat_interleave(GROUP_SIZE)
            actions = torch.multinomial(logits[contexts].softmax(-1), 1, generator=generator).squeeze(-1)
            rewards = (actions == ANSWERS[contexts]).float()
            advantages = group_advantages(rewards, group_size=GROUP_SIZE)
            old_log_probs = logits[contexts].log_softmax(-1).gather(-1, actions[:, None])
        for _ in range(NUM_EPOCHS):
            log_probs = logits[contexts].log_softmax(-1).gather(-1, actions[:, None])
            loss, _ = compute_policy_loss(
                loss_name, log_probs=log_probs, old_log_probs=old_log_probs,
                advantages=advantages[:, None], loss_mask=torch.ones_like(log_probs), **hparams,
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        accuracy = float((logits.argmax(-1) == ANSWERS).float().mean())
        history.append((step, entropy_of(logits.detach()), accuracy))
    return history


def main() -> None:
    results = {label: train(name, hparams) for label, (name, hparams) in RUNS.items()}
    print(f"{'step':>5} " + " ".join(f"{label + ' H / acc':>28}" for label in results))
    for step in range(0, NUM_STEPS, 10):
        row = " ".join(f"{h[step][1]:>19.3f} / {h[step][2]:5.2f}" for h in results.values())
        print(f"{step:>5} {row}")
    final = {label: h[-1][1] for label, h in results.items()}
    print("final entropy:", ", ".join(f"{label}: {value:.3f}" for label, value in final.items()))
    print("larger beta1 -> lower entropy:", final["ce_gppo beta1=1.0"] < final["ce_gppo beta1=0.0"])


if __name__ == "__main__":
    main()
