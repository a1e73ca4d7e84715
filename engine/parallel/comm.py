"""Collective helpers shared by the attention, sharding and CFG code.

They call torch's functional collectives (torch.ops._c10d_functional: a new output tensor, then an explicit
wait_tensor) instead of the in-place torch.distributed calls, so that torch.compile traces them into the compiled
block as graph nodes: the in-place point-to-point ops (batch_isend_irecv) break the graph, and every break splits a
block into pieces that run eagerly in between. The split of issuing and waiting also lets the ring start the next
K/V exchange before it computes on the current block. The same bytes move as with the in-place calls, so results
are bitwise the same (tests/test_parallel_comm.py).

`group` is a group name (what Axis.group_name holds; cheapest to trace), a ProcessGroup, or None for the default
group."""
from __future__ import annotations

import torch
import torch.distributed as dist

_ops = torch.ops._c10d_functional


def group_name(group) -> str:
    if isinstance(group, str):
        return group
    return (dist.group.WORLD if group is None else group).group_name


def wait(x: torch.Tensor) -> torch.Tensor:
    """The result of a started collective, once it has arrived (on CUDA: the current stream waits for it)."""
    return _ops.wait_tensor(x)


def all_gather_stacked(x: torch.Tensor, group, size: int) -> torch.Tensor:
    """(...) on each of `size` ranks -> (size, ...) on all of them, in group-rank order. Gathered as the
    concatenation along dim 0 (the only form gloo accepts; NCCL takes it too) and viewed as a stack."""
    x = x.contiguous()
    if x.dim() == 0:
        return all_gather_stacked(x[None], group, size)[:, 0]
    return wait(start_all_gather(x, group, size)).view(size, *x.shape)


def start_all_gather(x: torch.Tensor, group, size: int) -> torch.Tensor:
    """Start gathering `x` from `size` ranks; returns the pending (size * x.shape[0], ...) buffer: `wait` for it,
    then view it as (size, *x.shape)."""
    return _ops.all_gather_into_tensor(x.contiguous(), size, group_name(group))


def start_all_to_all(x: torch.Tensor, output_split_sizes: list[int], input_split_sizes: list[int],
                     group) -> torch.Tensor:
    """Start all_to_all_single along dim 0 with (possibly uneven) split sizes; returns the pending receive buffer
    (`wait` for it). Starting and waiting apart lets compute issued in between overlap the transfer."""
    return _ops.all_to_all_single(x.contiguous(), list(output_split_sizes), list(input_split_sizes),
                                  group_name(group))


def all_to_all(x: torch.Tensor, output_split_sizes: list[int], input_split_sizes: list[int], group) -> torch.Tensor:
    """all_to_all_single along dim 0 with (possibly uneven) split sizes; returns the received tensor."""
    return wait(start_all_to_all(x, output_split_sizes, input_split_sizes, group))


def start_ring_shift(x: torch.Tensor, index: int, size: int, recv_numel: int, group) -> torch.Tensor:
    """Start sending `x` to ring rank index + 1 while receiving `recv_numel` elements from index - 1; returns the
    pending receive, flat: `wait` for it, then view it in the sender's shape. One all_to_all_single over the
    flattened tensors, empty for every other peer, because the senders' blocks may differ in length (uneven shards)
    and dim-0 splits need rows of one shape."""
    send, recv = [0] * size, [0] * size
    send[(index + 1) % size] = x.numel()
    recv[(index - 1) % size] = recv_numel
    return _ops.all_to_all_single(x.contiguous().view(-1), recv, send, group_name(group))
