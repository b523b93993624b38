"""Recognising DTensors (FSDP2's sharded parameters and gradients) without importing
torch.distributed on the common path."""

import torch


def is_dtensor(t: torch.Tensor) -> bool:
    if type(t) is torch.Tensor:  # the common case, decided without importing anything
        return False
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)
