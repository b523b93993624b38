"""Tests of ganops.minibatch_stddev and ganops.nn.MinibatchStdDev: StyleGAN2's
MinibatchStdLayer, its gradients to second order, the CUDA kernels' launch run on the CPU, and
examples/train_gan.py's --mbstd.

The reference is StyleGAN2's formula written here in float64 (``stylegan_mbstd``), and for the
grouping a per-sample loop that reads nothing of its reshape (``looped_mbstd``). The contract
suite (tests/test_contract.py) covers opcheck, fakes, agreement of the registered ops with the
package's reference, torch.compile, determinism and integer tensors.
"""

import importlib.util
import os

import pytest
import torch
from torch import nn

import ganops
from conftest import assert_within_reference_error, backend_params, tol
from triton_index_math import int32_index_math, record_index_math

BACKENDS = backend_params()
HAS_CPP = ganops._backend.unavailable_reason("cpp", "cpu") is None
requires_cpp = pytest.mark.skipif(not HAS_CPP, reason="the compiled extension is not built")


# ---------------------------------------------------------------------------------------
# The references, written out here
# ---------------------------------------------------------------------------------------

def stylegan_mbstd(x, group_size=4, num_channels=1, dtype=torch.float64):
    """StyleGAN2's MinibatchStdLayer.forward (training/networks.py), computed in ``dtype``."""
    N, C, H, W = x.shape
    G = min(group_size, N) if group_size is not None else N
    F = num_channels
    c = C // F
    y = x.to(dtype).reshape(G, -1, F, c, H, W)
    y = y - y.mean(dim=0)
    y = y.square().mean(dim=0)
    y = (y + 1e-8).sqrt()
    y = y.mean(dim=[2, 3, 4])
    y = y.reshape(-1, F, 1, 1)
    y = y.repeat(G, 1, H, W)
    return torch.cat([x.to(dtype), y], dim=1)


def looped_mbstd(x, group_size, num_channels):
    """The same layer sample by sample in float64: sample n's group is every m with
    m % (N / G) == n % (N / G)."""
    N, C, H, W = x.shape
    G = min(group_size, N) if group_size is not None else N
    groups = N // G
    c = C // num_channels
    x = x.double()
    out = torch.empty(N, C + num_channels, H, W, dtype=torch.float64)
    out[:, :C] = x
    for n in range(N):
        members = x[[m for m in range(N) if m % groups == n % groups]]
        assert members.shape[0] == G
        std = (members.var(dim=0, unbiased=False) + 1e-8).sqrt()
        for f in range(num_channels):
            out[n, C + f] = std[f * c:(f + 1) * c].mean()
    return out


def rand(*shape, device="cpu", dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype)


# (shape, group_size, num_channels): StyleGAN's defaults; F > 1; group_size larger than N;
# group_size None (G = N); G = 1; columns spanning several chunks of the kernels' split
# with a tail; one sample.
CASES = [
    ((8, 6, 4, 4), 4, 1),
    ((8, 6, 5, 3), 4, 2),
    ((6, 4, 3, 3), 8, 1),
    ((6, 4, 3, 3), None, 2),
    ((3, 4, 2, 2), 1, 4),
    ((8, 64, 8, 9), 2, 1),
    ((1, 3, 2, 2), 4, 3),
]
CASE_IDS = ["default", "F2", "group_gt_N", "group_None", "G1", "chunks", "one_sample"]


# ---------------------------------------------------------------------------------------
# Against StyleGAN2's formula
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("shape,group_size,num_channels", CASES, ids=CASE_IDS)
def test_matches_stylegan(device, backend, shape, group_size, num_channels):
    x = rand(*shape, device=device)
    got = ganops.minibatch_stddev(x, group_size, num_channels, backend=backend)
    assert got.shape == (shape[0], shape[1] + num_channels, *shape[2:]) and got.dtype == torch.float64
    torch.testing.assert_close(got, stylegan_mbstd(x, group_size, num_channels), **tol(torch.float64))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_non_contiguous_input(device, backend):
    base = rand(8, 5, 6, 7, device=device)
    for x in (base.permute(0, 3, 1, 2), base[:, ::2, 1:5, :].transpose(2, 3)):
        assert not x.is_contiguous()
        got = ganops.minibatch_stddev(x, 4, 1, backend=backend)
        torch.testing.assert_close(got, stylegan_mbstd(x, 4, 1), **tol(torch.float64))


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("shape,group_size,num_channels", [((8, 6, 2, 3), 4, 2), ((6, 2, 3, 1), 3, 1),
                                                           ((4, 3, 2, 2), None, 1)])
