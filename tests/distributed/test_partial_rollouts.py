"""Partial rollouts: a response aborted by a weight sync is continued on the new weights.

A real `serve` process and the real client: a long generation is caught
mid-way, generation is paused with `abort` (what the engine does before every
weight update), new weights land, generation continues. The client resubmits
prompt + prefix, and the sample it returns is the prefix followed by the
continuation: its version spans say which tokens each weight version made,
and every rollout log-prob is that version's (a forward of the old model on
the prefix, of the new one on the rest).
"""

from __future__ import annotations

import copy
import threading
import time

import pytest
import requests
import torch

from megatron_gppo.rollout.client import SGLangClient
from megatron_gppo.rollout.engine import SamplingParams
from megatron_gppo.rollout.local_servers import LocalServers
from megatron_gppo.rollout.weight_sync import DiskWeightSync
from megatron_gppo.types import Sample
from tests._tiny_models import load_model, perturbed, reference_log_probs, save_test_model

pytestmark = pytest.mark.distributed

PROMPT = [3, 4, 5]
TEMPERATURE = 0.9
MAX_NEW_TOKENS = 240


def _num_running(url: str) -> int:
    return requests.get(f"{url}/server_info", timeout=10).json()["internal_states"][0]["num_running_reqs"]


def test_a_response_cut_by_a_weight_sync_continues_on_the_new_weights(tmp_path):
    model_dir = save_test_model(tmp_path / "tiny")
    old = load_model(model_dir)
    new = perturbed(copy.deepcopy(old), seed=3)
    with LocalServers(model_path=model_dir, num_threads=1, log_dir=tmp_path / "logs") as servers:
        url = servers.urls[0]
        client = SGLangClient(server_urls=servers.urls, progress=False)
        client.continue_aborted = True
        sync = DiskWeightSync(client=client, output_dir=tmp_path / "weights", copy_files_from=model_dir)
        sampling = SamplingParams(temperature=TEMPERATURE, max_new_tokens=MAX_NEW_TOKENS, ignore_eos=True, seed=7)
        try:
            results: list = []
            generating = threading.Thread(target=lambda: results.append(client.generate([PROMPT], sampling=sampling)))
            generating.start()
            deadline = time.monotonic() + 60
            while not _num_running(url):
                assert time.monotonic() < deadline and generating.is_alive(), "the generation never started"
                time.sleep(0.002)
            time.sleep(0.05)  # let it make some tokens on the old weights
            client.pause(mode="abort")
            client.flush_cache()
            sync.sync(new.named_parameters(), version="v1")
            client.resume()
            generating.join(timeout=120)
        finally:
            client.close()
    (sample,) = results[0][0]
    assert sample.response_length == MAX_NEW_TOKENS and sample.finish_reason == "length"
    assert [span["version"] for span in sample.weight_versions] == ["default", "v1"], sample.weight_versions
    cut = sample.weight_versions[0]["end"]
    assert 0 < cut < MAX_NEW_TOKENS and sample.weight_versions[1] == {"version": "v1", "start": cut,
                                                                       "end": MAX_NEW_TOKENS}
    logged = torch.tensor(sample.rollout_log_probs)
    expected = torch.cat([reference_log_probs(old, PROMPT, sample.response_ids, temperature=TEMPERATURE)[:cut],
                          reference_log_probs(new, PROMPT, sample.response_ids, temperature=TEMPERATURE)[cut:]])
    torch.testing.assert_close(logged, expected, atol=1e-4, rtol=0)
    assert sample.versions == ["default", "v1"] and sample.weight_version == "v1"


def test_joining_a_continuation_offsets_its_spans_and_merges_equal_neighbours():
    def part(ids, spans, version):
        return Sample(group_index=0, sample_index=0, prompt_ids=[1], response_ids=ids,
                      rollout_log_probs=[-0.5] * len(ids), finish_reason="abort" if version == "a" else "stop",
                      weight_version=version, weight_versions=spans, response_text="x" * len(ids))
    first = part([5, 6], [{"version": "a", "start": 0, "end": 2}], "a")
    joined = first.continued_by(part([7, 8, 9], [{"version": "a", "start": 0, "end": 1},
                                                 {"version": "b", "start": 1, "end": 3}], "b"))
    assert joined.response_ids == [5, 6, 7, 8, 9] and joined.finish_reason == "stop"
    assert joined.weight_versions == [{"version": "a", "start": 0, "end": 3}, {"version": "b", "start": 3, "end": 5}]
    assert joined.versions == ["a", "b"] and joined.response_text == "xxxxx" and len(joined.rollout_log_probs) == 5
