"""Minibatch-discrimination similarity, forward + backward, against the broadcast reference.

Each call computes o = minibatch_similarity(M) and dM = ∂(Σ o·g)/∂M for a fixed g, as one
training step of the layer does. The reference holds the N×N×B×C differences (what a
direct PyTorch port, e.g. torchgan's MinibatchDiscrimination1d, does); torch.compile of it
is timed as well.
"""

from __future__ import annotations

import torch

import ganops
from benchmarks.harness import Case, Impl, Target, fwd_bwd
from ganops.ops.minibatch_discrimination import minibatch_discrimination_reference


def _case(N, B, C, device, targets=()):
    gen = torch.Generator().manual_seed(0)
    M = (torch.randn(N, B, C, generator=gen) * 0.4).to(device)
    g = torch.randn(N, B, generator=gen).to(device)
    impls = [Impl(f"ganops {backend}", fwd_bwd(lambda x, b=backend: ganops.minibatch_similarity(x, backend=b), M, g))
             for backend in ganops.available_backends(device) if backend != "torch"]
    compiled = torch.compile(minibatch_discrimination_reference, fullgraph=True)
    impls.append(Impl("torch.compile(naive)", fwd_bwd(compiled, M, g)))
    # float32 sums of up to N terms of either sign: 2e-5 of the largest output.
    return Case(op="minibatch_discrimination", name=f"fwd+bwd N={N} B={B} C={C}, fp32", device=device,
                reference=Impl("torch naive", fwd_bwd(minibatch_discrimination_reference, M, g)),
                impls=impls, rtol=2e-5, atol=1e-6, targets=list(targets), measure_memory=True)


def cases(device: str) -> list[Case]:
    return [
        _case(64, 100, 5, device),  # the paper's MNIST setting
        _case(256, 64, 16, device,
              targets=[Target("ganops cpp", ("torch naive",), 20.0, memory_fraction=0.10),
                       Target("ganops cpp", ("torch.compile(naive)",), 2.0)]),
        _case(512, 64, 16, device),
    ]
