"""Property-based differential tests: every public op on every backend against float64 truth.

Hypothesis draws shapes (one sample, one element, empty tensors where an op takes them, odd
sizes), dtypes (float16, bfloat16, float32, float64; mixed for the clip ops), layouts
(contiguous, strided slices, transposed, channels_last), special values (0, ±inf, NaN,
subnormals, values near the dtype's maximum) and the ops' arguments. Each result is compared
with a float64 reference written here, not ganops' own fallback:

- the same non-finite pattern: every element is NaN, +inf, -inf or finite as in the float64
  result, as in that result rounded to the output's dtype (a true value past its range is
  inf there), or as in the same formula run in the input's own precision (a float32 sum of
  squares overflows where float64's does not; the kernels accumulate in that precision);
- finite values within the tolerance table of tests/conftest.py, plus twice the error of
  that low-precision run (docs/design.md's rule for half types; for float32 and float64 it is
  a rounding-level allowance on top of the relative tolerance).

Profiles (tests/conftest.py): "ci" runs a fixed, derandomized set of examples in make test;
"fuzz" (make fuzz) runs many random ones and prints the seed of a failure.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import assume, given, note, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import ganops
from conftest import TOLERANCES, backend_params

FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
LAYOUTS = ["contiguous", "strided", "transposed", "channels_last"]
SPECIALS = ["zero", "inf", "-inf", "nan", "subnormal", "near_max"]
MAX_NORMS = [0.0, 1e-30, 1.0, 1e30, math.inf]
NORM_TYPES = [0.5, 1.0, 2.0, 3.5, math.inf]
# The low-precision reference's error is allowed twice over (docs/design.md).
FACTOR = 2.0
DEVICE_BACKENDS = backend_params()


# ---------------------------------------------------------------------------------------
# Drawing inputs
# ---------------------------------------------------------------------------------------

def _special(kind: str, dtype: torch.dtype, sign: float) -> float:
    info = torch.finfo(dtype)
    return sign * {"zero": 0.0, "inf": math.inf, "-inf": -math.inf, "nan": math.nan,
                   "subnormal": info.tiny / 4, "near_max": info.max * 0.75}[kind]


def _interpreter_bf16(dtype, backend) -> bool:
    """Triton's interpreter converts bfloat16 subnormals to 0 on load (its bit-level
    bf16 -> fp32 conversion drops them; a GPU's conversion is exact), so a bf16 subnormal
    can flip a Triton result there (W = [2.9e-39] gives 0 / 0). Such inputs are not drawn
    for the Triton backend on the interpreter; every other backend and a GPU get them."""
    return backend == "triton" and dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


@st.composite
def tensors(draw, shape, dtype, device, specials=True, layouts=True, scales=(1.0, 1e-3, 1e3), backend=None):
    """A tensor of ``shape`` and ``dtype``: normal values at a drawn scale, in about half
    the examples a few special values at drawn places, in a drawn memory layout."""
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from(scales))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    if specials and x.numel() and draw(st.booleans()):
        kinds = [k for k in SPECIALS if not (k == "subnormal" and _interpreter_bf16(dtype, backend))]
        for kind in draw(st.lists(st.sampled_from(kinds), min_size=1, max_size=3)):
            idx = draw(st.integers(0, x.numel() - 1))
            x.view(-1)[idx] = _special(kind, dtype, draw(st.sampled_from([1.0, -1.0])))
    x = x.to(dtype)
    layout = draw(st.sampled_from(LAYOUTS)) if layouts else "contiguous"
    note(f"tensor {tuple(shape)} {dtype} {layout} seed={seed} scale={scale}")
    return with_layout(x, layout).to(device)


def with_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another memory layout (contiguous where the layout does not apply)."""
    if layout == "strided" and x.dim() >= 1:
        big = torch.zeros(*x.shape[:-1], 2 * x.shape[-1] + 1, dtype=x.dtype)
        big[..., 1::2] = x
        return big[..., 1::2]
    if layout == "transposed" and x.dim() >= 2:
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "channels_last" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x.contiguous()


def odd_sizes(lo=1, hi=7):
    return st.integers(lo, hi)


# ---------------------------------------------------------------------------------------
# Agreement
# ---------------------------------------------------------------------------------------

def _classes(t: torch.Tensor) -> torch.Tensor:
    """0 finite, 1 +inf, 2 -inf, 3 NaN."""
    return torch.where(torch.isnan(t), 3, torch.where(t == math.inf, 1, torch.where(t == -math.inf, 2, 0)))