def test_grouping_is_stylegans(device, backend, shape, group_size, num_channels):
    """Sample n is in group n % (N / G) (members n, n + N/G, ...), not in the block of G
    consecutive samples: against a per-sample loop, and on a batch whose strided groups have
    no spread while consecutive blocks would."""
    x = rand(*shape, device=device)
    got = ganops.minibatch_stddev(x, group_size, num_channels, backend=backend)
    torch.testing.assert_close(got.cpu(), looped_mbstd(x.cpu(), group_size, num_channels), **tol(torch.float64))
    n = shape[0]
    groups = n // (min(group_size, n) if group_size else n)
    if groups > 1:
        # Every sample equal to the others of its strided group: the stat is sqrt(1e-8).
        same = rand(groups, *shape[1:], device=device).repeat(n // groups, 1, 1, 1)
        out = ganops.minibatch_stddev(same, group_size, num_channels, backend=backend)
        torch.testing.assert_close(out[:, shape[1]:], torch.full_like(out[:, shape[1]:], 1e-4), **tol(torch.float64))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_group_size_larger_than_batch_and_none(device, backend):
    x = rand(6, 4, 3, 3, device=device)
    whole = ganops.minibatch_stddev(x, None, 1, backend=backend)
    torch.testing.assert_close(ganops.minibatch_stddev(x, 6, 1, backend=backend), whole, rtol=0, atol=0)
    torch.testing.assert_close(ganops.minibatch_stddev(x, 100, 1, backend=backend), whole, rtol=0, atol=0)
    # One group: every sample gets the same stat.
    assert (whole[:, 4] == whole[0, 4, 0, 0]).all()


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_low_precision_within_twice_the_references_error(device, backend, dtype):
    """Output and ∂x against float64, within twice the error of StyleGAN's formula run in that
    dtype (the flash-attention rule), in a tensor whose stat is a mean over 1024 columns."""
    x64 = rand(8, 64, 4, 4, device=device) * 3 + 1
    g64 = rand(8, 65, 4, 4, device=device, seed=1)
    x = x64.to(dtype)

    def fwd_bwd(fn, x, g):
        x = x.detach().requires_grad_(True)
        out = fn(x)
        (dx,) = torch.autograd.grad(out, x, g.to(out.dtype))
        return out.detach(), dx

    got = fwd_bwd(lambda t: ganops.minibatch_stddev(t, 4, 1, backend=backend), x, g64)
    low = fwd_bwd(lambda t: stylegan_mbstd(t, 4, 1, dtype=dtype), x, g64)
    exact = fwd_bwd(lambda t: stylegan_mbstd(t, 4, 1), x.double(), g64)
    assert got[0].dtype == dtype and got[1].dtype == dtype
    for a, lo, ex in zip(got, low, exact):
        assert_within_reference_error(a, lo, ex, dtype)


# ---------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("shape,group_size,num_channels", [((4, 4, 2, 3), 2, 2), ((3, 2, 2, 2), None, 1),
                                                           ((2, 2, 1, 3), 1, 1)], ids=["F2", "G_N", "G1"])
def test_gradcheck_and_gradgradcheck(device, backend, shape, group_size, num_channels):
    x = rand(*shape, device=device).requires_grad_(True)

    def fn(t):
        return ganops.minibatch_stddev(t, group_size, num_channels, backend=backend)

    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_gradient_matches_stylegans(device, backend):
    """∂x through the backward op (no create_graph) against autograd through the formula."""
    x = rand(8, 6, 5, 3, device=device)
    g = rand(8, 8, 5, 3, device=device, seed=1)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    (got,) = torch.autograd.grad(ganops.minibatch_stddev(xs[0], 4, 2, backend=backend), xs[0], g)
    (want,) = torch.autograd.grad(stylegan_mbstd(xs[1], 4, 2), xs[1], g)
    torch.testing.assert_close(got, want, **tol(torch.float64))


def critic(layer, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                         nn.LeakyReLU(0.2), layer, nn.Conv2d(9, 4, 3, padding=1), nn.LeakyReLU(0.2), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 1)).double()


class StyleGANLayer(nn.Module):
    def forward(self, x):
        return stylegan_mbstd(x, 2, 1)


def param_grads(module, loss):
    return torch.autograd.grad(loss, list(module.parameters()))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_r1_through_a_critic_with_the_layer(device, backend):
    """R1 differentiates through the layer twice: value and every parameter's gradient equal
    those of the same critic with StyleGAN's formula as the layer."""
    real = rand(6, 3, 8, 8, device=device, seed=2)
    ours = critic(ganops.nn.MinibatchStdDev(group_size=2, backend=backend)).to(device)
    theirs = critic(StyleGANLayer()).to(device)
    got = ganops.r1_penalty(ours, real, gamma=10.0, backend=backend)
    want = ganops.r1_penalty(theirs, real, gamma=10.0, backend="torch")
    torch.testing.assert_close(got, want, **tol(torch.float64))
    for a, b in zip(param_grads(ours, got), param_grads(theirs, want)):
        torch.testing.assert_close(a, b, **tol(torch.float64))
    assert want > 0


