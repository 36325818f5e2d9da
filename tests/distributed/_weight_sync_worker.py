"""Trainer ranks with their own default gloo group; rank 0 also syncs weights to a server.

Run as `python _weight_sync_worker.py SERVER_URL MODEL_DIR`: spawns 2 ranks and
prints `OK <version>` when rank 0's syncs landed and the default group still works.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402


def rank_main(rank: int, port: int, url: str, model_dir: str) -> None:
    from megatron_gppo.rollout.client import SGLangClient
    from megatron_gppo.rollout.weight_sync import DistributedWeightSync
    from tests._tiny_models import load_model, perturbed

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    if rank == 0:
        client = SGLangClient(server_urls=[url], progress=False)
        sync = DistributedWeightSync(client=client, bucket_bytes=64 * 1024)
        model = perturbed(load_model(model_dir), seed=11)
        for version in ("w1", "w2"):
            sync.sync(model.named_parameters(), version=version)
        sync.close()
        assert client.weight_versions() == {url: "w2"}
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)  # the training group is untouched by the weight-update group
    assert total.item() == 3.0
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        print("OK w2", flush=True)


if __name__ == "__main__":
    from megatron_gppo.ports import free_port

    mp.spawn(rank_main, args=(free_port(), sys.argv[1], sys.argv[2]), nprocs=2)
