"""Minibatch standard deviation (Karras et al. 2018, ProGAN; StyleGAN2's MinibatchStdLayer),
with a backward that is differentiable again, so R1 and other gradient penalties go through it.

For x of shape (N, C, H, W), G = min(group_size, N) (N when group_size is None), F stat
channels, M = N / G groups, c = C / F:

    y    = x.reshape(G, M, F, c, H, W)        sample g·M + j is member g of group j
    σ    = sqrt(mean_g (y − mean_g y)² + 1e-8)                     (M, F, c, H, W)
    s    = mean over (c, H, W) of σ                                 (M, F)
    out  = cat([x, s[n % M, f] broadcast over (H, W)], 1)          (N, C + F, H, W)

The kernels make one pass over x for the statistics and one to write the output; the
backward one pass over x and grad (after summing grad's F stat channels per group):

    ∂x = grad[:, :C] + (∂s / (c·H·W)) · (y − mean_g y) / (G · σ)

Registered ops (ganops._library): ``minibatch_stddev`` and ``minibatch_stddev_backward``, each
with a CPU, a CUDA and a Triton kernel; the ``torch`` backend is the reference below. The
forward's backward is the backward op of the same backend; when autograd records that
backward (create_graph=True, as a gradient penalty through the critic does), the
differentiable reference backward in torch ops takes its place, so every order of derivative
is exact.
"""

from __future__ import annotations

import torch

from ganops import _library
from ganops._checks import acc_dtype, check_tensor

# StyleGAN2's epsilon under the square root.
EPSILON = 1e-8


# ---------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------

def _check_positive_int(value, name: str, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        what = "a positive int or None" if allow_none else "a positive int"
        raise TypeError(f"{name} must be {what}, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value}")


def check_arguments(group_size, num_channels) -> None:
    """group_size: a positive int or None; num_channels: a positive int."""
    _check_positive_int(group_size, "group_size", allow_none=True)
    _check_positive_int(num_channels, "num_channels")


def resolve_group_size(x: torch.Tensor, group_size: int | None, num_channels: int) -> int:
    """G = min(group_size, N), or N for None, checked to divide N, and num_channels checked to
    divide C; x must be a non-empty (N, C, H, W) float tensor."""
    check_tensor(x, "x")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"x must have at least one element in each of N, C, H, W (N >= 1), "
                         f"got shape {tuple(x.shape)}")
    check_arguments(group_size, num_channels)
    n, c = x.shape[:2]
    g = n if group_size is None else min(group_size, n)
    if n % g != 0:
        raise ValueError(f"the batch size N={n} of x (shape {tuple(x.shape)}) is not divisible by the group size "
                         f"G={g} (group_size={group_size}): minibatch_stddev splits the batch into groups of G")
    if c % num_channels != 0:
        raise ValueError(f"the channel count C={c} of x (shape {tuple(x.shape)}) is not divisible by "
                         f"num_channels={num_channels}")
    return g


# ---------------------------------------------------------------------------------------
# The reference (the `torch` backend)
# ---------------------------------------------------------------------------------------

