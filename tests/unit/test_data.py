"""Prompt loading in every supported format, templates, and the resumable sampler."""

import json

import pytest

from megatron_gppo.data import PromptSampler, encode_prompt, load_prompts, pad_token_id, render_prompt

RECORDS = [{"prompt": f"{i}+1=", "answer": str(i + 1), "extra": i} for i in range(5)]


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def test_formats_load_the_same_prompts(tmp_path):
    import datasets
    import pyarrow
    import pyarrow.parquet

    jsonl = write_jsonl(tmp_path / "p.jsonl", RECORDS)
    as_json = tmp_path / "p.json"
    as_json.write_text(json.dumps(RECORDS))
    parquet = tmp_path / "p.parquet"
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(RECORDS), parquet)
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(RECORDS).save_to_disk(str(saved))
    loaded = [load_prompts(p) for p in (jsonl, as_json, parquet, saved)]
    assert all(prompts == loaded[0] for prompts in loaded)
    assert [(p.index, p.text, p.answer) for p in loaded[0]][:2] == [(0, "0+1=", "1"), (1, "1+1=", "2")]


def test_custom_keys_and_clear_errors(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "a", "solution": "b"}])
    assert load_prompts(path, prompt_key="question", answer_key="solution")[0].answer == "b"
    with pytest.raises(ValueError, match=r"record 0 has no 'prompt' field \(fields: question, solution\)"):
        load_prompts(path)
    with pytest.raises(FileNotFoundError, match="dataset not found"):
        load_prompts(tmp_path / "missing.jsonl")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "x", "answer": "y"}\n{oops\n')
    with pytest.raises(ValueError, match=r"broken.jsonl:2: not valid JSON"):
        load_prompts(broken)
    with pytest.raises(ValueError, match="unsupported dataset format '.csv'"):
        load_prompts(write_jsonl(tmp_path / "x.csv", RECORDS))


class _ChatTokenizer:
    chat_template = "{{ messages }}"

    def apply_chat_template(self, messages, *, tokenize, add_generation_prompt):
        assert not tokenize and add_generation_prompt
        return f"<user>{messages[0]['content']}<assistant>"


class _PlainTokenizer:
    chat_template = None


def test_templates():
    assert render_prompt("2+2=", tokenizer=_ChatTokenizer()) == "<user>2+2=<assistant>"
    assert render_prompt("2+2=", tokenizer=_ChatTokenizer(), template="plain") == "2+2="
    assert render_prompt("2+2=", tokenizer=_PlainTokenizer()) == "2+2="
    with pytest.raises(ValueError, match="no chat template"):
        render_prompt("2+2=", tokenizer=_PlainTokenizer(), template="chat")


def test_sampler_covers_each_epoch_and_resumes_exactly():
    sampler = PromptSampler(7, seed=3)
    first_epoch = sampler.next_indices(7)
    assert sorted(first_epoch) == list(range(7)) and first_epoch != list(range(7))
    reference = PromptSampler(7, seed=3)
    stream = [reference.next_indices(3) for _ in range(6)]
    resumed_from = PromptSampler(7, seed=3)
    for batch in stream[:2]:
        assert resumed_from.next_indices(3) == batch
    state = json.loads(json.dumps(resumed_from.state_dict()))
    resumed = PromptSampler(7, seed=3)
    resumed.load_state_dict(state)
    assert [resumed.next_indices(3) for _ in range(4)] == stream[2:]
    assert PromptSampler(7, seed=4).next_indices(7) != first_epoch
    with pytest.raises(ValueError, match="the dataset now has 8"):
        PromptSampler(8, seed=3).load_state_dict(state)


def test_encode_prompt_adds_special_tokens_only_to_plain_text():
    class Tokenizer(_ChatTokenizer):
        pad_token_id, eos_token_id = None, 2

        def __call__(self, text, *, add_special_tokens):
            return {"input_ids": ([1] if add_special_tokens else []) + [ord(c) for c in text]}

    tokenizer = Tokenizer()
    assert encode_prompt("ab", tokenizer=tokenizer, template="plain") == [1, 97, 98]
    assert encode_prompt("ab", tokenizer=tokenizer) == [ord(c) for c in "<user>ab<assistant>"]
    assert pad_token_id(tokenizer) == 2
