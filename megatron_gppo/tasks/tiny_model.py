"""A tiny Qwen2-architecture model with a character-level tokenizer, in HF format.

Everything is built in code (no download): `save_tiny_model(dir)` writes
`config.json`, `model.safetensors`, `generation_config.json` and a
`PreTrainedTokenizerFast` that `AutoTokenizer` / `AutoModelForCausalLM` load
like any Hugging Face model.
"""

from __future__ import annotations

from pathlib import Path

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
# Enough for arithmetic with \boxed{} answers and short words.
CHARACTERS = list("0123456789+-*=\\{}boxed ")


def build_tokenizer(characters: list[str] = CHARACTERS):
    """A `PreTrainedTokenizerFast` with one id per character plus pad/bos/eos (ids 0/1/2)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([PAD, BOS, EOS, *characters])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()  # characters join without spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=PAD)


def tiny_qwen2_config(*, vocab_size: int, hidden_size: int = 128, num_layers: int = 4, num_heads: int = 4,
                      num_kv_heads: int = 2, intermediate_size: int = 256, max_positions: int = 64,
                      tie_word_embeddings: bool = True):
    """A Qwen2 config (qkv bias, GQA, RMSNorm, SwiGLU) at demo scale."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions, tie_word_embeddings=tie_word_embeddings,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


def save_tiny_model(output_dir: str | Path, *, seed: int = 0, **config_overrides) -> Path:
    """Build a randomly initialised tiny Qwen2 model and its tokenizer into `output_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    output_dir = Path(output_dir)
    tokenizer = build_tokenizer()
    config = tiny_qwen2_config(vocab_size=len(tokenizer), **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0).save_pretrained(output_dir)
    return output_dir
