"""Supervised warm-up through the same Megatron policy, exported as a Hugging Face model.

`megatron-gppo sft CONFIG` trains on `(prompt, response)` records of
`data.train_path` with the `sft` loss of the registry (token-mean NLL of the
response and EOS), `train.prompts_per_step` records per optimizer step for
`train.max_steps` steps, and writes `train.output_dir/hf`, the model RL then
starts from (`model.hf_path`). Every rank reads the data and draws the same
seeded batches, so nothing needs broadcasting.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from megatron_gppo.config import RunConfig
from megatron_gppo.data import PromptSampler, encode_prompt, load_records, pad_token_id
from megatron_gppo.model.policy import PolicyBatch


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
    max_len = max(len(p) + len(r) for p, r in examples)
    tokens = torch.full((len(examples), max_len), pad_id, dtype=torch.int64)
    loss_mask = torch.zeros_like(tokens, dtype=torch.bool)
    for row, (prompt, response) in enumerate(examples):
        tokens[row, : len(prompt) + len(response)] = torch.tensor(prompt + response)
        loss_mask[row, len(prompt) : len(prompt) + len(response)] = True
    zeros = torch.zeros(tokens.shape, dtype=torch.float32)
    return PolicyBatch(tokens=tokens, loss_mask=loss_mask, advantages=zeros, old_log_probs=zeros)


def run(config: RunConfig) -> Path:
    """Train, then write the HF model; returns its directory (`train.output_dir/hf`)."""
    from megatron.core import parallel_state
    from transformers import AutoTokenizer

    from megatron_gppo.batching import shard_rows
    from megatron_gppo.checkpoint.live import iter_hf_tensors
    from megatron_gppo.driver import setup_policy
    from megatron_gppo.metrics import MetricsLogger
    from megatron_gppo.config import to_dict
    from megatron_gppo.rollout.weight_sync import save_safetensors_atomic

    policy, arch, start_step, _ = setup_policy(config)
    tokenizer = AutoTokenizer.from_pretrained(config.model.hf_path)
    pad_id = pad_token_id(tokenizer)
    examples = sft_examples(config, tokenizer)
    sampler = PromptSampler(len(examples), seed=config.train.seed, shuffle=config.data.shuffle)
    sampler.next_indices(start_step * config.train.prompts_per_step)  # skip what a resumed run has seen
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    is_driver = dist.get_rank() == 0
    logger = (MetricsLogger(run_dir=config.train.output_dir, config=config.logging, run_config=to_dict(config),
                            max_steps=config.train.max_steps, start_step=start_step) if is_driver else None)
    log_every = max(1, config.train.max_steps // 20)
    for step in range(start_step + 1, config.train.max_steps + 1):
        indices = sampler.next_indices(config.train.prompts_per_step)
        mine = [examples[i] for i in indices][shard_rows(len(indices), rank=dp_rank, world=dp_size)]
        result = policy.forward_backward_step(sft_batch(mine, pad_id=pad_id), loss_name="sft",
                                              micro_batch_size=config.train.micro_batch_size)
        if logger is not None and (step % log_every == 0 or step == config.train.max_steps):
            logger.log(step, {"sft_loss": result.loss, "grad_norm": result.grad_norm, "lr": result.lr})

    hf_dir = Path(config.train.output_dir) / "hf"
    tensors = iter_hf_tensors(policy.chunks, arch=arch, all_stages=True)
    if is_driver:
        save_safetensors_atomic(tensors, hf_dir, copy_files_from=config.model.hf_path)
        logger.close()
        print(f"SFT model written to {hf_dir}")
    else:
        for _ in tensors:
            pass
    dist.barrier()
    return hf_dir
