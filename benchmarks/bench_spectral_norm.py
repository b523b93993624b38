"""Spectral normalization against torch's parametrization and torch's older hook API.

The weight cases: one timed call is one training step of a parametrized weight, the
forward (one power iteration, updating u and v in place, then W / sigma) and the backward of
a fixed gradient into W. The layer cases: one forward + backward of a whole layer (or of a
small SNGAN-style discriminator, as StudioGAN builds it) under the hook API
(ganops.nn.utils.spectral_norm against torch.nn.utils.spectral_norm). A ConvTranspose2d's
weight, normalised along dim 1, is one of the weight cases. Before each call, untimed, u and v are
restored and the gradients cleared, so every call does the same work from the same state.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import spectral_norm as torch_hook_spectral_norm
from torch.nn.utils.parametrizations import spectral_norm as torch_spectral_norm

import ganops
from ganops.nn.utils import spectral_norm as ganops_hook_spectral_norm
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


def _case(rows, cols, device, name, speedup=2.0, make=None):
    """A weight's training step under the parametrization: a bare (rows, cols) weight, or
    make()'s layer's weight."""
    torch.manual_seed(0)
    base = make().to(device) if make else _Weight(rows, cols, device)
    grad_out = torch.randn_like(base.weight)

    def fresh():
        return copy.deepcopy(base)

    impls = [_impl(f"ganops {backend}", fresh(), lambda m, b=backend: ganops.spectral_norm(m, backend=b), grad_out)
             for backend in ganops.available_backends(device)]
    impls.append(_impl("torch.compile(torch parametrization)", fresh(), torch_spectral_norm, grad_out, compiled=True))
    reference = _impl("torch parametrization", fresh(), torch_spectral_norm, grad_out)
    return Case(op="spectral_norm", name=name, device=device, reference=reference, impls=impls,
                rtol=1e-5, atol=1e-6, targets=[Target("ganops cpp", ("torch parametrization",), speedup)])


def _hook_vectors(module):
    """The (u, v) buffers of every hook-API spectral norm in module."""
    return [buf for name, buf in module.named_buffers() if name.endswith(("weight_u", "weight_v"))]


def _layer_impl(label, module, register, x, grad_out):
    """One forward + backward of ``module`` (hook-API spectral norm registered by ``register``)
    on x."""
    torch.manual_seed(1)
    register(module)
    initial = [buf.clone() for buf in _hook_vectors(module)]
    params = list(module.parameters())

    def step():
        out = module(x)
        out.backward(grad_out)
        return out

    def reset():
        for p in params:
            p.grad = None
        for buf, value in zip(_hook_vectors(module), initial):
            buf.copy_(value)

    def outputs(out):
        return (out.detach(), *[p.grad for p in params], *_hook_vectors(module))

    return Impl(label, step, reset, outputs)


def _sn_layers(module, register):
    """register applied to every conv and linear layer of module."""
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            register(layer)
    return module


class _DiscriminatorBlock(nn.Module):
    """SNGAN's (StudioGAN's) residual discriminator block: ReLU, conv, ReLU, conv, 2x2 average
    pool, plus a 1x1-conv shortcut."""

    def __init__(self, in_channels, out_channels, first):
        super().__init__()
        self.first = first
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        h = x if self.first else torch.relu(x)
        h = self.conv2(torch.relu(self.conv1(h)))
        return nn.functional.avg_pool2d(h, 2) + nn.functional.avg_pool2d(self.shortcut(x), 2)


class _Discriminator(nn.Module):
    """A 32x32 SNGAN discriminator as StudioGAN builds it: residual blocks, ReLU, sum pooling,
    a linear head."""

    def __init__(self, ch=128):
        super().__init__()
        self.blocks = nn.Sequential(_DiscriminatorBlock(3, ch, True), _DiscriminatorBlock(ch, ch, False),
                                    _DiscriminatorBlock(ch, ch, False))
        self.linear = nn.Linear(ch, 1)

    def forward(self, x):
        return self.linear(torch.relu(self.blocks(x)).sum(dim=(2, 3)))


def _hook_case(make, input_shape, device, name, speedup):
    """A layer (or network) under the hook API, ganops' against torch's."""
    torch.manual_seed(0)
    base = make().to(device)
    x = torch.randn(input_shape, device=device)
    with torch.no_grad():
        grad_out = torch.randn_like(base(x))

    def hook_impl(label, register):
        return _layer_impl(label, copy.deepcopy(base), lambda m: _sn_layers(m, register), x, grad_out)

    impls = [hook_impl(f"ganops {b}", lambda m, b=b: ganops_hook_spectral_norm(m, backend=b))
             for b in ganops.available_backends(device)]
    reference = hook_impl("torch hook", torch_hook_spectral_norm)
    return Case(op="spectral_norm", name=name, device=device, reference=reference, impls=impls, rtol=1e-4, atol=1e-5,
                targets=[Target("ganops cpp", ("torch hook",), speedup)])


def cases(device: str) -> list[Case]:
    return [
        _case(512, 4608, device, "512x4608 (3x3 conv, 512 in/out) fp32 fwd+bwd"),
        _case(1024, 1024, device, "1024x1024 fp32 fwd+bwd"),
        _case(64, 48, device, "64x48 fp32 fwd+bwd"),
        _hook_case(lambda: nn.Linear(1024, 1024), (8, 1024), device, "hook API: Linear(1024, 1024), batch 8, fwd+bwd",
                   1.5),
        _hook_case(lambda: nn.Conv2d(512, 512, 3), (2, 512, 4, 4), device,
                   "hook API: Conv2d(512, 512, 3), input (2, 512, 4, 4), fwd+bwd", 1.5),
        _hook_case(lambda: nn.Conv2d(64, 128, 4, 2, 1), (4, 64, 16, 16), device,
                   "hook API: Conv2d(64, 128, 4, 2, 1), input (4, 64, 16, 16), fwd+bwd", 1.0),
        _case(None, None, device, "ConvTranspose2d(512, 256, 4, 2, 1) weight (512, 256, 4, 4), dim=1, fwd+bwd", 1.5,
              make=lambda: nn.ConvTranspose2d(512, 256, 4, 2, 1)),
        _hook_case(_Discriminator, (4, 3, 32, 32), device,
                   "hook API: SNGAN discriminator (3 residual blocks, 128 ch), input (4, 3, 32, 32), fwd+bwd", 1.0),
    ]
