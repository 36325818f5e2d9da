"""`tensor` weight sync (colocated GPU): CUDA IPC handles through /update_weights_from_tensor.

The server is `megatron-gppo serve` on the same machine; it opens the IPC
handles (so it must see the same GPU) and copies the tensors to its model.
"""

import copy

import pytest
import torch

from megatron_gppo.rollout.client import SGLangClient
from megatron_gppo.rollout.engine import SamplingParams
from megatron_gppo.rollout.local_servers import LocalServers
from megatron_gppo.rollout.weight_sync import TensorWeightSync
from tests._tiny_models import load_model, perturbed, reference_log_probs, save_test_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="tensor weight sync needs a CUDA device")]


def test_tensor_sync_through_cuda_ipc(tmp_path):
    model_dir = save_test_model(tmp_path / "tiny")
    original = load_model(model_dir)
    new = perturbed(copy.deepcopy(original), seed=1)
    with LocalServers(model_path=model_dir, num_servers=1, log_dir=tmp_path / "logs") as servers:
        client = SGLangClient(server_urls=servers.urls, progress=False)
        on_gpu = [(name, param.detach().cuda()) for name, param in new.named_parameters()]
        stats = TensorWeightSync(client=client, bucket_bytes=64 * 1024).sync(on_gpu, version="gpu-1")
        assert stats.num_buckets > 1 and stats.num_tensors == len(on_gpu)
        assert client.weight_versions() == {servers.urls[0]: "gpu-1"}
        samples = client.generate([[3, 4, 5]], sampling=SamplingParams(temperature=0.9, max_new_tokens=10), n=3)
        for sample in samples[0]:
            assert sample.weight_version == "gpu-1"
            expected = reference_log_probs(new, sample.prompt_ids, sample.response_ids, temperature=0.9)
            torch.testing.assert_close(torch.tensor(sample.rollout_log_probs), expected, atol=1e-4, rtol=0)
        client.close()