def assert_agree(actual, exact, low, dtype, what: str, scale=None, factor=FACTOR) -> None:
    """``actual`` against the float64 ``exact`` and the same formula run in ``dtype`` (``low``).

    ``scale``: where the result is a difference of larger terms (cancellation), their
    magnitude, which the relative tolerance then applies to. Where those terms do not fit
    in ``dtype`` at all (beyond its maximum), the result is not compared: any rounding of
    them decides it."""
    a = actual.detach().cpu().double()
    e = exact.detach().cpu().double()
    lo = low.detach().cpu().double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)}, expected {tuple(e.shape)}"
    # The float64 result rounded to the result's dtype: a true value past that dtype's
    # range is inf there whatever the computation.
    ca, ce, cl = _classes(a), _classes(e), _classes(lo)
    ce_rounded = _classes(e.to(actual.dtype).double()) if actual.dtype.is_floating_point else ce
    comparable = torch.ones_like(a, dtype=torch.bool)
    if scale is not None:
        comparable = ~(scale.detach().cpu().double().abs() > torch.finfo(dtype).max)
    bad = (ca != ce) & (ca != cl) & (ca != ce_rounded) & comparable
    if bad.any():
        k = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(f"{what}: non-finite pattern differs at {k}: got {a[k].item()}, float64 "
                             f"{e[k].item()}, {dtype} formula {lo[k].item()}")
    both = (ca == 0) & (ce == 0) & comparable
    t = TOLERANCES[dtype]
    ref_ok = both & (cl == 0)
    ref_err = (lo - e).abs()[ref_ok].max().item() if ref_ok.any() else 0.0
    err = (a - e).abs()
    mag = e.abs() if scale is None else torch.maximum(e.abs(), scale.detach().cpu().double().abs())
    bound = t["atol"] + t["rtol"] * mag + factor * ref_err
    over = both & (err > bound)
    if over.any():
        k = tuple(over.nonzero()[0].tolist())
        raise AssertionError(f"{what}: at {k} got {a[k].item()!r}, float64 {e[k].item()!r} (error {err[k].item():.3g}"
                             f" > {bound[k].item():.3g}; {dtype} formula's max error {ref_err:.3g})")


