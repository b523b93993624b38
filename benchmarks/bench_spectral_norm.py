"""Spectral normalization against torch.nn.utils.parametrizations.spectral_norm.

One timed call is one training step of the parametrized weight: the forward (one power
iteration, updating u and v in place, then W / sigma) and the backward of a fixed gradient
into W. Before each call, untimed, u and v are restored and W's gradient is cleared, so
every call does the same work from the same state.
"""

from __future__ import annotations

import copy

import torch
from torch.nn.utils.parametrizations import spectral_norm as torch_spectral_norm

import ganops
from benchmarks.harness import Case, Impl, Target


class _Weight(torch.nn.Module):
    """A bare (rows, cols) weight: the matrix spectral norm works on, without a layer's compute."""

    def __init__(self, rows, cols, device):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(rows, cols, device=device) / cols ** 0.5)


def _impl(label, module, register, grad_out, compiled=False):
    torch.manual_seed(1)
    register(module)
    sn = module.parametrizations.weight
    u0, v0 = sn[0]._u.clone(), sn[0]._v.clone()

    def forward():
        return module.weight

    weight_of = torch.compile(forward, fullgraph=True) if compiled else forward

    def step():
        w = weight_of()
        w.backward(grad_out)
        return w

    def reset():
        sn.original.grad = None
        sn[0]._u.copy_(u0)
        sn[0]._v.copy_(v0)

    def outputs(w):
        return w.detach(), sn.original.grad, sn[0]._u, sn[0]._v

    return Impl(label, step, reset, outputs)


def _case(rows, cols, device, name, speedup=2.0):
    torch.manual_seed(0)
    base = _Weight(rows, cols, device)
    grad_out = torch.randn(rows, cols, device=device)

    def fresh():
        return copy.deepcopy(base)

    impls = [_impl(f"ganops {backend}", fresh(), lambda m, b=backend: ganops.spectral_norm(m, backend=b), grad_out)
             for backend in ganops.available_backends(device)]
    impls.append(_impl("torch.compile(torch parametrization)", fresh(), torch_spectral_norm, grad_out, compiled=True))
    reference = _impl("torch parametrization", fresh(), torch_spectral_norm, grad_out)
    return Case(op="spectral_norm", name=name, device=device, reference=reference, impls=impls,
                rtol=1e-5, atol=1e-6, targets=[Target("ganops cpp", ("torch parametrization",), speedup)])


def cases(device: str) -> list[Case]:
    return [
        _case(512, 4608, device, "512x4608 (3x3 conv, 512 in/out) fp32 fwd+bwd"),
        _case(1024, 1024, device, "1024x1024 fp32 fwd+bwd"),
        _case(64, 48, device, "64x48 fp32 fwd+bwd"),
    ]