def derivatives(layer, x, u, w):
    """Three derivative orders of ⟨layer(x), u⟩ w.r.t. x: g = ∂⟨layer(x), u⟩/∂x (R1's inner
    gradient), h = ∂|g|²/∂x (what R1's backward needs), and ∂⟨h, w⟩/∂x."""
    x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad((layer(x) * u).sum(), x, create_graph=True)
    (h,) = torch.autograd.grad(g.square().sum(), x, create_graph=True)
    (third,) = torch.autograd.grad((h * w).sum(), x)
    return g, h, third


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("group_size,num_channels,batch", [(1, 1, 4), (2, 1, 8), (2, 2, 8), (3, 1, 6), (8, 1, 8)],
                         ids=["G1", "G2", "G2F2", "G3", "G8"])
def test_every_derivative_order_within_twice_stylegans_float32_error(device, backend, group_size, num_channels,
                                                                     batch):
    """In float32, each order's error against float64 stays within 2x that of StyleGAN2's layer
    differentiated by autograd in float32. At G = 2, σ = |a − b| / 2 makes the second
    derivative a difference of nearly equal terms: the differentiable backward without its
    group centring lost up to two more digits there (5e-4 against 4e-5 relative on seeds 1
    and 3, which this runs). The first order is the backend's own backward kernel."""
    for seed in (1, 3):
        x = rand(batch, 64, 4, 4, seed=seed)
        u = rand(batch, 64 + num_channels, 4, 4, seed=seed + 100)
        w = rand(batch, 64, 4, 4, seed=seed + 200)
        exact = derivatives(lambda t: stylegan_mbstd(t, group_size, num_channels), x, u, w)
        low = [t.float().to(device) for t in (x, u, w)]
        reference = derivatives(lambda t: stylegan_mbstd(t, group_size, num_channels, torch.float32), *low)
        got = derivatives(lambda t: ganops.minibatch_stddev(t, group_size, num_channels, backend=backend), *low)
        for order, (a, r, e) in enumerate(zip(got, reference, exact), start=1):
            try:
                assert_within_reference_error(a.cpu(), r.cpu(), e, torch.float32)
            except AssertionError as error:
                raise AssertionError(f"derivative order {order}, seed {seed}: {error}") from None


@pytest.mark.skipif(not ganops._backend.triton_interpret(), reason="reads the Triton interpreter's arithmetic")
def test_triton_index_math_is_64_bit():
    """Every pointer offset and integer product of the Triton kernels is int64, so none wraps
    past 2^31 elements (the products F · L and F · S of a sample's size, and G · S, were int32);
    the interpreter shows the dtypes, without a tensor that large."""
    pytest.importorskip("triton")
    x = rand(8, 6, 5, 3).float().requires_grad_(True)
    with record_index_math() as seen:
        out = ganops.minibatch_stddev(x, 4, 2, backend="triton")
        out.backward(torch.ones_like(out))
    assert len(seen) > 100
    assert int32_index_math(seen) == []


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------

