"""StyleGAN's minibatch standard deviation layer (Karras et al. 2018; StyleGAN2's
MinibatchStdLayer)."""

from __future__ import annotations

import torch
from torch import nn

from ganops.ops.minibatch_stddev import check_arguments, minibatch_stddev


class MinibatchStdDev(nn.Module):
    """Appends to each sample the standard deviation of the features across its group of the
    batch: (N, C, H, W) -> (N, C + num_channels, H, W). Placed before a critic's last layers,
    it lets the critic see how varied a batch is (a remedy for mode collapse).

    A drop-in for StyleGAN2's ``MinibatchStdLayer(group_size, num_channels)``: the batch is
    split into N / G groups, G = min(group_size, N) (N when group_size is None), sample n in
    group n % (N / G); for each group and each of the ``num_channels`` channel groups the
    appended channel is the mean over (C / num_channels, H, W) of sqrt(var + 1e-8), var taken
    over the group (divisor G). See ganops.minibatch_stddev.

    Args:
        group_size: G before clamping to the batch size; None: the whole batch is one group.
        num_channels: F, the channels appended; it must divide C.
        backend: ganops backend (None: the current default).
    """

    def __init__(self, group_size: int | None = 4, num_channels: int = 1, *, backend: str | None = None):
        super().__init__()
        check_arguments(group_size, num_channels)
        self.group_size = group_size
        self.num_channels = num_channels
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return minibatch_stddev(x, self.group_size, self.num_channels, backend=self.backend)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}, num_channels={self.num_channels}"
