"""The demo's arithmetic task and tiny HF model load like any Hugging Face model."""

import torch

from megatron_gppo.reward.math import score_math
from megatron_gppo.tasks.arithmetic import split_problems
from megatron_gppo.tasks.tiny_model import save_tiny_model


def test_splits_are_disjoint_and_verifiable():
    train, held_out = split_problems(num_train=200, num_eval=50, seed=1)
    assert len(train) == 200 and len(held_out) == 50
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    for record in train[:20]:
        a, b = map(int, record["prompt"].rstrip("=").split("+"))
        assert score_math(record["response"], record["answer"]) == 1.0 and int(record["answer"]) == a + b


def test_tiny_model_round_trips_through_auto_classes(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    save_tiny_model(tmp_path, num_layers=2, hidden_size=32, intermediate_size=64)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    text = "12+30=\\boxed{42}"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text) and tokenizer.decode(ids) == text
    assert tokenizer.eos_token_id == 2 and tokenizer.pad_token_id == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.config.architectures == ["Qwen2ForCausalLM"]
    logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tokenizer)) and torch.isfinite(logits).all()
