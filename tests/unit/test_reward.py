"""Math reward: boxed extraction, math-verify equivalence, format penalty, worker pool."""

import pytest

from megatron_gppo.reward.math import MathReward, last_boxed, score_math


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{42}.", "42"),
        ("\\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("first \\boxed{7} then broken \\boxed{8", "7"),
        ("no answer here", None),
        ("\\boxed{}", ""),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize(
    "response, answer, expected",
    [
        ("The sum is \\boxed{42}", "42", 1.0),
        ("\\boxed{41}", "42", 0.0),
        ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
        ("\\boxed{0.5}", "\\frac12", 1.0),
        ("\\boxed{12} wait, \\boxed{13}", "13", 1.0),
        ("\\boxed{13} wait, \\boxed{12}", "13", 0.0),
    ],
)
def test_score_math(response, answer, expected):
    assert score_math(response, answer) == expected


def test_format_penalty_applies_only_without_a_boxed_answer():
    assert score_math("42", "42", format_penalty=0.5) == -0.5
    assert score_math("\\boxed{41}", "42", format_penalty=0.5) == 0.0


def test_pool_matches_inline_scoring():
    responses = ["\\boxed{3}", "\\boxed{4}", "none", "\\boxed{2+2}"]
    answers = ["3", "5", "1", "4"]
    inline = MathReward(num_workers=0, format_penalty=0.1)(responses, answers)
    with MathReward(num_workers=2, format_penalty=0.1) as reward:
        pooled = reward(responses, answers)
    assert pooled == inline == [1.0, 0.0, -0.1, 1.0]


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_workers"):
        MathReward(num_workers=-1)
    with pytest.raises(ValueError, match="timeout_s"):
        MathReward(timeout_s=0)