def acc_of(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def factor_for(dtype, backend) -> float:
    """FACTOR, doubled for bfloat16 results of Triton's interpreter: it converts float32 to
    bfloat16 by truncation (503 of 1024 random values differ from round-to-nearest), so a
    bfloat16 result there carries up to twice the rounding error it has on a GPU."""
    return 2 * FACTOR if _interpreter_bf16(dtype, backend) else FACTOR


# ---------------------------------------------------------------------------------------
# Spectral normalization
# ---------------------------------------------------------------------------------------

def sn_reference(weight, u, v, n_iter, eps, dim, training, dtype, grad):
    """(W / sigma, sigma, u, v, dW) computed in ``dtype`` by plain matrix algebra: the power
    iteration, sigma = u^T W v, and dW = (G - <G, W_sn> u v^T) / sigma (u, v constants)."""
    w = weight.detach().to(dtype)
    mat = w.movedim(dim, 0).reshape(w.shape[dim], -1)
    u, v = u.to(dtype), v.to(dtype)

    def normalize(x):
        # max(|x|, eps) with eps in this precision (inf past float32's range); NaN stays NaN.
        return x / torch.maximum(torch.sqrt((x * x).sum()), x.new_tensor(eps))

    if training:
        for _ in range(n_iter):
            u = normalize(mat @ v)
            v = normalize(mat.t() @ u)
    sigma = u @ (mat @ v)
    w_sn = w / sigma
    g = grad.to(dtype)
    coef = (g * w_sn).sum()
    dmat = (g.movedim(dim, 0).reshape(mat.shape) - coef * torch.outer(u, v)) / sigma
    dw = dmat.reshape(w.movedim(dim, 0).shape).movedim(0, dim)
    return w_sn, sigma, u, v, dw


@st.composite
def sn_cases(draw, device, backend):
    dtype = draw(st.sampled_from(FLOATS))
    ndim = draw(st.integers(2, 4))
    shape = tuple(draw(st.lists(odd_sizes(1, 6), min_size=ndim, max_size=ndim)))
    dim = draw(st.integers(-ndim, ndim - 1))
    # Weights near the dtype's maximum would overflow sigma's float32 sum of squares for
    # half types too; they are drawn (the pattern rule covers them).
    weight = draw(tensors(shape, dtype, device, backend=backend))
    rows = shape[dim]
    cols = weight.numel() // rows
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    u = torch.nn.functional.normalize(torch.randn(rows, generator=g, dtype=torch.float64), dim=0).to(dtype)
    v = torch.nn.functional.normalize(torch.randn(cols, generator=g, dtype=torch.float64), dim=0).to(dtype)
    n_iter = draw(st.integers(1, 3))
    eps = draw(st.sampled_from([1e-12, 1e-3, 0.0, 10.0, 1e300]))
    training = draw(st.booleans())
    grad = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return weight, u.to(device), v.to(device), dim, n_iter, eps, training, grad.to(device)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@given(data=st.data())
def test_spectral_normalize(device, backend, data):
    weight, u, v, dim, n_iter, eps, training, grad = data.draw(sn_cases(device, backend))
    dtype = weight.dtype
    u0, v0 = u.clone(), v.clone()
    w = weight.detach().clone().requires_grad_(True)
    w_sn, sigma = ganops.spectral_normalize(w, u, v, n_power_iterations=n_iter, eps=eps, dim=dim,
                                            training=training, backend=backend)
    (dw,) = torch.autograd.grad(w_sn, w, grad)
    d = dim % weight.dim()
    exact = sn_reference(weight.cpu(), u0.cpu(), v0.cpu(), n_iter, eps, d, training, torch.float64, grad.cpu())
    # torch's parametrization in the weight's own precision: u, v and sigma in that dtype.
    low = sn_reference(weight.cpu(), u0.cpu(), v0.cpu(), n_iter, eps, d, training, dtype, grad.cpu())
    assert w_sn.dtype == dtype and w_sn.shape == weight.shape
    assert sigma.dtype == acc_of(dtype)
    # u and v are stored in the weight's dtype between the half-steps: allowed on top.
    for name, got, e, lo in [("weight_sn", w_sn, exact[0], low[0]), ("sigma", sigma, exact[1], low[1]),
                             ("u", u, exact[2], low[2]), ("v", v, exact[3], low[3]), ("dW", dw, exact[4], low[4])]:
        # dW = (G - <G, W_sn> u v^T) / sigma cancels: the tolerance is relative to G / sigma.
        scale = grad.cpu().double() / exact[1] if name == "dW" else None
        assert_agree(got, e, lo, dtype, name, scale=scale, factor=factor_for(dtype, backend))


def _spectral_norm_module_case(device, backend, data):
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
    kind = data.draw(st.sampled_from(["linear", "conv2d", "convtranspose2d"]))
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    if kind == "linear":
        module = torch.nn.Linear(data.draw(odd_sizes()), data.draw(odd_sizes()))
    elif kind == "conv2d":
        module = torch.nn.Conv2d(data.draw(odd_sizes(1, 4)), data.draw(odd_sizes(1, 4)), 3)
    else:
        module = torch.nn.ConvTranspose2d(data.draw(odd_sizes(1, 4)), data.draw(odd_sizes(1, 4)), 3)
    module = module.to(device, dtype)
    n_iter = data.draw(st.integers(1, 3))
    training = data.draw(st.booleans())
    ganops.spectral_norm(module, n_power_iterations=n_iter, backend=backend)
    module.train(training)
    param = module.parametrizations.weight
    u0, v0 = param[0]._u.clone(), param[0]._v.clone()
    w = param.original
    dim = param[0].dim
    out = module.weight
    grad = torch.randn_like(out)
    (dw,) = torch.autograd.grad(out, w, grad)
    exact = sn_reference(w.cpu(), u0.cpu(), v0.cpu(), n_iter, 1e-12, dim, training, torch.float64, grad.cpu())
    low = sn_reference(w.cpu(), u0.cpu(), v0.cpu(), n_iter, 1e-12, dim, training, dtype, grad.cpu())
    assert_agree(out, exact[0], low[0], dtype, "weight_sn")
    assert_agree(param[0]._u, exact[2], low[2], dtype, "u")
    assert_agree(dw, exact[4], low[4], dtype, "dW", scale=grad.cpu().double() / exact[1])


@pytest.mark.parametrize("device,backend", [p for p in DEVICE_BACKENDS if p.values[1] != "triton"])
@given(data=st.data())
def test_spectral_norm_module(device, backend, data):
    _spectral_norm_module_case(device, backend, data)


# Registering the parametrization runs torch's 15 warm-up power iterations, several Triton
# launches each: about 3 s an example under the interpreter, so fewer examples here (the
# registry's Triton ops get the full count in test_spectral_normalize).
@pytest.mark.parametrize("device,backend", [p for p in DEVICE_BACKENDS if p.values[1] == "triton"])
@settings(max_examples=min(settings.default.max_examples, 8))
@given(data=st.data())
def test_spectral_norm_module_triton(device, backend, data):
    _spectral_norm_module_case(device, backend, data)


# ---------------------------------------------------------------------------------------
# Gradient penalty: interpolate, gradient_norm_penalty, gradient_penalty, r1_penalty
# ---------------------------------------------------------------------------------------

@st.composite
def sample_shapes(draw):
    """(N, ...) shapes: one sample, one element per sample, odd sizes, 2-D to 4-D."""
    n = draw(st.integers(1, 5))
    rest = draw(st.lists(odd_sizes(1, 5), min_size=1, max_size=3))
    return (n, *rest)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@given(data=st.data())
def test_interpolate(device, backend, data):
    dtype = data.draw(st.sampled_from(FLOATS))
    shape = data.draw(sample_shapes())
    n = shape[0]
    real = data.draw(tensors(shape, dtype, device, backend=backend))
    fake = data.draw(tensors(shape, dtype, device, backend=backend))
    alpha = data.draw(tensors((n,), dtype, device, specials=False, scales=(1.0,))).abs().clamp(max=1)
    alpha_shape = data.draw(st.sampled_from(["flat", "broadcast"]))
    a_in = alpha if alpha_shape == "flat" else alpha.reshape((n,) + (1,) * (len(shape) - 1))
    r, f, a = (t.detach().clone().requires_grad_(True) for t in (real, fake, a_in))
    out = ganops.interpolate(r, f, a, backend=backend)
    grad = torch.randn(shape, dtype=torch.float64).to(device, dtype)
    dr, df, da = torch.autograd.grad(out, (r, f, a), grad)

    def formula(prec):
        rr, ff, aa, gg = (t.detach().cpu().to(prec) for t in (real, fake, alpha, grad))
        ab = aa.reshape((n,) + (1,) * (len(shape) - 1))
        x = ab * rr + (1 - ab) * ff
        return x, ab * gg, (1 - ab) * gg, (gg * (rr - ff)).reshape(n, -1).sum(1)

    exact, low = formula(torch.float64), formula(acc_of(dtype))
    for name, got, e, lo in zip(["x_hat", "d real", "d fake", "d alpha"], (out, dr, df, da), exact, low):
        assert_agree(got.reshape(e.shape), e, lo.to(dtype), dtype, name, factor=factor_for(dtype, backend))


def penalty_formula(grads, inv_scale, center, one_sided, weight, go, prec):
    """(penalty, ∂penalty/∂grads) in ``prec``: h(n) = (n − c)², one-sided max(0, n − c)², R1
    (c = 0) n² from the sum of squares; the gradient's factor h'(n)/n is 0 at n = 0."""
    n = grads.shape[0]
    g = grads.detach().cpu().to(prec).reshape(n, -1)
    s = 1.0 if inv_scale is None else torch.as_tensor(inv_scale, dtype=torch.float64).cpu().to(prec)
    g = g * s
    ss = (g * g).sum(1)
    norm = torch.sqrt(ss)
    if center == 0:
        terms, factor = ss, torch.full_like(ss, 2.0)
    else:
        d = norm - center
        if one_sided:
            d = torch.where(d < 0, torch.zeros_like(d), d)
        terms = d * d
        factor = torch.where(norm == 0, torch.zeros_like(norm), 2 * d / torch.where(norm == 0, 1.0, norm))
    penalty = terms.sum() / n * weight
    dgrads = go * (weight / n) * factor[:, None] * s * s * grads.detach().cpu().to(prec).reshape(n, -1)
    return penalty, dgrads.reshape(grads.shape)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@given(data=st.data())
def test_gradient_norm_penalty(device, backend, data):
    dtype = data.draw(st.sampled_from(FLOATS))
    shape = data.draw(sample_shapes())
    grads = data.draw(tensors(shape, dtype, device, backend=backend))
    center = data.draw(st.sampled_from([1.0, 0.0, 0.5, 1e-30, 1e30, 1e300, -2.0]))
    weight = data.draw(st.sampled_from([10.0, 1.0, 0.0, 1e-30, 1e300]))
    one_sided = data.draw(st.booleans())
    inv_kind = data.draw(st.sampled_from(["none", "number", "tensor"]))
    inv_value = data.draw(st.sampled_from([1.0, 2.0 ** -16, 0.0, 3.0]))
    inv_scale = None if inv_kind == "none" else (
        inv_value if inv_kind == "number" else torch.tensor(inv_value, dtype=torch.float32, device=device))
    g = grads.detach().clone().requires_grad_(True)
    out = ganops.gradient_norm_penalty(g, center=center, one_sided=one_sided, weight=weight, inv_scale=inv_scale,
                                       backend=backend)
    assert out.dtype == dtype and out.dim() == 0
    go = data.draw(st.sampled_from([1.0, -0.5, 3.0]))
    (dg,) = torch.autograd.grad(out, g, torch.tensor(go, dtype=dtype, device=device))
    inv = None if inv_scale is None else float(inv_value)
    exact = penalty_formula(grads, inv, center, one_sided, weight, go, torch.float64)
    low = penalty_formula(grads, inv, center, one_sided, weight, go, acc_of(dtype))
    f = factor_for(dtype, backend)
    assert_agree(out, exact[0], low[0].to(dtype), dtype, "penalty", factor=f)
    assert_agree(dg, exact[1], low[1].to(dtype), dtype, "d grads", factor=f)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@given(data=st.data())
def test_gradient_norm_penalty_double_backward(device, backend, data):
    """The penalty's gradient differentiated again (create_graph=True), against float64 autograd
    of the formula; finite inputs with a nonzero norm, where the formula is smooth."""
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
    shape = data.draw(sample_shapes())
    grads = data.draw(tensors(shape, dtype, device, specials=False, scales=(1.0,)))
    assume(bool((grads.reshape(shape[0], -1).abs().sum(1) > 0).all()))
    center = data.draw(st.sampled_from([1.0, 0.0, 0.5]))
    one_sided = data.draw(st.booleans())
    g = grads.detach().clone().requires_grad_(True)
    out = ganops.gradient_norm_penalty(g, center=center, one_sided=one_sided, weight=2.0, backend=backend)
    (dg,) = torch.autograd.grad(out, g, create_graph=True)
    h = torch.randn(shape, dtype=torch.float64)
    (ddg,) = torch.autograd.grad(dg, g, h.to(device, dtype))

    g64 = grads.detach().cpu().double().requires_grad_(True)
    x = g64.reshape(shape[0], -1)
    if center == 0:
        terms = (x * x).sum(1)
    else:
        d = x.norm(dim=1) - center
        terms = (d.clamp(min=0) if one_sided else d) ** 2
    p64 = terms.mean() * 2.0
    (dg64,) = torch.autograd.grad(p64, g64, create_graph=True)
    (ddg64,) = torch.autograd.grad(dg64, g64, h)
    assert_agree(dg, dg64, dg64.to(dtype), dtype, "d grads")
    assert_agree(ddg, ddg64, ddg64.to(dtype), dtype, "d² grads")


def _critic(d_in: int, dtype, device, seed: int):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(d_in, 6), torch.nn.Tanh(),
                               torch.nn.Linear(6, 1)).to(device, dtype)