def test_non_divisible_shapes_raise_naming_the_sizes():
    x = rand(6, 6, 2, 2)
    with pytest.raises(ValueError, match=r"N=6 .*\(6, 6, 2, 2\).* group size G=4 \(group_size=4\)"):
        ganops.minibatch_stddev(x, 4, 1)
    with pytest.raises(ValueError, match=r"C=6 .*\(6, 6, 2, 2\).* num_channels=4"):
        ganops.minibatch_stddev(x, 3, 4)
    # group_size clamps to N before the divisibility check.
    assert ganops.minibatch_stddev(x, 7, 1).shape == (6, 7, 2, 2)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(group_size=0), ValueError, "group_size must be a positive int or None, got 0"),
    (dict(group_size=-2), ValueError, "group_size"),
    (dict(group_size=2.0), TypeError, "group_size must be a positive int or None, got float"),
    (dict(group_size=True), TypeError, "group_size"),
    (dict(num_channels=0), ValueError, "num_channels must be a positive int, got 0"),
    (dict(num_channels=None), TypeError, "num_channels must be a positive int"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        ganops.minibatch_stddev(rand(4, 2, 2, 2), **kwargs)
    with pytest.raises(error, match=match):
        ganops.nn.MinibatchStdDev(**kwargs)


@pytest.mark.parametrize("x,error,match", [
    (rand(4, 2, 2), ValueError, r"x must be 4-D \(N, C, H, W\), got shape \(4, 2, 2\)"),
    (rand(0, 2, 2, 2), ValueError, r"N >= 1"),
    (rand(2, 0, 2, 2), ValueError, r"x must have at least one element"),
    (rand(4, 2, 2, 2).long(), TypeError, "x has dtype torch.int64"),
    ([[1.0]], TypeError, "x must be a tensor"),
])
def test_bad_input(x, error, match):
    with pytest.raises(error, match=match):
        ganops.minibatch_stddev(x)


# ---------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------

def test_module():
    layer = ganops.nn.MinibatchStdDev()
    assert repr(layer) == "MinibatchStdDev(group_size=4, num_channels=1)"
    assert repr(ganops.nn.MinibatchStdDev(None, 2)) == "MinibatchStdDev(group_size=None, num_channels=2)"
    assert list(layer.parameters()) == [] and layer.state_dict() == {}
    x = rand(8, 4, 3, 3)
    torch.testing.assert_close(layer(x), stylegan_mbstd(x), **tol(torch.float64))
    torch.testing.assert_close(ganops.nn.MinibatchStdDev(2, 2, backend="torch")(x), stylegan_mbstd(x, 2, 2),
                               **tol(torch.float64))


# ---------------------------------------------------------------------------------------
# The CUDA kernels' launch, run on the CPU
# ---------------------------------------------------------------------------------------

@requires_cpp
@pytest.mark.parametrize("shape,group_size,num_channels", [((8, 6, 5, 3), 4, 2), ((4, 64, 8, 9), 2, 1),
                                                           ((5, 4, 3, 3), 5, 1), ((3, 4, 2, 2), 1, 4),
                                                           ((6, 3, 31, 29), 3, 3)],
                         ids=["F2", "chunks_and_tail", "G_N", "G1", "output_blocks"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
def test_cuda_launch_check(shape, group_size, num_channels, dtype):
    """Every (block, thread) of the CUDA launches: each element read, written or covered
    exactly once, and the output and ∂x those of StyleGAN's formula."""
    x64 = rand(*shape)
    n, c, h, w = shape
    grad64 = rand(n, c + num_channels, h, w, seed=1)
    x, grad = x64.to(dtype), grad64.to(dtype)
    stats_visits, out_visits, out, grad_visits, backward_visits, grad_x = (
        torch.ops.ganops._minibatch_stddev_cuda_launch_check(x, grad, group_size, num_channels))
    assert (stats_visits == 1).all() and stats_visits.numel() == x.numel()
    assert (out_visits == 1).all() and out_visits.numel() == out.numel()
    assert (backward_visits == 1).all() and backward_visits.numel() == x.numel()
    # The stat-gradient kernel reads the stat channels of grad, each once, and nothing else.
    grad_visits = grad_visits.reshape(grad.shape)
    assert (grad_visits[:, c:] == 1).all() and (grad_visits[:, :c] == 0).all()

    xd = x.double().requires_grad_(True)
    want = stylegan_mbstd(xd, group_size, num_channels)
    (want_dx,) = torch.autograd.grad(want, xd, grad.double())
    t = tol(torch.float64) if dtype == torch.float64 else tol(torch.float32)
    if dtype == torch.float16:
        t = dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(out.double(), want.detach(), **t)
    torch.testing.assert_close(grad_x.double(), want_dx, **t)


# ---------------------------------------------------------------------------------------
# examples/train_gan.py --mbstd
# ---------------------------------------------------------------------------------------

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "train_gan.py")


@pytest.mark.skipif(not os.path.exists(EXAMPLE), reason="examples/ is not beside the tests "
                    "(an installed-wheel run copies only tests/)")
def test_example_mbstd_flag():
    spec = importlib.util.spec_from_file_location("train_gan", EXAMPLE)
    train_gan = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_gan)
    _, plain = train_gan.conv_pair(8)
    _, with_layer = train_gan.conv_pair(8, mbstd=True)
    assert not any(isinstance(m, ganops.nn.MinibatchStdDev) for m in plain.modules())
    layers = list(with_layer)
    index = next(i for i, m in enumerate(layers) if isinstance(m, ganops.nn.MinibatchStdDev))
    # Right before the last convolution, which takes the extra channel.
    assert isinstance(layers[index + 1], nn.Conv2d) and layers[index + 1].in_channels == 33
    assert not any(isinstance(m, nn.Conv2d) for m in layers[index + 2:])
    metrics = train_gan.main(["--data", "digits", "--steps", "3", "--mbstd", "--penalty", "r1", "--quiet"])
    assert metrics["steps"] == 3
    with pytest.raises(SystemExit):
        train_gan.parse_args(["--data", "ring8", "--mbstd"])
