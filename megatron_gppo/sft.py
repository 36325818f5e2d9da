"""Supervised warm-up through the same Megatron policy, exported as a Hugging Face model.

`megatron-gppo sft CONFIG` trains on `(prompt, response)` records of
`data.train_path` with the `sft` loss of the registry (token-mean NLL of the
response and EOS), `train.prompts_per_step` records per optimizer step for
`train.max_steps` steps, and writes `train.output_dir/hf`, the model RL then
starts from (`model.hf_path`). Every rank reads the data and draws the same
seeded batches, so nothing needs broadcasting.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_gppo.batching import PolicyBatch, pad_rows
from megatron_gppo.config import RunConfig
from megatron_gppo.data import PromptSampler, encode_prompt, load_records, pad_token_id

logger = logging.getLogger(__name__)


def sft_examples(config: RunConfig, tokenizer) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids + EOS) of every record."""
    data = config.data
    examples = []
    for index, record in enumerate(load_records(data.train_path)):
        for key in (data.prompt_key, data.response_key):
            if key not in record:
                raise ValueError(f"{data.train_path}: record {index} has no '{key}' field; set data.{'prompt_key' if key == data.prompt_key else 'response_key'}")
        prompt_ids = encode_prompt(str(record[data.prompt_key]), tokenizer=tokenizer, template=data.prompt_template)
        response_ids = tokenizer(str(record[data.response_key]), add_special_tokens=False)["input_ids"]
        examples.append((prompt_ids, response_ids + [tokenizer.eos_token_id]))
    return examples


def sft_batch(examples: list[tuple[list[int], list[int]]], *, pad_id: int) -> PolicyBatch:
    """The examples as a policy batch; the `sft` loss reads no advantages or old log-probs, so they are 0."""
    batch = pad_rows([prompt for prompt, _ in examples], [response for _, response in examples], pad_id=pad_id)
    zeros = torch.zeros(batch.tokens.shape, dtype=torch.float32)
    return replace(batch, advantages=zeros, old_log_probs=zeros)


def run(config: RunConfig) -> Path:
    """Train, then write the HF model; returns its directory (`train.output_dir/hf`)."""
    from transformers import AutoTokenizer

    from megatron_gppo.checkpoint.live import export_hf
    from megatron_gppo.config import to_dict
    from megatron_gppo.driver import setup_policy
    from megatron_gppo.metrics import MetricsLogger
    from megatron_gppo.packing import rank_batch
    from megatron_gppo.trainer import rank_layout

    # A warm-up is short and writes only its HF export: it always starts from model.hf_path.
    policy, arch, _, _ = setup_policy(config, resume=False)
    tokenizer = AutoTokenizer.from_pretrained(config.model.hf_path)
    pad_id = pad_token_id(tokenizer)
    examples = sft_examples(config, tokenizer)
    sampler = PromptSampler(len(examples), seed=config.train.seed, shuffle=config.data.shuffle)
    is_driver = dist.get_rank() == 0
    metrics = (MetricsLogger(run_dir=config.train.output_dir, config=config.logging, run_config=to_dict(config),
                             max_steps=config.train.max_steps) if is_driver else None)
    log_every = max(1, config.train.max_steps // 20)
    for step in range(1, config.train.max_steps + 1):
        indices = sampler.next_indices(config.train.prompts_per_step)
        mine = rank_batch(sft_batch([examples[i] for i in indices], pad_id=pad_id), num_minibatches=1,
                          **rank_layout(policy, config))
        result = policy.forward_backward_step(mine.batch, loss_name="sft", micro_batch_size=mine.rows_per_micro_batch)
        if metrics is not None and (step == 1 or step % log_every == 0 or step == config.train.max_steps):
            metrics.log(step, {"sft_loss": result.loss, "grad_norm": result.grad_norm, "lr": result.lr})

    hf_dir = export_hf(policy.chunks, arch=arch, output_dir=Path(config.train.output_dir) / "hf",
                       copy_files_from=config.model.hf_path)
    if is_driver:
        metrics.close()
        logger.info("SFT model written to %s", hf_dir)
    return hf_dir