def _penalty_autograd(critic64, x, center, one_sided, weight):
    """The penalty by plain autograd, in x's precision: weight · mean h(‖∇_x D(x)‖)."""
    x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(critic64(x).sum(), x, create_graph=True)
    norm = g.reshape(x.shape[0], -1).norm(dim=1)
    if center == 0:
        terms = (g.reshape(x.shape[0], -1) ** 2).sum(1)
    else:
        d = norm - center
        terms = (d.clamp(min=0) if one_sided else d) ** 2
    return terms.mean() * weight


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@given(data=st.data())
def test_gradient_penalty_and_r1(device, backend, data):
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
    shape = data.draw(sample_shapes())
    n = shape[0]
    d_in = math.prod(shape[1:])
    real = data.draw(tensors(shape, dtype, device, specials=False))
    fake = data.draw(tensors(shape, dtype, device, specials=False))
    alpha = torch.rand(n, dtype=torch.float64).to(device, dtype)
    seed = data.draw(st.integers(0, 2**16))
    kind = data.draw(st.sampled_from(["gp", "r1"]))
    center = data.draw(st.sampled_from([1.0, 0.5]))
    one_sided = data.draw(st.booleans())
    critic = _critic(d_in, dtype, device, seed)
    critic64 = _critic(d_in, torch.float64, "cpu", seed)
    critic_low = _critic(d_in, dtype, "cpu", seed)

    def plain(net, prec):
        if kind == "r1":
            return _penalty_autograd(net, real.cpu().to(prec), 0.0, False, 5.0)
        a = alpha.cpu().to(prec).reshape((n,) + (1,) * (len(shape) - 1))
        return _penalty_autograd(net, a * real.cpu().to(prec) + (1 - a) * fake.cpu().to(prec), center, one_sided,
                                 10.0)

    if kind == "gp":
        penalty = ganops.gradient_penalty(critic, real, fake, weight=10.0, center=center, one_sided=one_sided,
                                          alpha=alpha, backend=backend)
    else:
        penalty = ganops.r1_penalty(critic, real, gamma=10.0, backend=backend)
    p64, p_low = plain(critic64, torch.float64), plain(critic_low, dtype)
    # The last layer's bias does not reach the input gradient: the plain formula leaves it
    # without a gradient (None), while ganops gives every parameter of the forward one, zero
    # where the penalty does not reach (so DDP sees them all, as lazy R1 needs).
    grads = torch.autograd.grad(penalty, list(critic.parameters()), allow_unused=True)
    grads64 = torch.autograd.grad(p64, list(critic64.parameters()), allow_unused=True)
    grads_low = torch.autograd.grad(p_low, list(critic_low.parameters()), allow_unused=True)
    assert_agree(penalty, p64, p_low, dtype, "penalty")
    for i, (got, e, lo) in enumerate(zip(grads, grads64, grads_low)):
        assert got is not None, f"critic parameter {i} got no gradient"
        if e is None:
            assert lo is None
            assert torch.equal(got, torch.zeros_like(got)), f"critic parameter {i}: {got} where the penalty is 0"
        else:
            assert_agree(got, e, lo, dtype, f"critic parameter {i} gradient")


