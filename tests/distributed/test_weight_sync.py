"""Weight sync to real `megatron-gppo serve` processes: this test is the trainer (rank 0 of a gloo group).

After a `distributed` sync (bucketed and per-tensor), a `disk` sync or a `tensor` sync,
generation log-probs equal a forward of the new weights, not the old, and
every server reports the new weight version.
"""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_gppo.rollout.client import RolloutError, SGLangClient
from megatron_gppo.rollout.engine import SamplingParams
from megatron_gppo.rollout.local_servers import LocalServers
from megatron_gppo.rollout.weight_sync import DiskWeightSync, DistributedWeightSync, TensorWeightSync
from tests._tiny_models import load_model, perturbed, reference_log_probs, save_test_model

pytestmark = pytest.mark.distributed

PROMPTS = [[3, 4, 5, 6], [7, 8]]
TEMPERATURE = 0.8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_test_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def servers(model_dir, tmp_path_factory):
    with LocalServers(model_path=model_dir, num_servers=2, num_threads=1,
                      log_dir=tmp_path_factory.mktemp("logs")) as running:
        yield running


@pytest.fixture(scope="module")
def original(model_dir):
    return load_model(model_dir)


def variant(original, seed):
    return perturbed(copy.deepcopy(original), seed=seed)


@pytest.fixture
def client(servers):
    client = SGLangClient(server_urls=servers.urls, progress=False)
    yield client
    client.close()


def assert_served_by(client, model, *, version, other=None):
    """Every server answers with `version`, and log-probs of `model` (and not of `other`)."""
    assert set(client.weight_versions().values()) == {version}
    samples = client.generate(PROMPTS, sampling=SamplingParams(temperature=TEMPERATURE, max_new_tokens=12), n=4)
    servers_seen = set()
    for group in samples:
        for sample in group:
            assert sample.weight_version == version
            got = torch.tensor(sample.rollout_log_probs)
            expected = reference_log_probs(model, sample.prompt_ids, sample.response_ids, temperature=TEMPERATURE)
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
            if other is not None:
                stale = reference_log_probs(other, sample.prompt_ids, sample.response_ids, temperature=TEMPERATURE)
                assert (got - stale).abs().max() > 1e-2
            servers_seen.add(sample.metadata["server_url"])
    assert servers_seen == set(client.server_urls)


@pytest.mark.parametrize("bucket_bytes", [64 * 1024, 1], ids=["bucketed", "per-tensor"])
def test_distributed_sync(client, original, bucket_bytes):
    sync = DistributedWeightSync(client=client, bucket_bytes=bucket_bytes, backend="gloo")
    try:
        first = variant(original, 1)
        stats = sync.sync(first.named_parameters(), version="1")
        num_params = len(list(first.named_parameters()))
        assert stats.num_tensors == num_params and stats.num_bytes == sum(
            p.numel() * p.element_size() for p in first.parameters())
        assert stats.num_buckets == (num_params if bucket_bytes == 1 else stats.num_buckets) > 1
        assert_served_by(client, first, version="1", other=original)

        second = variant(original, 2)  # the same group carries the next step
        sync.sync(second.named_parameters(), version="2")
        assert_served_by(client, second, version="2", other=first)
    finally:
        sync.close()
        restore = DistributedWeightSync(client=client, bucket_bytes=1 << 30)
        restore.sync(original.named_parameters(), version="default")
        restore.close()


def test_disk_sync_is_atomic_and_sharded(client, original, model_dir, tmp_path):
    sync = DiskWeightSync(client=client, output_dir=tmp_path / "dumps", shard_bytes=100_000,
                          copy_files_from=model_dir, keep_last=1)
    first = variant(original, 3)
    stats = sync.sync(first.named_parameters(), version="disk-1")
    dump = tmp_path / "dumps" / "weights-disk-1"
    assert (dump / "model.safetensors.index.json").is_file() and (dump / "config.json").is_file()
    assert len(list(dump.glob("model-*-of-*.safetensors"))) > 1
    assert stats.num_tensors == len(list(first.named_parameters()))
    assert_served_by(client, first, version="disk-1", other=original)

    second = variant(original, 4)
    sync.sync(second.named_parameters(), version="disk-2")
    assert_served_by(client, second, version="disk-2", other=first)
    # Only the latest dump is kept, and no temporary directory is left behind.
    assert sorted(p.name for p in (tmp_path / "dumps").iterdir()) == ["weights-disk-2"]
    restore = DiskWeightSync(client=client, output_dir=tmp_path / "restore")
    restore.sync(original.named_parameters(), version="default")


def test_tensor_sync_through_shared_memory(client, original):
    """`tensor` on CPU: colocated servers open the trainer's shared-memory tensors, bucket by bucket."""
    changed = variant(original, 6)
    sync = TensorWeightSync(client=client, bucket_bytes=64 * 1024)
    stats = sync.sync(changed.named_parameters(), version="tensor-1")
    assert stats.num_buckets > 1 and stats.num_tensors == len(list(changed.named_parameters()))
    assert_served_by(client, changed, version="tensor-1", other=original)
    sync.sync(original.named_parameters(), version="default")


def test_bad_update_is_refused_and_the_next_one_lands_on_a_new_group(client, original):
    sync = DistributedWeightSync(client=client, bucket_bytes=1 << 20)
    try:
        bad = [("model.embed_tokens.weight", torch.zeros(original.model.embed_tokens.weight.shape)),
               ("model.not_a_layer.weight", torch.zeros(3))]
        with pytest.raises(RolloutError, match="no parameter named"):
            sync.sync(bad, version="bad")
        # Whether the old group survived cannot be told from the trainer's side (NCCL), so it is replaced.
        assert sync.group is None
        assert_served_by(client, original, version="default")  # nothing of the bad bucket was loaded
        changed = variant(original, 5)
        sync.sync(changed.named_parameters(), version="after-bad")
        assert_served_by(client, changed, version="after-bad", other=original)
        sync.sync(original.named_parameters(), version="default")
    finally:
        sync.close()


def test_a_group_left_on_the_servers_is_replaced(client, original):
    """A trainer that died without closing leaves its group on the servers; the next one still connects."""
    dead = DistributedWeightSync(client=client)
    dead.connect()
    fresh = DistributedWeightSync(client=client)
    try:
        fresh.sync(original.named_parameters(), version="default")
        assert_served_by(client, original, version="default")
    finally:
        fresh.close()


def test_sync_from_rank_0_of_a_training_group(client, original, model_dir):
    """The trainer already has its default (Megatron) group; the weight-update group lives beside it."""
    worker = Path(__file__).with_name("_weight_sync_worker.py")
    url = client.server_urls[0]
    result = subprocess.run([sys.executable, str(worker), url, str(model_dir)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "OK w2" in result.stdout, result.stderr[-3000:]
    restore = DistributedWeightSync(client=client, bucket_bytes=1 << 30)
    restore.sync(original.named_parameters(), version="default")
    restore.close()
