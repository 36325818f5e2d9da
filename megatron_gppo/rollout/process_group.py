"""A process group for weight updates that lives beside the training groups.

The trainer already has its default group (Megatron's); the rollout servers
have none. Both sides join an extra group, the trainer as rank 0 and each
server's tensor-parallel workers at `rank_offset + i`, the way SGLang's
`init_custom_process_group` does (a TCP rendezvous at
`master_address:master_port`, keys prefixed with the group name), so a real
SGLang server and our CPU server can be on the other end.
"""

from __future__ import annotations

import inspect
from datetime import timedelta

import torch
import torch.distributed as dist


def init_weight_update_group(*, master_address: str, master_port: int, rank: int, world_size: int,
                             group_name: str, backend: str, timeout_s: float = 600.0) -> dist.ProcessGroup:
    """Join (rank 0 creates) a standalone process group; blocks until all `world_size` ranks arrive."""
    from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world

    if backend not in ("gloo", "nccl"):
        raise ValueError(f"weight update backend must be 'gloo' or 'nccl', got {backend!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    timeout = timedelta(seconds=timeout_s)
    # An explicit store, not `rendezvous("tcp://...")`: under torchrun that helper sees
    # TORCHELASTIC_USE_AGENT_STORE and makes rank 0 a client of a store nobody hosts.
    store = dist.TCPStore(master_address, master_port, world_size, is_master=rank == 0, timeout=timeout)
    store = PrefixStore(group_name, store)
    # The keyword for backend options was renamed across torch versions.
    options = "backend_options" if "backend_options" in inspect.signature(_new_process_group_helper).parameters \
        else "pg_options"
    group, _ = _new_process_group_helper(world_size, rank, [], Backend(backend), store, group_name=group_name,
                                         timeout=timeout, **{options: None})
    # Group rank == rank in this group; registering it lets dist.broadcast(group=...) map ranks.
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def destroy_weight_update_group(group: dist.ProcessGroup) -> None:
    dist.destroy_process_group(group)


def broadcast_from_trainer(tensors: list[torch.Tensor], *, group: dist.ProcessGroup) -> None:
    """Broadcast each tensor from rank 0 of `group`, in order (all ranks call this with matching tensors)."""
    handles = [dist.broadcast(t, group=group, group_src=0, async_op=True) for t in tensors]
    for handle in handles:
        handle.wait()


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> `bfloat16`, the spelling SGLang's `dtypes` field uses."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


__all__ = ["broadcast_from_trainer", "destroy_weight_update_group", "dtype_from_name", "dtype_name",
           "init_weight_update_group"]
