"""A verifiable arithmetic task: `a+b=` prompts answered with `\\boxed{a+b}`.

Train and held-out problems are disjoint `(a, b)` pairs drawn with a seed, so
the demo needs no download and measures generalisation, not memorisation.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from megatron_gppo.atomic import write_text_atomic


def problem(a: int, b: int) -> dict[str, str]:
    """One record: the prompt, the reference answer and the ideal response."""
    return {"prompt": f"{a}+{b}=", "answer": str(a + b), "response": f"\\boxed{{{a + b}}}"}


def split_problems(*, num_train: int, num_eval: int, max_operand: int = 99, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Disjoint train / held-out problems with operands in [0, max_operand]."""
    pairs = [(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)]
    if num_train + num_eval > len(pairs):
        raise ValueError(f"only {len(pairs)} distinct problems with max_operand={max_operand}; "
                         f"asked for {num_train} + {num_eval}")
    random.Random(seed).shuffle(pairs)
    held_out = pairs[:num_eval]
    train = pairs[num_eval : num_eval + num_train]
    return [problem(a, b) for a, b in train], [problem(a, b) for a, b in held_out]


def write_jsonl(records: list[dict], path: str | Path) -> Path:
    """Write records atomically (temporary name, then rename)."""
    return write_text_atomic(path, "".join(json.dumps(record) + "\n" for record in records))
