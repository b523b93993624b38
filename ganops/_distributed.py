"""What ganops does under torch.distributed: DTensors (FSDP2's sharded parameters and
gradients) in gradient clipping, and the data-parallel wrappings a gradient penalty's double
backward cannot go through. torch.distributed is imported only where a DTensor or a process
group is actually present, so single-process calls pay one type check."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def is_dtensor(t: torch.Tensor) -> bool:
    if type(t) is torch.Tensor:  # the common case, decided without importing anything
        return False
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard; a plain tensor itself."""
    return t.to_local() if is_dtensor(t) else t


def replicated(total: torch.Tensor, mesh) -> torch.Tensor:
    """``total`` (the same value on every rank) as a DTensor replicated over ``mesh``."""
    from torch.distributed.tensor import DTensor, Replicate
    return DTensor.from_local(total, mesh, [Replicate()] * mesh.ndim)


def dtensor_norms(grads: list[torch.Tensor], norm_type: float, local_norms: Callable):
    """(total, per-tensor norms, mesh) of DTensor gradients, as plain tensors holding the
    global values on every rank.

    ``local_norms(tensors)`` gives the per-tensor norms of plain tensors (the kernels). Each
    rank takes the norms of its local shards, raises them to the p-th power, and sums (max for
    inf) the entries of tensors sharded along a mesh dimension over that dimension's process
    group: one all-reduce of one small vector per mesh dimension, on the device, with no host
    synchronisation. Replicated tensors are counted once.
    """
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    mesh = grads[0].device_mesh
    for i, g in enumerate(grads):
        if not isinstance(g, DTensor):
            raise TypeError(f"parameters' gradients mix DTensors and plain tensors (gradient {i} is a "
                            f"plain tensor); shard every parameter, or none")
        if g.device_mesh != mesh:
            raise ValueError(f"gradient {i} lives on another device mesh than gradient 0; "
                             f"ganops clips gradients of one mesh per call")
        if any(pl.is_partial() for pl in g.placements):
            raise NotImplementedError(f"gradient {i} has a Partial placement; reduce it first "
                                      f"(FSDP2 gradients are Shard or Replicate)")
    per = local_norms([g.to_local() for g in grads])
    inf = norm_type == math.inf
    powers = per if inf else per.pow(norm_type)
    for dim in range(mesh.ndim):
        sharded = [g.placements[dim].is_shard() for g in grads]
        if not any(sharded):
            continue
        mask = torch.tensor(sharded)
        mask = mask.pin_memory().to(per.device, non_blocking=True) if per.is_cuda else mask.to(per.device)
        partial = torch.where(mask, powers, torch.zeros_like(powers))
        dist.all_reduce(partial, op=dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM,
                        group=mesh.get_group(dim))
        powers = torch.where(mask, partial, powers)
    if inf:
        return powers.max(), powers, mesh
    return powers.sum().pow(1.0 / norm_type), powers.pow(1.0 / norm_type), mesh


def check_critic_wrapping(critic) -> None:
    """Refuses the data-parallel wrappings whose double backward goes wrong (tests/test_distributed.py).

    Plain DistributedDataParallel works when the penalty joins the critic loss in one
    backward. Two do not: FSDP2 (fully_shard) reshards after the input-gradient pass and
    frees the gathered weights the second backward reads (pytorch/pytorch#172543; with
    set_reshard_after_backward(False) it runs but reduces the gradients before the penalty's
    part arrives: silently wrong), and DDP's static_graph reduces at the end of the
    input-gradient pass, before any parameter gradient exists (silently wrong too). Only
    modules are scanned, and only with a process group up, so single-process calls pay one
    check.
    """
    if not (isinstance(critic, torch.nn.Module) and torch.distributed.is_available()
            and torch.distributed.is_initialized()):
        return
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel
    for module in critic.modules():
        if isinstance(module, FSDPModule):
            raise ValueError("critic is sharded with FSDP2 (fully_shard), which does not support the double "
                             "backward of a gradient penalty; wrap the critic in DistributedDataParallel instead "
                             "(the generator can stay fully_shard-ed)")
        if isinstance(module, DistributedDataParallel) and module.static_graph:
            raise ValueError("critic is DistributedDataParallel with static_graph=True, which reduces gradients "
                             "at the end of the penalty's input-gradient pass; use static_graph=False (the "
                             "default) and one backward of critic loss + penalty")
