"""The batched generator in-process: exact log-probs under padding/merging, stop rules, abort."""

import pytest
import torch

from megatron_gppo.rollout.generator import Generator
from megatron_gppo.rollout.protocol import ParseContext, parse_generate
from tests._tiny_models import TEST_MAX_POSITIONS, load_model, reference_log_probs, save_test_model


@pytest.fixture(scope="module")
def model_and_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    path = save_test_model(tmp_path_factory.mktemp("tiny"))
    return load_model(path), AutoTokenizer.from_pretrained(path)


def _generator(model_and_tokenizer, **kwargs):
    model, tokenizer = model_and_tokenizer
    return Generator(model=model, tokenizer=tokenizer, context_length=TEST_MAX_POSITIONS, **kwargs)


def _run(generator, body, *, add_later=None, after_steps=2):
    """Submit `body`, optionally `add_later` after a few steps (joins a running batch); step to completion."""
    tokenizer = generator.tokenizer
    ctx = ParseContext(vocab_size=generator.vocab_size, context_length=TEST_MAX_POSITIONS, tokenizer=tokenizer)
    results = {}
    requests = [parse_generate(body, ctx).sequences]
    if add_later is not None:
        requests.append(parse_generate(add_later, ctx).sequences)
    for seq in requests[0]:
        generator.add(seq, lambda r, seq=seq: results.__setitem__(seq.rid, (seq, r)))
    steps = 0
    while generator.has_work() or len(requests) > 1:
        if steps == after_steps and len(requests) > 1:
            for seq in requests.pop():
                generator.add(seq, lambda r, seq=seq: results.__setitem__(seq.rid, (seq, r)))
        generator.step()
        steps += 1
    return results


def test_log_probs_match_an_unpadded_forward_with_merging_and_early_finish(model_and_tokenizer):
    model, _ = model_and_tokenizer
    generator = _generator(model_and_tokenizer, max_running=6)
    first = {"input_ids": [[3, 4, 5, 6, 7, 8, 9], [10, 11], [12]], "return_logprob": True,
             "sampling_params": [{"temperature": 0.7, "max_new_tokens": 12, "n": 2},
                                 {"temperature": 1.3, "top_p": 0.9, "max_new_tokens": 3, "n": 2},
                                 {"temperature": 0, "max_new_tokens": 9}]}
    later = {"input_ids": [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]], "return_logprob": True,
             "sampling_params": {"temperature": 0.9, "top_k": 5, "max_new_tokens": 7, "n": 3}}
    results = _run(generator, first, add_later=later, after_steps=3)
    assert len(results) == 2 + 2 + 1 + 3
    for seq, result in results.values():
        assert len(result.output_ids) == seq.max_new_tokens or result.finish_reason["type"] == "stop"
        expected = reference_log_probs(model, seq.prompt_ids, result.output_ids, temperature=seq.temperature)
        torch.testing.assert_close(torch.tensor(result.output_logprobs), expected, atol=1e-4, rtol=0)
    assert generator.num_running == 0 and generator._cache is None


def test_stop_token_stop_string_and_zero_tokens(model_and_tokenizer):
    generator = _generator(model_and_tokenizer)
    vocab = generator.vocab_size
    results = _run(generator, {"input_ids": [[3], [4], [5]], "rid": ["tok", "str", "none"], "sampling_params": [
        {"stop_token_ids": list(range(vocab)), "max_new_tokens": 5},
        {"stop": [c for c in "0123456789+-*=\\{}boxed "], "max_new_tokens": 20, "ignore_eos": True},
        {"max_new_tokens": 0}]})
    seq, result = results["tok"]
    assert result.finish_reason == {"type": "stop", "matched": result.output_ids[0]} and len(result.output_ids) == 1
    seq, result = results["str"]
    assert result.finish_reason["type"] == "stop" and isinstance(result.finish_reason["matched"], str)
    assert result.finish_reason["matched"] not in result.text  # trimmed from the text, kept in the tokens
    seq, result = results["none"]
    assert result.output_ids == [] and result.finish_reason == {"type": "length", "length": 0}


def test_abort_returns_partial_output(model_and_tokenizer):
    generator = _generator(model_and_tokenizer)
    ctx = ParseContext(vocab_size=generator.vocab_size, context_length=TEST_MAX_POSITIONS)
    results = {}
    for seq in parse_generate({"input_ids": [[3], [4]], "rid": ["keep", "drop"],
                               "sampling_params": {"max_new_tokens": 30, "ignore_eos": True}}, ctx).sequences:
        generator.add(seq, lambda r, seq=seq: results.__setitem__(seq.rid, r))
    for _ in range(4):
        generator.step()
    assert generator.abort(rid_prefix="dr") == 1
    while generator.has_work():
        generator.step()
    assert results["drop"].finish_reason["type"] == "abort" and 0 < len(results["drop"].output_ids) < 30
    assert results["keep"].finish_reason == {"type": "length", "length": 30}


def test_seeded_requests_sample_the_same_tokens_whatever_shares_the_batch(model_and_tokenizer):
    seeded = {"input_ids": [3, 4, 5], "rid": "seeded", "return_logprob": True,
              "sampling_params": {"temperature": 1.0, "max_new_tokens": 10, "sampling_seed": 1234, "ignore_eos": True}}
    alone = _run(_generator(model_and_tokenizer, seed=1), seeded)["seeded"][1]
    crowd = {"input_ids": [[9, 8, 7, 6], [5]], "sampling_params": {"max_new_tokens": 10, "n": 3}}
    crowded = _run(_generator(model_and_tokenizer, seed=2), crowd, add_later=seeded, after_steps=1)["seeded"][1]
    assert crowded.output_ids == alone.output_ids
    torch.testing.assert_close(torch.tensor(crowded.output_logprobs), torch.tensor(alone.output_logprobs),
                               atol=1e-5, rtol=0)
    other_seed = {**seeded, "sampling_params": {**seeded["sampling_params"], "sampling_seed": 99}}
    assert _run(_generator(model_and_tokenizer, seed=1), other_seed)["seeded"][1].output_ids != alone.output_ids