# ---------------------------------------------------------------------------------------
# Minibatch discrimination
# ---------------------------------------------------------------------------------------

def similarity_formula(M, exclude_self, g, h, prec):
    """(o, dM, d/dg, d/dM of <h, dM>) in ``prec`` by broadcasting, following the formulas of
    the op's docstring with K[i,j,b] = exp(−‖M_i − M_j‖₁), the j = i terms of the gradients 0."""
    M, g, h = M.detach().cpu().to(prec), g.detach().cpu().to(prec), h.detach().cpu().to(prec)
    n = M.shape[0]
    diff = M[:, None] - M[None]                           # (i, j, b, c)
    K = torch.exp(-diff.abs().sum(-1))                    # (i, j, b)
    off = ~torch.eye(n, dtype=torch.bool)[..., None]      # j != i
    o = torch.where(off, K, torch.zeros_like(K) if exclude_self else K).sum(1)
    s = torch.where(torch.isnan(diff), torch.zeros_like(diff), torch.sign(diff))
    gij = g[:, None] + g[None]                             # (i, j, b)
    w = torch.where(off, -gij * K, torch.zeros_like(K))
    dM = (w[..., None] * s).sum(1)
    Q = ((h[:, None] - h[None]) * s).sum(-1)
    KQ = torch.where(off, K * Q, torch.zeros_like(K))
    d_g = -KQ.sum(1)
    d_M = ((gij * KQ)[..., None] * s).sum(1)
    return o, dM, d_g, d_M


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@given(data=st.data())
def test_minibatch_similarity(device, backend, data):
    dtype = data.draw(st.sampled_from(FLOATS))
    n = data.draw(st.integers(1, 6))
    b = data.draw(st.integers(0, 4))
    c = data.draw(st.sampled_from([0, 1, 3, 5, 16, 67]))
    M = data.draw(tensors((n, b, c), dtype, device, scales=(1.0, 0.1, 10.0), backend=backend))
    exclude_self = data.draw(st.booleans())
    m = M.detach().clone().requires_grad_(True)
    out = ganops.minibatch_similarity(m, exclude_self=exclude_self, backend=backend)
    g = torch.randn(n, b, dtype=torch.float64).to(device, dtype).requires_grad_(True)
    (dM,) = torch.autograd.grad(out, m, g, create_graph=True)
    h = torch.randn(n, b, c, dtype=torch.float64).to(device, dtype)
    d_g, d_M = torch.autograd.grad(dM, (g, m), h, allow_unused=True)
    exact = similarity_formula(M, exclude_self, g, h, torch.float64)
    low = similarity_formula(M, exclude_self, g, h, acc_of(dtype))
    names = ["o", "dM", "d²/dg", "d²/dM"]
    for name, got, e, lo in zip(names, (out, dM, d_g, d_M), exact, low):
        got = torch.zeros_like(e) if got is None else got
        assert_agree(got, e, lo.to(dtype), dtype, name, factor=factor_for(dtype, backend))


