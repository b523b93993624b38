"""Global gradient-norm clipping against torch.nn.utils.clip_grad_norm_.

Every call clips (max_norm is far below the gradients' norm), and the gradients are
restored, untimed, before each call, so each timed call does the full two passes.
"""

from __future__ import annotations

import torch

import ganops
from benchmarks.harness import Case, Impl, Target

MAX_NORM = 1.0

# DCGAN at 64x64 (nz=100, 64 feature maps): the ten conv weights of generator and critic
# and ten batch-norm affine parameters. 6.34 M float32 elements in 20 tensors.
DCGAN_SHAPES = [
    (100, 512, 4, 4), (512, 256, 4, 4), (256, 128, 4, 4), (128, 64, 4, 4), (64, 3, 4, 4),
    (64, 3, 4, 4), (128, 64, 4, 4), (256, 128, 4, 4), (512, 256, 4, 4), (1, 512, 4, 4),
    (512,), (512,), (256,), (256,), (128,), (128,), (128,), (128,), (256,), (256,),
]


def _params(shapes, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        p.grad = (torch.randn(shape, generator=g, dtype=torch.float32) * 0.1).to(device, dtype)
        params.append(p)
    return params


def _case(name, shapes, device, compile_reference=True, targets=(), rtol=1e-5):
    params = _params(shapes, device)
    saved = [p.grad.clone() for p in params]

    def reset():
        for p, s in zip(params, saved):
            p.grad.copy_(s)

    def clipped(total):
        return (total, *[p.grad for p in params])

    def impl(label, fn, **kwargs):
        return Impl(label, lambda: fn(params, MAX_NORM, **kwargs), reset, clipped)

    torch_clip = torch.nn.utils.clip_grad_norm_
    impls = [impl("torch foreach=True", torch_clip, foreach=True)]
    for backend in ganops.available_backends(device):
        impls.append(impl(f"ganops {backend}", ganops.clip_grad_norm_, backend=backend))
    if compile_reference:
        impls.append(impl("torch.compile(torch clip)", torch.compile(torch_clip, fullgraph=True)))
    # Memory-bound: the norm reads every gradient, the scale reads and writes it again.
    return Case(op="clip_grad_norm", name=name, device=device,
                reference=impl("torch foreach=False", torch_clip, foreach=False),
                impls=impls, rtol=rtol, atol=1e-7, targets=list(targets),
                bytes_moved=3 * sum(p.grad.nbytes for p in params))


def cases(device: str) -> list[Case]:
    baselines = ("torch foreach=False", "torch foreach=True")
    return [
        _case("2000 grads x 64, fp32", [(64,)] * 2000, device, compile_reference=False,
              targets=[Target("ganops cpp", baselines, 10.0)]),
        # torch's float32 sum over 6.3M elements is itself 2.6e-5 off the float64 norm here
        # (ganops' CPU kernel, which combines partials in float64, is within 1e-8), so the
        # check against it allows 5e-5; tests hold every backend to 1e-5 of float64.
        _case("DCGAN 20 grads, 6.3M fp32", DCGAN_SHAPES, device, rtol=5e-5,
              targets=[Target("ganops cpp", baselines, 1.3)]),
    ]
