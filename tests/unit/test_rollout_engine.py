"""The trainer-facing rollout engine, built from the config: local servers, generate, update weights."""

import copy

import pytest
import torch

from megatron_gppo.config import RolloutConfig
from megatron_gppo.rollout.engine import SamplingParams
from megatron_gppo.rollout.sglang_engine import SGLangEngine
from tests._tiny_models import load_model, perturbed, reference_log_probs, save_test_model


def test_sampling_params_from_config_and_wire_format():
    config = RolloutConfig(temperature=0.6, top_p=0.9, top_k=20, max_new_tokens=99)
    params = SamplingParams.from_config(config, stop=("</s>",), extra={"min_p": 0.1})
    assert params.to_sglang() == {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "max_new_tokens": 99,
                                  "stop": ["</s>"], "min_p": 0.1}
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


@pytest.mark.parametrize("weight_sync", ["distributed", "disk"])
def test_local_engine_generates_and_takes_new_weights(tmp_path, weight_sync):
    model_dir = save_test_model(tmp_path / "tiny")
    config = RolloutConfig(backend="local", num_local_servers=1, weight_sync=weight_sync, weight_sync_bucket_mb=1,
                           temperature=0.9, max_new_tokens=8, num_samples_per_prompt=3)
    with SGLangEngine.from_config(config, model_path=model_dir, work_dir=tmp_path / "rollout", progress=False,
                                  num_threads=1) as engine:
        assert all(engine.health().values())
        sampling = SamplingParams.from_config(config)
        samples = engine.generate([[3, 4], [5]], sampling=sampling, n=config.num_samples_per_prompt)
        assert [len(group) for group in samples] == [3, 3]
        assert {s.weight_version for group in samples for s in group} == {"default"}

        new = perturbed(copy.deepcopy(load_model(model_dir)), seed=7)
        engine.update_weights(new.named_parameters(), version="1")
        assert set(engine.weight_versions().values()) == {"1"}
        for sample in engine.generate([[3, 4]], sampling=sampling, n=2)[0]:
            assert sample.weight_version == "1"
            expected = reference_log_probs(new, sample.prompt_ids, sample.response_ids, temperature=0.9)
            torch.testing.assert_close(torch.tensor(sample.rollout_log_probs), expected, atol=1e-4, rtol=0)
        engine.pause()
        engine.resume()
        engine.release_memory()
        engine.resume_memory()
        processes = engine.local_servers.processes
    assert all(process.poll() is not None for process in processes)  # close() stopped the servers