# ---------------------------------------------------------------------------------------
# Gradient clipping
# ---------------------------------------------------------------------------------------

@st.composite
def grad_lists(draw, device, backend):
    """1 to 4 parameters with gradients of drawn shapes (empty ones too) and dtypes (one
    dtype for all, or mixed)."""
    count = draw(st.integers(1, 4))
    mixed = draw(st.booleans())
    dtype = draw(st.sampled_from(FLOATS))
    params = []
    for _ in range(count):
        dt = draw(st.sampled_from(FLOATS)) if mixed else dtype
        shape = tuple(draw(st.lists(st.integers(0, 6), min_size=1, max_size=3)))
        grad = draw(tensors(shape, dt, device, backend=backend))
        p = torch.nn.Parameter(torch.zeros(shape, dtype=dt, device=device))
        p.grad = grad
        params.append(p)
    return params


def norm_formula(grads, p, prec):
    """The total norm of every gradient as one vector, each gradient's own norm taken in
    ``prec`` (float32 for the low-precision run of half gradients, as the kernels)."""
    norms = []
    for g in grads:
        x = g.detach().cpu().to(prec if g.dtype != torch.float64 else torch.float64).reshape(-1).abs()
        if x.numel() == 0:
            norms.append(torch.zeros((), dtype=torch.float64))
        elif p == math.inf:
            norms.append(x.max().double())
        else:
            norms.append((x ** p).sum().double())
    t = torch.stack(norms)
    total = t.max() if p == math.inf else t.sum() ** (1.0 / p)
    per = t if p == math.inf else t ** (1.0 / p)
    return total, per


def result_dtype(grads):
    return torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32


def lowest_dtype(grads):
    """The least precise gradient dtype (the tolerance the total norm is held to)."""
    order = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
    return min((g.dtype for g in grads), key=order.index)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@given(data=st.data())
def test_get_total_norm_and_grad_norm(device, backend, data):
    params = data.draw(grad_lists(device, backend))
    grads = [p.grad for p in params]
    p = data.draw(st.sampled_from(NORM_TYPES))
    exact, exact_per = norm_formula(grads, p, torch.float64)
    low, low_per = norm_formula(grads, p, torch.float32)
    tol_dtype = lowest_dtype(grads)
    total = ganops.get_total_norm(grads, p, backend=backend)
    assert total.dtype == result_dtype(grads)
    assert_agree(total, exact, low, tol_dtype, "get_total_norm")
    total2, per = ganops.grad_norm(params, p, per_tensor=True, backend=backend)
    assert_agree(total2, exact, low, tol_dtype, "grad_norm total")
    assert_agree(per, exact_per, low_per, tol_dtype, "grad_norm per tensor")


def _clipped(grads, total, max_norm):
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    return [g.detach().cpu().double() * coef for g in grads]


def _draw_grads_and_max_norm(data, device, backend):
    """(parameters with gradients, a copy of the gradients, max_norm)."""
    params = data.draw(grad_lists(device, backend))
    return params, [p.grad.clone() for p in params], data.draw(st.sampled_from(MAX_NORMS))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@given(data=st.data())
def test_clip_grad_norm(device, backend, data):
    params, grads0, max_norm = _draw_grads_and_max_norm(data, device, backend)
    p = data.draw(st.sampled_from(NORM_TYPES))
    exact, _ = norm_formula(grads0, p, torch.float64)
    low, _ = norm_formula(grads0, p, torch.float32)
    tol_dtype = lowest_dtype(grads0)
    total = ganops.clip_grad_norm_(params, max_norm, p, backend=backend)
    assert total.dtype == result_dtype(grads0)
    assert_agree(total, exact, low, tol_dtype, "clip_grad_norm_ total")
    for i, (param, e, lo) in enumerate(zip(params, _clipped(grads0, exact, max_norm),
                                           _clipped(grads0, low, max_norm))):
        assert_agree(param.grad, e, lo.to(param.grad.dtype), param.grad.dtype, f"clipped gradient {i}")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@given(data=st.data())
