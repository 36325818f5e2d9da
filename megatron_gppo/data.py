"""Prompt datasets: loading, prompt templates and a seeded, resumable sampler.

Supported files: `.jsonl`, `.json` (a list of records), `.parquet`, and a
directory written by `datasets.Dataset.save_to_disk`. Each record needs the
prompt and answer fields named in `DataConfig`.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Prompt:
    """One training or evaluation prompt."""

    index: int
    """Position in its dataset (stable across runs; used for resumption)."""
    text: str
    """The prompt text before templating."""
    answer: str
    """Reference answer the reward checks against."""


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Read every record of a .jsonl / .json / .parquet file or a saved `datasets` directory."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset not found: {path}")
    if path.is_dir():
        import datasets

        try:
            return list(datasets.load_from_disk(str(path)))
        except FileNotFoundError:
            raise ValueError(f"{path}: a directory must be saved with datasets' save_to_disk") from None
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = []
        for line_number, line in enumerate(path.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{line_number}: not valid JSON ({err.msg})") from None
        return records
    if suffix == ".json":
        try:
            records = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of records")
        return records
    if suffix == ".parquet":
        import pyarrow.parquet

        return pyarrow.parquet.read_table(path).to_pylist()
    raise ValueError(f"{path}: unsupported dataset format '{suffix}'; use .jsonl, .json, .parquet or a datasets directory")


def load_prompts(path: str | Path, *, prompt_key: str = "prompt", answer_key: str = "answer") -> list[Prompt]:
    """Records of `path` as `Prompt`s; a record missing a key is an error naming it."""
    prompts = []
    for index, record in enumerate(load_records(path)):
        if not isinstance(record, dict):
            raise ValueError(f"{path}: record {index} is not an object")
        for key in (prompt_key, answer_key):
            if key not in record:
                raise ValueError(f"{path}: record {index} has no '{key}' field (fields: {', '.join(record)}); "
                                 f"set data.prompt_key / data.answer_key")
        prompts.append(Prompt(index=index, text=str(record[prompt_key]), answer=str(record[answer_key])))
    if not prompts:
        raise ValueError(f"{path}: no records")
    return prompts


def render_prompt(text: str, *, tokenizer: Any, template: str = "auto") -> str:
    """The string the policy sees: the tokenizer's chat template or the plain text.

    `template="auto"` uses the chat template when the tokenizer has one.
    """
    has_chat_template = bool(getattr(tokenizer, "chat_template", None))
    if template == "chat" and not has_chat_template:
        raise ValueError("data.prompt_template is 'chat' but the tokenizer has no chat template; use 'plain' or 'auto'")
    if template == "chat" or (template == "auto" and has_chat_template):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return text


def encode_prompt(text: str, *, tokenizer: Any, template: str = "auto") -> list[int]:
    """Token ids of the templated prompt.

    A chat template writes its own special tokens; plain text gets the
    tokenizer's (e.g. BOS) added.
    """
    rendered = render_prompt(text, tokenizer=tokenizer, template=template)
    plain = template == "plain" or not getattr(tokenizer, "chat_template", None)
    return tokenizer(rendered, add_special_tokens=plain)["input_ids"]


def pad_token_id(tokenizer: Any) -> int:
    """The id used to right-pad batches: the tokenizer's pad token, else its EOS."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


class PromptSampler:
    """Yields prompt indices in seeded, reshuffled epochs; resumable from `state_dict()`.

    The order of epoch `e` depends only on `(seed, e)`, so a resumed run sees
    exactly the prompts an uninterrupted run would.
    """

    def __init__(self, num_prompts: int, *, seed: int, shuffle: bool = True):
        if num_prompts < 1:
            raise ValueError("PromptSampler needs at least one prompt")
        self.num_prompts = num_prompts
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0

    def _order(self, epoch: int) -> list[int]:
        order = list(range(self.num_prompts))
        if self.shuffle:
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def next_indices(self, num: int) -> list[int]:
        """The next `num` prompt indices, crossing into new epochs as needed."""
        indices = []
        while len(indices) < num:
            order = self._order(self.epoch)
            take = min(num - len(indices), self.num_prompts - self.position)
            indices += order[self.position : self.position + take]
            self.position += take
            if self.position == self.num_prompts:
                self.epoch, self.position = self.epoch + 1, 0
        return indices

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "num_prompts": self.num_prompts, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["num_prompts"] != self.num_prompts:
            raise ValueError(f"the checkpoint's sampler covered {state['num_prompts']} prompts, "
                             f"the dataset now has {self.num_prompts}; resume with the same data.train_path")
        self.epoch, self.position = state["epoch"], state["position"]
