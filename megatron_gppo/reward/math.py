"""Math answer reward: the last `\\boxed{...}` of a response, checked with math-verify.

Rewards are computed in worker processes so a pathological answer (sympy can
take minutes on some expressions) costs at most its timeout and never stalls
the trainer; math-verify's own timeouts are signal based and work there
because each worker runs the check on its main thread.
"""

from __future__ import annotations

import math
import multiprocessing
import warnings
from dataclasses import dataclass

BOXED = "\\boxed"


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` in `text` (nested braces allowed), or None."""
    start = text.rfind(BOXED + "{")
    while start != -1:
        depth = 0
        for end in range(start + len(BOXED), len(text)):
            if text[end] == "{":
                depth += 1
            elif text[end] == "}":
                depth -= 1
                if depth == 0:
                    return text[start + len(BOXED) + 1 : end]
        # Unclosed: an earlier, complete \boxed{} may still count.
        start = text.rfind(BOXED + "{", 0, start)
    return None


def score_math(response: str, answer: str, *, format_penalty: float = 0.0, timeout_s: float | None = 5.0) -> float:
    """1.0 when the last boxed answer of `response` equals `answer`, else 0.0.

    A response without a complete `\\boxed{}` scores `-format_penalty`.
    `timeout_s=None` disables math-verify's signal-based timeouts (needed off
    the main thread).
    """
    from math_verify import parse, verify

    predicted = last_boxed(response)
    if predicted is None:
        return -format_penalty
    seconds = None if timeout_s is None else max(1, math.ceil(timeout_s))
    gold = parse(answer if BOXED in answer else f"{BOXED}{{{answer}}}", parsing_timeout=seconds)
    target = parse(f"{BOXED}{{{predicted}}}", parsing_timeout=seconds)
    if not gold or not target:
        return 0.0
    return 1.0 if verify(gold, target, timeout_seconds=seconds) else 0.0


def _score_in_worker(job: tuple[str, str, float, float]) -> float:
    response, answer, format_penalty, timeout_s = job
    return score_math(response, answer, format_penalty=format_penalty, timeout_s=timeout_s)


@dataclass
class RewardStats:
    num_scored: int = 0
    num_timeouts: int = 0


class MathReward:
    """Scores batches of responses in a pool of `num_workers` processes.

    `num_workers=0` scores in this process (no timeout enforcement beyond
    math-verify's own, which needs the main thread).
    """

    def __init__(self, *, num_workers: int = 2, timeout_s: float = 5.0, format_penalty: float = 0.0):
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.num_workers = num_workers
        self.timeout_s = timeout_s
        self.format_penalty = format_penalty
        self.stats = RewardStats()
        self._pool = None

    def __call__(self, responses: list[str], answers: list[str]) -> list[float]:
        """Rewards for `responses[i]` against `answers[i]`; a timed-out sample scores 0."""
        assert len(responses) == len(answers)
        jobs = [(r, a, self.format_penalty, self.timeout_s) for r, a in zip(responses, answers)]
        self.stats.num_scored += len(jobs)
        if self.num_workers == 0:
            return [_score_in_worker(job) for job in jobs]
        pool = self._get_pool()
        pending = [pool.apply_async(_score_in_worker, (job,)) for job in jobs]
        # Jobs queue behind each other, so the budget grows with the rounds
        # the pool needs; the slack covers process scheduling.
        rounds = math.ceil(len(jobs) / self.num_workers)
        deadline_s = self.timeout_s * (rounds + 1) + 5.0
        rewards, stuck = [], False
        for result in pending:
            try:
                rewards.append(result.get(timeout=0.01 if stuck else deadline_s))
            except multiprocessing.TimeoutError:
                stuck = True
                rewards.append(0.0)
                self.stats.num_timeouts += 1
        if stuck:
            warnings.warn(f"reward: {self.stats.num_timeouts} sample(s) timed out and scored 0; restarting the pool")
            self.close()
        return rewards

    def _get_pool(self):
        if self._pool is None:
            # spawn: workers must not inherit the trainer's threads or process groups.
            self._pool = multiprocessing.get_context("spawn").Pool(self.num_workers)
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def __enter__(self) -> "MathReward":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