def test_clip_grads_with_norm(device, backend, data):
    params, grads0, max_norm = _draw_grads_and_max_norm(data, device, backend)
    total = data.draw(st.sampled_from([0.0, 1e-3, 1.0, 7.5, 1e30, math.inf, math.nan]))
    total_t = torch.tensor(total, dtype=data.draw(st.sampled_from([torch.float32, torch.float64])), device=device)
    ganops.clip_grads_with_norm_(params, max_norm, total_t, backend=backend)
    t64 = torch.tensor(total_t.item(), dtype=torch.float64)
    for i, (param, e) in enumerate(zip(params, _clipped(grads0, t64, max_norm))):
        assert_agree(param.grad, e, e.to(param.grad.dtype), param.grad.dtype, f"clipped gradient {i}")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@given(data=st.data())
def test_clip_grad_value(device, backend, data):
    params = data.draw(grad_lists(device, backend))
    grads0 = [p.grad.clone() for p in params]
    clip_value = data.draw(st.sampled_from([0.0, 1e-30, 0.5, 1.0, 1e30, math.inf]))
    ganops.clip_grad_value_(params, clip_value, backend=backend)
    for i, (param, g0) in enumerate(zip(params, grads0)):
        e = g0.cpu().double().clamp(-clip_value, clip_value)
        assert_agree(param.grad, e, e.to(g0.dtype), g0.dtype, f"clipped gradient {i}")


# ---------------------------------------------------------------------------------------
# Every registered op, from the registry
# ---------------------------------------------------------------------------------------
# The op list is _library.REGISTRY: an op is in the differential suite as soon as its hub
# declares it, with no edit here. Its examples in a drawn dtype (the hub's, which keeps
# their dtype relations: an accumulator in float32 beside half tensors) are redrawn in a
# drawn memory layout, and the registered op on each backend is compared, output by output
# and mutated argument by mutated argument, with its reference run on the same arguments
# and on them in float64 (assert_agree's rule). The public functions' own tests above draw shapes, arguments and
# special values per op.

def _redrawn(value, layout, device, dtype=None):
    """A copy of an example's argument with its tensors in ``layout`` on ``device`` (and in
    ``dtype``, where given)."""
    if isinstance(value, torch.Tensor):
        return with_layout(value.detach().cpu().to(dtype or value.dtype, copy=True), layout).to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_redrawn(v, layout, device, dtype) for v in value)
    return value


def _results(op, args, result) -> list[torch.Tensor]:
    """The op's outputs, then the tensors of its mutated arguments."""
    outs = [result] if isinstance(result, torch.Tensor) else list(result or ())
    for name in op.mutated_args:
        arg = args[op.arg_names.index(name)]
        outs += arg if isinstance(arg, (list, tuple)) else [arg]
    return outs


@pytest.mark.parametrize("name", sorted(ganops._library.REGISTRY))
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@settings(max_examples=min(settings.default.max_examples, 5))
@given(data=st.data())
def test_registered_op_against_its_float64_reference(name, device, backend, data):
    op = ganops._library.REGISTRY[name]
    assert op.examples is not None, f"{name} declares no examples"
    dtype = data.draw(st.sampled_from(FLOATS))
    layout = data.draw(st.sampled_from(LAYOUTS))
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    examples = op.examples("cpu", dtype)
    example = examples[data.draw(st.integers(0, len(examples) - 1))]
    note(f"{name} example {example!r:.200} in {dtype}, {layout}")
    with torch.no_grad():
        actual_args = _redrawn(example, layout, device)
        actual = _results(op, actual_args, ganops._library.call(op, backend, device, *actual_args))
        exact_args = _redrawn(example, layout, "cpu", torch.float64)
        exact = _results(op, exact_args, op.reference(*exact_args))
        low_args = _redrawn(example, layout, "cpu")
        low = _results(op, low_args, op.reference(*low_args))
    assert len(actual) == len(exact)
    for k, (a, e, lo) in enumerate(zip(actual, exact, low)):
        assert_agree(a, e, lo, dtype, f"{name} result {k}", factor=factor_for(dtype, backend))


# ---------------------------------------------------------------------------------------
# Argument errors: the same exception and message on every backend, before any kernel
# ---------------------------------------------------------------------------------------

