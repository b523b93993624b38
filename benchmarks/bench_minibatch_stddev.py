"""Minibatch standard deviation, forward + backward, against StyleGAN2's formula.

Each call computes out = minibatch_stddev(x) and ∂x for a fixed upstream gradient, as one
training step of the layer does, on StyleGAN's last critic block (64, 512, 4, 4) and on
(32, 256, 8, 8), group size 4, one stat channel. The eager formula is StyleGAN2's
MinibatchStdLayer as written in its training code; torch.compile of it is timed as well.
"""

from __future__ import annotations

import torch

import ganops
from benchmarks.harness import Case, Impl, Target, fwd_bwd
from ganops.ops.minibatch_stddev import minibatch_stddev_reference

GROUP_SIZE = 4
NUM_CHANNELS = 1


def eager_mbstd(x: torch.Tensor) -> torch.Tensor:
    """StyleGAN2's MinibatchStdLayer.forward, as its training/networks.py writes it (the hub's
    reference, which computes fp32 inputs in fp32 with the same ops)."""
    return minibatch_stddev_reference(x, min(GROUP_SIZE, x.shape[0]), NUM_CHANNELS)


def _case(shape, device, targets=()):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(device)
    n, c, h, w = shape
    g = torch.randn(n, c + NUM_CHANNELS, h, w, generator=gen).to(device)
    impls = [Impl(f"ganops {backend}",
                  fwd_bwd(lambda t, b=backend: ganops.minibatch_stddev(t, GROUP_SIZE, NUM_CHANNELS, backend=b), x, g))
             for backend in ganops.available_backends(device) if backend != "torch"]
    impls.append(Impl("torch.compile(eager)", fwd_bwd(torch.compile(eager_mbstd, fullgraph=True), x, g)))
    # An ideal implementation reads x and writes the output, then reads grad and x and
    # writes ∂x.
    bytes_moved = 3 * x.nbytes + 2 * g.nbytes
    return Case(op="minibatch_stddev", name=f"fwd+bwd {tuple(shape)} G={GROUP_SIZE}, fp32", device=device,
                reference=Impl("eager", fwd_bwd(eager_mbstd, x, g)), impls=impls, rtol=1e-5, atol=1e-6,
                targets=list(targets), measure_memory=True, bytes_moved=bytes_moved)


def cases(device: str) -> list[Case]:
    return [
        # StyleGAN's last critic block at 4x4.
        _case((64, 512, 4, 4), device, targets=[Target("ganops cpp", ("eager",), 2.0)]),
        _case((32, 256, 8, 8), device, targets=[Target("ganops cpp", ("eager",), 2.0)]),
    ]