def minibatch_stddev_reference(x: torch.Tensor, group_size: int, num_channels: int) -> torch.Tensor:
    """StyleGAN2's MinibatchStdLayer with G = group_size (already resolved: it divides N),
    computed in the accumulation dtype (float32 for half types); differentiable any number of
    times by autograd."""
    n, c, h, w = x.shape
    g, f = group_size, num_channels
    y = x.to(acc_dtype(x.dtype)).reshape(g, -1, f, c // f, h, w)
    y = y - y.mean(dim=0)
    y = y.square().mean(dim=0)
    y = (y + EPSILON).sqrt()
    y = y.mean(dim=[2, 3, 4])
    y = y.reshape(-1, f, 1, 1).repeat(g, 1, h, w)
    return torch.cat([x, y.to(x.dtype)], dim=1)


def minibatch_stddev_backward_reference(grad: torch.Tensor, x: torch.Tensor, group_size: int,
                                        num_channels: int) -> torch.Tensor:
    """∂x = grad[:, :C] + (∂s / (c·H·W)) · (y − mean_g y) / (G · σ), written out in torch ops
    in the accumulation dtype, so autograd differentiates it exactly (the double backward).

    The σ term is centred over the group once more (minus its mean over g), as the backward
    of y − mean_g y does in autograd of the forward. That mean is zero in exact arithmetic,
    but without it the derivative of this formula lets rounding through that the projection
    removes: at G = 2, where σ = |a − b| / 2 makes the second derivative a difference of
    nearly equal terms, R1's gradient in float32 lost up to two more digits than StyleGAN2's
    layer differentiated twice (tests/test_minibatch_stddev.py)."""
    n, c, h, w = x.shape
    g, f = group_size, num_channels
    acc = acc_dtype(x.dtype)
    go = grad.to(acc)
    y = x.to(acc).reshape(g, -1, f, c // f, h, w)
    d = y - y.mean(dim=0)
    std = (d.square().mean(dim=0) + EPSILON).sqrt()
    # ∂s[j, f]: the stat channel's gradient summed over the group's samples and the pixels.
    stat_grad = go[:, c:].reshape(g, -1, f, h * w).sum(dim=(0, 3))
    k = (stat_grad / (c // f * h * w)).reshape(-1, f, 1, 1, 1)
    dx = k * d / (g * std)
    dx = dx - dx.mean(dim=0)
    return (go[:, :c] + dx.reshape(n, c, h, w)).to(x.dtype)


# ---------------------------------------------------------------------------------------
# Registered ops
# ---------------------------------------------------------------------------------------

def _setup(ctx, inputs, output):
    x, group_size, num_channels = inputs
    ctx.save_for_backward(x)
    ctx.args = (group_size, num_channels)


def _backward(kernels, ctx, grad):
    (x,) = ctx.saved_tensors
    backward = (minibatch_stddev_backward_reference if _library.differentiating(grad, x)
                else kernels.minibatch_stddev_backward)
    return backward(grad, x, *ctx.args), None, None


def _output_like(x: torch.Tensor, num_channels: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.new_empty((n, c + num_channels, h, w))


def _x_examples(device, dtype):
    """(x, G, F): two groups of four with two stat channels; (16, 64, 8, 8), which the CPU
    kernels split over several threads and whose columns fill two chunks per (group, channel)
    and a tail; G = N; G = 1 with one channel per stat channel; G = 2 (a per-device batch of
    two, where the double backward is worst conditioned); a channels-last (not contiguous) x."""
    def x(*shape):
        return torch.randn(shape, device=device, dtype=dtype)
    return [(x(8, 6, 5, 3), 4, 2), (x(16, 64, 8, 9), 4, 1), (x(5, 4, 3, 3), 5, 1), (x(3, 4, 2, 2), 1, 4),
            (x(4, 6, 3, 2), 2, 3), (x(6, 3, 5, 8).permute(0, 3, 1, 2), 3, 2)]


def _backward_examples(device, dtype):
    out = []
    for x, g, f in _x_examples(device, dtype):
        n, c, h, w = x.shape
        out.append((torch.randn(n, c + f, h, w, device=device, dtype=dtype), x, g, f))
    # A gradient that is not contiguous: the sum's backward broadcasts one value.
    x = torch.randn(4, 2, 3, 3, device=device, dtype=dtype)
    out.append((torch.full((), 0.5, device=device, dtype=dtype).expand(4, 3, 3, 3), x, 2, 1))
    return out


MINIBATCH_STDDEV = _library.define(
    "minibatch_stddev", "(Tensor x, int group_size, int num_channels) -> Tensor",
    fake=lambda x, group_size, num_channels: _output_like(x, num_channels),
    reference=minibatch_stddev_reference, triton="minibatch_stddev.minibatch_stddev",
    backward=_backward, setup_context=_setup,
    examples=lambda device, dtype: [(x.requires_grad_(), g, f) for x, g, f in _x_examples(device, dtype)])

MINIBATCH_STDDEV_BACKWARD = _library.define(
    "minibatch_stddev_backward", "(Tensor grad, Tensor x, int group_size, int num_channels) -> Tensor",
    fake=lambda grad, x, group_size, num_channels: torch.empty_like(x, memory_format=torch.contiguous_format),
    reference=minibatch_stddev_backward_reference, triton="minibatch_stddev.minibatch_stddev_backward",
    examples=_backward_examples)


# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------

def minibatch_stddev(x: torch.Tensor, group_size: int | None = 4, num_channels: int = 1, *,
                     backend: str | None = None) -> torch.Tensor:
    """StyleGAN2's minibatch standard deviation: cat([x, s], 1), shape (N, C + F, H, W).

    ``x``: (N, C, H, W). The batch is split into N / G groups, G = min(``group_size``, N)
    (all N when None); sample n belongs to group n % (N / G), as StyleGAN's reshape has it.
    For each group and each of the F = ``num_channels`` channel groups, s is the mean over
    (C / F, H, W) of sqrt(var + 1e-8), var the variance over the group's G samples (divisor
    G); s is replicated over H and W for every sample of the group. G must divide N and F
    must divide C. Half types accumulate in float32. Differentiable twice and more (R1
    through a critic with this layer); ``backend`` picks the implementation.
    """
    g = resolve_group_size(x, group_size, num_channels)
    return _library.call(MINIBATCH_STDDEV, backend, x.device, x, g, num_channels)