class _GanopsOps(TorchDispatchMode):
    """Records every op of the ganops namespace that ran to completion while active.

    A fused clip op is entered before Python looks at the gradients (a Python pass over
    thousands of them would cost every call); it checks them all before it touches any, and
    raises. Such a refusal is not a kernel having run, so only completed calls count."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.namespace == "ganops":
            self.seen.append(str(func))
        return out


def _param(values, dtype=torch.float32):
    p = torch.nn.Parameter(torch.zeros(len(values), dtype=dtype))
    p.grad = torch.tensor(values, dtype=dtype)
    return p


def _bad_calls():
    w = torch.randn(4, 3)
    u, v = torch.randn(4), torch.randn(3)
    x = torch.randn(2, 3)
    M = torch.randn(3, 2, 4)
    calls = {
        "sn int weight": lambda b: ganops.spectral_normalize(w.long(), u, v, backend=b),
        "sn n_power_iterations 0": lambda b: ganops.spectral_normalize(w, u, v, n_power_iterations=0, backend=b),
        "sn eps negative": lambda b: ganops.spectral_normalize(w, u, v, eps=-1.0, backend=b),
        "sn eps nan": lambda b: ganops.spectral_normalize(w, u, v, eps=math.nan, backend=b),
        "sn dim out of range": lambda b: ganops.spectral_normalize(w, u, v, dim=2, backend=b),
        "sn u size": lambda b: ganops.spectral_normalize(w, v, v, backend=b),
        "sn v dtype": lambda b: ganops.spectral_normalize(w, u, v.double(), backend=b),
        "sn empty weight": lambda b: ganops.spectral_normalize(torch.zeros(0, 3), u[:0], v, backend=b),
        "interpolate shapes": lambda b: ganops.interpolate(x, x[:1], torch.rand(2), backend=b),
        "interpolate alpha shape": lambda b: ganops.interpolate(x, x, torch.rand(3), backend=b),
        "interpolate int": lambda b: ganops.interpolate(x.long(), x.long(), torch.rand(2), backend=b),
        "penalty center nan": lambda b: ganops.gradient_norm_penalty(x, center=math.nan, backend=b),
        "penalty weight inf": lambda b: ganops.gradient_norm_penalty(x, weight=math.inf, backend=b),
        "penalty inv_scale negative": lambda b: ganops.gradient_norm_penalty(x, inv_scale=-1.0, backend=b),
        "penalty inv_scale two values": lambda b: ganops.gradient_norm_penalty(x, inv_scale=torch.ones(2),
                                                                               backend=b),
        "penalty one_sided int": lambda b: ganops.gradient_norm_penalty(x, one_sided=1, backend=b),
        "penalty empty": lambda b: ganops.gradient_norm_penalty(x[:0], backend=b),
        "r1 gamma nan": lambda b: ganops.r1_penalty(lambda t: t.sum(1), x, gamma=math.nan, backend=b),
        "mbd 2-D": lambda b: ganops.minibatch_similarity(M[0], backend=b),
        "mbd no samples": lambda b: ganops.minibatch_similarity(M[:0], backend=b),
        "mbd int": lambda b: ganops.minibatch_similarity(M.long(), backend=b),
        "mbd exclude_self int": lambda b: ganops.minibatch_similarity(M, exclude_self=1, backend=b),
        "clip norm_type 0": lambda b: ganops.clip_grad_norm_([_param([1.0, 2.0])], 1.0, 0.0, backend=b),
        "clip max_norm nan": lambda b: ganops.clip_grad_norm_([_param([1.0])], math.nan, backend=b),
        "clip max_norm negative": lambda b: ganops.clip_grad_norm_([_param([1.0])], -1.0, backend=b),
        "clip int gradient": lambda b: ganops.clip_grad_norm_(
            [_param([1.0]), _int_grad_param()], 1.0, backend=b),
        "total norm int tensor": lambda b: ganops.get_total_norm([torch.ones(2), torch.ones(2, dtype=torch.long)],
                                                                 backend=b),
        "total norm norm_type -1": lambda b: ganops.get_total_norm([torch.ones(2)], -1.0, backend=b),
        "clip with norm total not tensor": lambda b: ganops.clip_grads_with_norm_([_param([1.0])], 1.0, 2.0,
                                                                                   backend=b),
        "grad_norm norm_type str": lambda b: ganops.grad_norm([_param([1.0])], "fro", backend=b),
    }
    if hasattr(ganops, "clip_grad_value_"):
        calls["clip value nan"] = lambda b: ganops.clip_grad_value_([_param([1.0])], math.nan, backend=b)
        calls["clip value int gradient"] = lambda b: ganops.clip_grad_value_([_param([1.0]), _int_grad_param()],
                                                                             1.0, backend=b)
    return calls


def _int_grad_param():
    """A parameter whose .grad is int64 (set through .data: autograd refuses a mismatched grad)."""
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.zeros(2)
    p.grad.data = torch.ones(2, dtype=torch.long)
    return p


@pytest.mark.parametrize("case", sorted(_bad_calls()))
def test_argument_errors_match_across_backends(case):
    call = _bad_calls()[case]
    outcomes = {}
    for backend in ganops.available_backends("cpu"):
        mode = _GanopsOps()
        try:
            with mode:
                call(backend)
        except Exception as exc:  # noqa: BLE001  (the exception itself is what is compared)
            outcomes[backend] = (type(exc).__name__, str(exc), mode.seen)
        else:
            outcomes[backend] = ("no error", "", mode.seen)
    first = next(iter(outcomes.values()))
    assert first[0] != "no error", f"{case}: no backend raised: {outcomes}"
    for backend, outcome in outcomes.items():
        assert outcome[:2] == first[:2], f"{case}: backends disagree: {outcomes}"
        assert not outcome[2], f"{case}: {backend} ran kernels {outcome[2]} before raising"
