"""The SGLang /generate wire format: request validation, n/batch expansion, responses and samples."""

import pytest

from megatron_gppo.rollout.protocol import (ParseContext, SequenceResult, build_response, generate_payload,
                                            parse_generate, response_to_sample)

CTX = ParseContext(vocab_size=32, context_length=512)


def test_single_prompt_with_n_expands_to_one_sequence_per_sample():
    request = parse_generate({"input_ids": [1, 2, 3], "rid": "abc", "return_logprob": True,
                              "sampling_params": {"n": 3, "temperature": 0.5, "max_new_tokens": 4}}, CTX)
    assert request.returns_list
    assert [s.rid for s in request.sequences] == ["abc_0", "abc_1", "abc_2"]
    assert all(s.prompt_ids == [1, 2, 3] and s.temperature == 0.5 and s.return_logprob for s in request.sequences)


def test_batch_takes_per_item_params_and_router_extras_are_ignored():
    body = {"input_ids": [[1], [2, 3]], "rid": ["a", "b"], "return_logprob": [True, False],
            "sampling_params": [{"max_new_tokens": 2}, {"max_new_tokens": 5, "stop_token_ids": [7]}],
            # what sglang-router adds when it forwards a request
            "model": "m", "return_text_in_logprobs": False, "log_metrics": True, "return_hidden_states": False,
            "background": False, "no_logs": False, "return_bytes": False, "return_entropy": False}
    request = parse_generate(body, CTX)
    first, second = request.sequences
    assert (first.rid, first.max_new_tokens, first.return_logprob) == ("a", 2, True)
    assert (second.rid, second.max_new_tokens, second.stop_token_ids) == ("b", 5, frozenset({7}))
    assert request.returns_list


def test_single_request_answers_an_object_and_greedy_becomes_top_k_one():
    request = parse_generate({"input_ids": [4], "sampling_params": {"temperature": 0}}, CTX)
    (seq,) = request.sequences
    assert not request.returns_list
    assert (seq.temperature, seq.top_k, seq.max_new_tokens) == (1.0, 1, 128)


@pytest.mark.parametrize("body, message", [
    ({"sampling_params": {}}, "exactly one of 'text' or 'input_ids'"),
    ({"input_ids": [1], "text": "x"}, "exactly one of"),
    ({"input_ids": []}, "non-empty list"),
    ({"input_ids": [1, "a"]}, "must hold integers"),
    ({"input_ids": [[1], []]}, "prompt 1 is empty"),
    ({"input_ids": [40]}, "outside [0, 32)"),
    ({"text": "hello"}, "needs a tokenizer"),
    ({"input_ids": [1], "sampling_params": {"temperature": -0.1}}, "temperature must be >= 0"),
    ({"input_ids": [1], "sampling_params": {"top_p": 0}}, "top_p must be in (0, 1]"),
    ({"input_ids": [1], "sampling_params": {"top_k": 0}}, "top_k must be -1"),
    ({"input_ids": [1], "sampling_params": {"max_new_tokens": -1}}, "max_new_tokens must be at least 0"),
    ({"input_ids": [1], "sampling_params": {"max_new_tokens": 1.5}}, "must be an integer"),
    ({"input_ids": [1], "sampling_params": {"n": 0}}, "n must be at least 1"),
    ({"input_ids": [1], "sampling_params": {"temperature": "hot"}}, "finite number"),
    ({"input_ids": [1], "sampling_params": {"tempreature": 1}}, "unknown sampling_params: tempreature"),
    ({"input_ids": [1], "sampling_params": {"frequency_penalty": 0.5}}, "not supported"),
    ({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 511}}, "context length 512"),
    ({"input_ids": [[1], [2]], "sampling_params": [{}]}, "1 entries for a batch of 2"),
    ({"input_ids": [1], "sampling_params": {"stop_token_ids": "7"}}, "list of integers"),
    ({"input_ids": [1], "return_logprob": "yes"}, "true or false"),
    ([1, 2], "JSON object"),
])
def test_bad_requests_raise_value_error(body, message):
    with pytest.raises(ValueError) as err:
        parse_generate(body, CTX)
    assert message in str(err.value)


def test_response_round_trips_into_a_sample():
    (seq,) = parse_generate(generate_payload(prompt_ids=[1, 2], sampling_params={"max_new_tokens": 3}, rid="r"),
                            CTX).sequences
    result = SequenceResult(output_ids=[5, 6, 2], output_logprobs=[-0.1, -0.2, -0.3], output_top_logprobs=[],
                            finish_reason={"type": "stop", "matched": 2}, weight_version="7", text="ab",
                            e2e_latency=0.01)
    answer = build_response(seq, result)
    assert answer["meta_info"]["output_token_logprobs"] == [[-0.1, 5, None], [-0.2, 6, None], [-0.3, 2, None]]
    assert answer["meta_info"]["id"] == "r" and answer["meta_info"]["completion_tokens"] == 3
    sample = response_to_sample(answer, prompt_ids=[1, 2], group_index=4, sample_index=1)
    assert (sample.response_ids, sample.rollout_log_probs) == ([5, 6, 2], [-0.1, -0.2, -0.3])
    assert (sample.finish_reason, sample.weight_version, sample.group_index, sample.sample_index) == ("stop", "7", 4, 1)


def test_response_without_log_probs_is_rejected():
    with pytest.raises(ValueError, match="log-probs"):
        response_to_sample({"text": "x", "meta_info": {"finish_reason": {"type": "stop"}}}, prompt_ids=[1],
                           group_index=0, sample_index=0)
    bad = {"output_ids": [1, 2], "meta_info": {"finish_reason": {"type": "length"},
                                               "output_token_logprobs": [[-1.0, 1, None], [-1.0, 3, None]]}}
    with pytest.raises(ValueError, match="disagree"):
        response_to_sample(bad, prompt_ids=[1], group_index=0, sample_index=0)
