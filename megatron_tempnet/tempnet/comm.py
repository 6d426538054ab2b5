"""Tensor-parallel collectives of TempNet and the DRO loss, with the group as an argument.

Convention: ``group=None`` means "no tensor parallelism" (a single process, no process group
needed), NOT torch.distributed's default WORLD group. A group of size 1 behaves the same way, so
TP=1 and TP>1 run the same code (docs/parallel_design.md section 1).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

SUM = dist.ReduceOp.SUM
MAX = dist.ReduceOp.MAX


def group_rank_size(group) -> tuple[int, int]:
    """(rank, size) of this process in `group`; (0, 1) for None. No communication."""
    if group is None:
        return 0, 1
    return dist.get_rank(group=group), dist.get_world_size(group=group)


def all_reduce(tensor: torch.Tensor, op=SUM, group=None) -> torch.Tensor:
    """In-place all-reduce of `tensor` over `group`; a no-op for None or a group of size 1."""
    if group is None or group_rank_size(group)[1] == 1:
        return tensor
    dist.all_reduce(tensor, op=op, group=group)  # looked up at call time: tests count calls
    return tensor


class _ReduceFromTP(torch.autograd.Function):
    """Forward all-reduce(sum); backward identity (megatron's reduce_from_tensor_model_parallel
    region): the gradient of each rank's partial term of a sum is the gradient of the sum."""

    @staticmethod
    def forward(ctx, partial, group):
        return all_reduce(partial.clone(), SUM, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def reduce_from_tp(partial: torch.Tensor, group) -> torch.Tensor:
    """Sum of `partial` over the TP group, differentiable (backward: identity)."""
    return _ReduceFromTP.apply(partial, group)
