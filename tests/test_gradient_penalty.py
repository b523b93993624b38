"""Tests of ganops.gradient_penalty, ganops.r1_penalty and their fused pieces.

Everything is checked against a hand-written WGAN-GP / R1 in plain PyTorch (the canonical
formulas below, written here rather than taken from ganops' own reference), in float64.
Critics with spectral-normalised layers and minibatch discrimination are tested in
tests/test_integration.py.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ganops
from conftest import assert_within_reference_error, backend_params, tol

BACKENDS = backend_params()
CPU_BACKENDS = backend_params(devices=("cpu",))
HAS_CPP = ganops._backend.unavailable_reason("cpp", "cpu") is None
requires_cpp = pytest.mark.skipif(not HAS_CPP, reason="the compiled extension is not built")


# ---------------------------------------------------------------------------------------
# The canonical formulas, written out by hand
# ---------------------------------------------------------------------------------------

def canonical_wgan_gp(critic, real, fake, alpha, weight=10.0, center=1.0, one_sided=False):
    """Gulrajani et al.'s penalty as it is usually written in training scripts."""
    n = real.shape[0]
    a = alpha.reshape(n, *([1] * (real.dim() - 1)))
    x_hat = a * real + (1 - a) * fake
    if not x_hat.requires_grad:
        x_hat.requires_grad_(True)
    out = critic(x_hat)
    grads = torch.autograd.grad(outputs=out, inputs=x_hat, grad_outputs=torch.ones_like(out),
                                create_graph=True, retain_graph=True)[0]
    norms = grads.reshape(n, -1).norm(2, dim=1)
    d = norms - center
    if one_sided:
        d = torch.relu(d)
    return weight * (d ** 2).mean()


def canonical_r1(critic, real, gamma=10.0):
    """StyleGAN's R1: gamma / 2 * E ||grad_x D(x)||^2 on reals."""
    x = real.detach().requires_grad_(True)
    out = critic(x)
    (grads,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    return gamma / 2 * grads.square().reshape(x.shape[0], -1).sum(1).mean()


def input_grad_norms(critic, real, fake, alpha):
    a = alpha.reshape(-1, *([1] * (real.dim() - 1)))
    x = (a * real + (1 - a) * fake).requires_grad_(True)
    (g,) = torch.autograd.grad(critic(x).sum(), x)
    return g.reshape(g.shape[0], -1).norm(dim=1)


def mlp_critic(in_features=6, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(in_features, 16), nn.LeakyReLU(0.2), nn.LayerNorm(16),
                         nn.Linear(16, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1)).double()


def conv_critic(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.LeakyReLU(0.2), nn.GroupNorm(2, 8),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.LeakyReLU(0.2), nn.LayerNorm([8, 2, 2]),
        nn.Flatten(), nn.Linear(32, 1), nn.Flatten(0)).double()  # output (N,)


CRITICS = {"mlp": (mlp_critic, (5, 6)), "conv": (conv_critic, (4, 3, 8, 8))}


def param_grads(critic, loss):
    params = list(critic.parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def assert_close_list(actual, expected, **kw):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, **kw)


def samples(shape, device="cpu", dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    real = torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype)
    fake = torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype)
    alpha = torch.rand(shape[0], generator=g, dtype=torch.float64).to(device, dtype)
    return real, fake, alpha


# ---------------------------------------------------------------------------------------
# Against the canonical WGAN-GP and R1: value and every critic parameter's gradient
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(CRITICS))
@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("one_sided", [False, True])
def test_gradient_penalty_matches_canonical(kind, device, backend, one_sided):
    make, shape = CRITICS[kind]
    critic = make().to(device)
    real, fake, alpha = samples(shape, device)
    # For one_sided, a center at the mean norm has samples on each side: some are clipped.
    center = input_grad_norms(critic, real, fake, alpha).mean().item() if one_sided else 1.0
    expected = canonical_wgan_gp(critic, real, fake, alpha, weight=7.0, center=center, one_sided=one_sided)
    got = ganops.gradient_penalty(critic, real, fake, alpha=alpha, weight=7.0, center=center, one_sided=one_sided,
                                  backend=backend)
    assert got.shape == () and got.dtype == torch.float64
    torch.testing.assert_close(got, expected, **tol(torch.float64))
    assert_close_list(param_grads(critic, got), param_grads(critic, expected), **tol(torch.float64))


@pytest.mark.parametrize("kind", list(CRITICS))
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_r1_matches_canonical(kind, device, backend):
    make, shape = CRITICS[kind]
    critic = make().to(device)
    real, _, _ = samples(shape, device)
    expected = canonical_r1(critic, real, gamma=3.0)
    got = ganops.r1_penalty(critic, real, gamma=3.0, backend=backend)
    torch.testing.assert_close(got, expected, **tol(torch.float64))
    assert_close_list(param_grads(critic, got), param_grads(critic, expected), **tol(torch.float64))


@pytest.mark.parametrize("kind", list(CRITICS))
def test_one_sided_clips_some_samples(kind):
    """The one-sided case above must not be vacuous: the norms are not all equal, so the mean
    has samples on both sides, and the two-sided penalty differs from the one-sided one."""
    make, shape = CRITICS[kind]
    critic = make()
    real, fake, alpha = samples(shape)
    norms = input_grad_norms(critic, real, fake, alpha)
    center = norms.mean()
    assert (norms < center).any() and (norms > center).any(), norms


@pytest.mark.parametrize("device,backend", CPU_BACKENDS)
def test_gradients_reach_real_and_fake(device, backend):
    critic = mlp_critic()
    real, fake, alpha = samples((5, 6))
    real.requires_grad_(True)
    fake.requires_grad_(True)
    expected = canonical_wgan_gp(critic, real, fake, alpha)
    got = ganops.gradient_penalty(critic, real, fake, alpha=alpha, backend=backend)
    exp_r, exp_f = torch.autograd.grad(expected, (real, fake))
    got_r, got_f = torch.autograd.grad(got, (real, fake))
    torch.testing.assert_close(got_r, exp_r, **tol(torch.float64))
    torch.testing.assert_close(got_f, exp_f, **tol(torch.float64))
    assert exp_r.abs().max() > 0


@pytest.mark.parametrize("device,backend", CPU_BACKENDS)
def test_alpha_shapes_and_generator(device, backend):
    critic = mlp_critic()
    real, fake, alpha = samples((5, 6))
    flat = ganops.gradient_penalty(critic, real, fake, alpha=alpha, backend=backend)
    column = ganops.gradient_penalty(critic, real, fake, alpha=alpha[:, None], backend=backend)
    torch.testing.assert_close(flat, column, rtol=0, atol=0)
    # Without alpha: one U[0, 1) draw per sample from the generator, as torch.rand(N) draws.
    drawn = ganops.gradient_penalty(critic, real, fake, generator=torch.Generator().manual_seed(7),
                                    backend=backend)
    alpha_7 = torch.rand(5, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    torch.testing.assert_close(drawn, canonical_wgan_gp(critic, real, fake, alpha_7), **tol(torch.float64))


@pytest.mark.parametrize("device,backend", CPU_BACKENDS)
def test_norm_is_per_sample_over_all_dims(device, backend):
    """The classic bug, a norm over channels per pixel, would give a different value here."""
    g = torch.zeros(2, 3, 2, 2, dtype=torch.float64)
    g[0, :, 0, 0] = torch.tensor([3.0, 0.0, 0.0])
    g[0, 0, 1, 1] = 4.0
    got = ganops.gradient_norm_penalty(g, center=1.0, weight=1.0, backend=backend)
    # sample 0: ||g|| = 5; sample 1: 0.
    torch.testing.assert_close(got, torch.tensor((16.0 + 1.0) / 2, dtype=torch.float64))


# ---------------------------------------------------------------------------------------
# The fused pieces
# ---------------------------------------------------------------------------------------

def exact_penalty(grads, center, one_sided, weight, inv_scale=1.0):
    """Float64 value of the penalty, written independently of ganops."""
    g = grads.double().reshape(grads.shape[0], -1) * inv_scale
    d = g.norm(dim=1) - center
    if one_sided:
        d = d.clamp(min=0)
    return weight * (d * d).mean()


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("center,one_sided", [(1.0, False), (0.7, True), (0.0, False)])
def test_gradient_norm_penalty_gradcheck(device, backend, center, one_sided):
    g = torch.randn(4, 3, 5, dtype=torch.float64, device=device) * 0.5
    g[1] = 0  # a zero-norm sample inside the checked region
    g.requires_grad_(True)

    def fn(x):
        return ganops.gradient_norm_penalty(x, center=center, one_sided=one_sided, weight=2.5, backend=backend)

    torch.testing.assert_close(fn(g), exact_penalty(g.detach(), center, one_sided, 2.5), **tol(torch.float64))
    # The zero sample's entries are kept out of the numerical check (the norm has a kink there).
    assert torch.autograd.gradcheck(lambda x: fn(torch.cat([x[:1], g[1:2].detach(), x[2:]])), (g,))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_interpolate_gradcheck(device, backend):
    real, fake, alpha = samples((3, 2, 5), device)
    args = tuple(t.clone().requires_grad_(True) for t in (real, fake, alpha))
    a = alpha[:, None, None]
    torch.testing.assert_close(ganops.interpolate(real, fake, alpha, backend=backend), a * real + (1 - a) * fake,
                               **tol(torch.float64))
    assert torch.autograd.gradcheck(lambda r, f, al: ganops.interpolate(r, f, al, backend=backend), args)
    # Each subset of inputs asks the backward for only its outputs.
    for mask in [(True, False, False), (False, True, False), (False, False, True)]:
        sub = [t.detach().requires_grad_(m) for t, m in zip((real, fake, alpha), mask)]
        assert torch.autograd.gradcheck(lambda *xs: ganops.interpolate(*xs, backend=backend), sub)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("center,one_sided", [(1.0, False), (0.7, True), (0.0, False)])
def test_fused_pieces_gradgradcheck(device, backend, center, one_sided):
    """Differentiating the penalty's backward again (create_graph=True through it) stays exact."""
    g = (torch.randn(3, 2, 4, dtype=torch.float64, device=device) * 0.4).requires_grad_(True)
    assert torch.autograd.gradgradcheck(
        lambda x: ganops.gradient_norm_penalty(x, center=center, one_sided=one_sided, weight=2.5, backend=backend),
        (g,))
    real, fake, alpha = (t.requires_grad_(True) for t in samples((3, 2, 4), device))
    assert torch.autograd.gradgradcheck(lambda r, f, a: ganops.interpolate(r, f, a, backend=backend),
                                        (real, fake, alpha))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_zero_norm_gradient_is_zero(device, backend):
    g = torch.zeros(3, 4, 4, dtype=torch.float32, device=device, requires_grad=True)
    p = ganops.gradient_norm_penalty(g, center=1.0, weight=10.0, backend=backend)
    torch.testing.assert_close(p, torch.tensor(10.0, device=device))
    (dg,) = torch.autograd.grad(p, g)
    assert torch.isfinite(dg).all() and (dg == 0).all()


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf / inf, in numpy under the Triton interpreter
def test_nonfinite_gradient_gives_nonfinite_penalty(device, backend):
    for bad in (float("nan"), float("inf")):
        g = torch.randn(3, 8, device=device)
        g[1, 2] = bad
        g.requires_grad_(True)
        p = ganops.gradient_norm_penalty(g, backend=backend)
        assert not torch.isfinite(p), (bad, p)
        (dg,) = torch.autograd.grad(p, g)
        assert not torch.isfinite(dg[1]).all()


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_penalty_and_backward(device, backend, dtype):
    g64 = torch.randn(6, 3, 7, 9, dtype=torch.float64, device=device) * 0.3
    gl = g64.to(dtype).requires_grad_(True)
    exact = g64.to(dtype).double().requires_grad_(True)
    p_exact = exact_penalty(exact, 1.0, False, 10.0)
    (d_exact,) = torch.autograd.grad(p_exact, exact)

    def plain_torch(x):  # the eager formula users run in this dtype
        return 10.0 * ((x.reshape(x.shape[0], -1).norm(dim=1) - 1.0) ** 2).mean()

    low = gl.detach().clone().requires_grad_(True)
    p_low = plain_torch(low)
    (d_low,) = torch.autograd.grad(p_low, low)
    p = ganops.gradient_norm_penalty(gl, weight=10.0, backend=backend)
    (d,) = torch.autograd.grad(p, gl)
    assert p.dtype == dtype and d.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(p.double(), p_exact, **tol(dtype))
        torch.testing.assert_close(d.double(), d_exact, **tol(dtype))
    else:
        assert_within_reference_error(p, p_low, p_exact, dtype)
        assert_within_reference_error(d, d_low, d_exact, dtype)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_interpolate(device, backend, dtype):
    real, fake, alpha = samples((4, 3, 5, 5), device)
    r, f, a = (t.to(dtype) for t in (real, fake, alpha))
    x = ganops.interpolate(r, f, a, backend=backend)
    a4 = a.double()[:, None, None, None]
    exact = a4 * r.double() + (1 - a4) * f.double()
    al = a[:, None, None, None]
    assert x.dtype == dtype
    assert_within_reference_error(x, al * r + (1 - al) * f, exact, dtype)


# ---------------------------------------------------------------------------------------
# Mixed precision: the scaler path
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("device,backend", CPU_BACKENDS)
def test_scaler_path_equals_unscaled(device, backend):
    critic = mlp_critic().float()
    real, fake, alpha = (t.float() for t in samples((5, 6)))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    plain = ganops.gradient_penalty(critic, real, fake, alpha=alpha, backend=backend)
    scaled = ganops.gradient_penalty(critic, real, fake, alpha=alpha, scaler=scaler, backend=backend)
    torch.testing.assert_close(scaled, plain, **tol(torch.float32))
    assert_close_list(param_grads(critic, scaled), param_grads(critic, plain), **tol(torch.float32))
    r1_plain = ganops.r1_penalty(critic, real, backend=backend)
    r1_scaled = ganops.r1_penalty(critic, real, scaler=scaler, backend=backend)
    torch.testing.assert_close(r1_scaled, r1_plain, **tol(torch.float32))


@pytest.mark.parametrize("device,backend", CPU_BACKENDS)
def test_scaler_overflow_gives_nonfinite_penalty(device, backend):
    # The scaled input gradient overflows float32 (1e35 * 2^16): the penalty must show it.
    critic = nn.Linear(6, 1)
    with torch.no_grad():
        critic.weight.fill_(1e35)
    real, fake, alpha = (t.float() for t in samples((5, 6)))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    p = ganops.gradient_penalty(critic, real, fake, alpha=alpha, scaler=scaler, backend=backend)
    assert not torch.isfinite(p)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_inv_scale_is_applied_inside(device, backend):
    g = torch.randn(4, 10, dtype=torch.float64, device=device)
    scaled = (g * 1024).requires_grad_(True)
    p = ganops.gradient_norm_penalty(scaled, inv_scale=torch.tensor([1 / 1024], device=device), backend=backend)
    torch.testing.assert_close(p, exact_penalty(g, 1.0, False, 1.0), **tol(torch.float64))
    (d,) = torch.autograd.grad(p, scaled)
    gg = g.clone().requires_grad_(True)
    (d_exact,) = torch.autograd.grad(exact_penalty(gg, 1.0, False, 1.0), gg)
    torch.testing.assert_close(d, d_exact / 1024, **tol(torch.float64))


# ---------------------------------------------------------------------------------------
# The public functions under torch.compile; the CUDA index math on the CPU
# ---------------------------------------------------------------------------------------


@requires_cpp
def test_torch_compile_fullgraph_cpp():
    torch._dynamo.reset()

    def step(real, fake, alpha, w):
        x = ganops.interpolate(real, fake, alpha, backend="cpp")
        return ganops.gradient_norm_penalty(x * w, center=1.0, weight=10.0, backend="cpp")

    real, fake, alpha = samples((4, 3, 6), dtype=torch.float32)
    w = torch.randn(3, 6, requires_grad=True)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(real, fake, alpha, w)
    expected = step(real, fake, alpha, w)
    torch.testing.assert_close(got, expected, **tol(torch.float32))
    torch.testing.assert_close(torch.autograd.grad(got, w)[0], torch.autograd.grad(expected, w)[0],
                               **tol(torch.float32))


@requires_cpp
@pytest.mark.parametrize("shape", [(3, 40000), (300, 7), (2, 16384), (1, 1)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_cuda_launch_check(shape, dtype):
    """The CUDA kernels' per-thread work, run for every (block, thread) of the real launch:
    several chunks per sample, more samples than finishing threads, an exact chunk, one element."""
    # Gradients of 0.1 scale keep the float16 penalty (returned in grads' dtype) in range.
    g64, r64, f64 = (torch.randn(shape, dtype=torch.float64) * 0.1 for _ in range(3))
    g, r, f = g64.to(dtype), r64.to(dtype), f64.to(dtype)
    visits, sumsq, penalty, grad_alpha = torch.ops.ganops._gradient_penalty_cuda_launch_check(
        g, r, f, 1.0, False, 10.0)
    assert visits.shape == (g.numel(),) and (visits == 1).all()
    gd, rd, fd = g.double(), r.double(), f.double()
    exact_ss = (gd.reshape(shape[0], -1) ** 2).sum(1)
    exact_ga = (gd * (rd - fd)).reshape(shape[0], -1).sum(1)
    t = tol(torch.float64) if dtype == torch.float64 else tol(torch.float32)
    torch.testing.assert_close(sumsq.double(), exact_ss, **t)
    torch.testing.assert_close(penalty.double(), exact_penalty(gd, 1.0, False, 10.0),
                               **(t if dtype != torch.float16 else tol(torch.float16)))
    torch.testing.assert_close(grad_alpha.double(), exact_ga, **(t if dtype != torch.float16 else
                                                                  dict(rtol=2e-3, atol=2e-3 * math.sqrt(g.numel()))))


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------

def test_bad_inputs():
    critic = mlp_critic()
    real, fake, alpha = samples((5, 6))
    with pytest.raises(ValueError, match="real and fake must have the same shape"):
        ganops.gradient_penalty(critic, real, fake[:4])
    with pytest.raises(TypeError, match="real and fake must have the same dtype"):
        ganops.gradient_penalty(critic, real, fake.float())
    with pytest.raises(ValueError, match="real and fake must be on the same device"):
        ganops.gradient_penalty(critic, real, fake.to("meta"))
    with pytest.raises(TypeError, match="real has dtype torch.int64"):
        ganops.gradient_penalty(critic, real.long(), fake.long())
    with pytest.raises(ValueError, match="real must have a batch dimension"):
        ganops.gradient_penalty(critic, real[:0], fake[:0])
    with pytest.raises(ValueError, match=r"alpha must have shape \(5,\)"):
        ganops.gradient_penalty(critic, real, fake, alpha=alpha[:4])
    with pytest.raises(ValueError, match=r"alpha must have shape \(5,\)"):
        ganops.gradient_penalty(critic, real, fake, alpha=alpha[:, None].expand(5, 6))
    with pytest.raises(ValueError, match=r"critic output must have shape \(5,\) or \(5, 1\)"):
        ganops.gradient_penalty(lambda x: x, real, fake)
    with pytest.raises(ValueError, match="critic output must have shape"):
        ganops.r1_penalty(lambda x: x.sum(), real)
    with pytest.raises(TypeError, match="critic must be callable"):
        ganops.gradient_penalty("critic", real, fake)
    with pytest.raises(TypeError, match="scaler must be a torch.amp.GradScaler"):
        ganops.gradient_penalty(critic, real, fake, scaler=object())
    with pytest.raises(ValueError, match="generator must be on real's device"):
        ganops.gradient_penalty(critic, real.to("meta"), fake.to("meta"), generator=torch.Generator(),
                                backend="torch")
    with pytest.raises(TypeError, match="grads must be a tensor"):
        ganops.gradient_norm_penalty([1.0, 2.0])
    with pytest.raises(ValueError, match="weight must be finite"):
        ganops.gradient_norm_penalty(real, weight=float("nan"))
    with pytest.raises(TypeError, match="one_sided must be a bool"):
        ganops.gradient_norm_penalty(real, one_sided=1)
    with pytest.raises(ValueError, match="inv_scale must hold one value"):
        ganops.gradient_norm_penalty(real, inv_scale=torch.ones(2))
    with pytest.raises(ValueError, match="gamma must be finite"):
        ganops.r1_penalty(critic, real, gamma=float("inf"))


@requires_cpp
def test_bad_inputs_reach_no_kernel():
    """Calls straight to the registered ops fail in the C++ checks, naming the argument."""
    g = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="alpha must have shape"):
        torch.ops.ganops.interpolate(g, g, torch.rand(2))
    with pytest.raises(RuntimeError, match="real and fake must have the same shape"):
        torch.ops.ganops.interpolate(g, g[:2], torch.rand(3))
    with pytest.raises(RuntimeError, match="inv_scale must be Float"):
        torch.ops.ganops.gradient_norm_penalty(g, torch.tensor(1.0, dtype=torch.float64), 1.0, False, 1.0)
    with pytest.raises(RuntimeError, match="grads must have a batch dimension"):
        torch.ops.ganops.gradient_norm_penalty(torch.randn(0, 4), None, 1.0, False, 1.0)
    with pytest.raises(RuntimeError, match="sumsq must have shape"):
        torch.ops.ganops.gradient_norm_penalty_backward(torch.tensor(1.0), g, torch.ones(2), None, 1.0, False, 1.0)


# ---------------------------------------------------------------------------------------
# A short WGAN-GP training run: ganops against the hand-written penalty
# ---------------------------------------------------------------------------------------

def eight_gaussians(n, generator):
    angles = torch.randint(0, 8, (n,), generator=generator).double() * (math.pi / 4)
    centers = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1) * 2.0
    return centers + 0.02 * torch.randn(n, 2, generator=generator, dtype=torch.float64)


def train_wgan_gp(penalty_fn, steps=150, n_critic=2, batch=64):
    torch.manual_seed(0)
    gen = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2)).double()
    critic = nn.Sequential(nn.Linear(2, 32), nn.LeakyReLU(0.2), nn.Linear(32, 32), nn.LeakyReLU(0.2),
                           nn.Linear(32, 1)).double()
    opt_g = torch.optim.Adam(gen.parameters(), lr=1e-3, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(critic.parameters(), lr=1e-3, betas=(0.5, 0.9))
    data = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        for _ in range(n_critic):
            real = eight_gaussians(batch, data)
            fake = gen(torch.randn(batch, 2, generator=data, dtype=torch.float64)).detach()
            alpha = torch.rand(batch, 1, generator=data, dtype=torch.float64)
            loss_d = critic(fake).mean() - critic(real).mean() + penalty_fn(critic, real, fake, alpha)
            opt_d.zero_grad()
            loss_d.backward()
            opt_d.step()
        loss_g = -critic(gen(torch.randn(batch, 2, generator=data, dtype=torch.float64))).mean()
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
        losses.append((loss_d.item(), loss_g.item()))
    return torch.tensor(losses, dtype=torch.float64)


@requires_cpp
def test_short_wgan_gp_training_matches_hand_written():
    """300 critic steps and 150 generator steps, float64."""
    # Layers this small gain nothing from threads, and on a shared machine idle threads only wait.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = train_wgan_gp(canonical_wgan_gp)
        got = train_wgan_gp(lambda c, r, f, a: ganops.gradient_penalty(c, r, f, alpha=a, backend="cpp"))
    finally:
        torch.set_num_threads(threads)
    # Training must actually move (the critic's loss changes), and ganops must follow it step by step.
    assert (expected[:, 0].max() - expected[:, 0].min()) > 0.1
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-9)


# ---------------------------------------------------------------------------------------
# input_gradient_penalty: penalties on scores the caller already has; score shapes;
# reductions; every parameter of the forward gets a gradient (lazy R1 under DDP)
# ---------------------------------------------------------------------------------------

def canonical_per_sample(critic, x, center, one_sided=False):
    """h(‖∇_x D(x)_i‖) per sample, (N,), by hand (x requires grad)."""
    out = critic(x)
    (grads,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    norms = grads.reshape(x.shape[0], -1).norm(dim=1)
    if center == 0:
        return norms.square()
    d = norms - center
    return (torch.relu(d) if one_sided else d).square()


def retained_param_grads(critic, loss):
    """param_grads, keeping the graph for a second look (zeros where the loss does not reach)."""
    params = list(critic.parameters())
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


@pytest.mark.parametrize("kind", list(CRITICS))
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_input_gradient_penalty_shares_the_main_forward(kind, device, backend):
    """StyleGAN's D step: one forward of the reals for the main loss and R1, one backward;
    the same gradients as the hand-written version."""
    make, shape = CRITICS[kind]
    critic = make().to(device)
    real, _, _ = samples(shape, device)
    x = real.detach().requires_grad_(True)
    scores = critic(x)
    loss = F.softplus(-scores).mean() + ganops.input_gradient_penalty(scores, x, center=0.0, weight=3.0 / 2,
                                                                      backend=backend)
    expected = F.softplus(-critic(real)).mean() + canonical_r1(critic, real, gamma=3.0)
    torch.testing.assert_close(loss, expected, **tol(torch.float64))
    assert_close_list(param_grads(critic, loss), param_grads(critic, expected), **tol(torch.float64))


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_match_canonical(device, backend, reduction):
    critic = mlp_critic().to(device)
    real, fake, alpha = samples((5, 6), device)
    a = alpha[:, None]
    x_hat = (a * real + (1 - a) * fake).requires_grad_(True)
    x_real = real.detach().requires_grad_(True)
    per_gp = 7.0 * canonical_per_sample(critic, x_hat, 1.0)
    per_r1 = 1.5 * canonical_per_sample(critic, x_real, 0.0)
    reduce = {"mean": torch.mean, "sum": torch.sum, "none": lambda t: t}[reduction]
    cases = [
        (ganops.gradient_penalty(critic, real, fake, alpha=alpha, weight=7.0, reduction=reduction, backend=backend),
         reduce(per_gp)),
        (ganops.r1_penalty(critic, real, gamma=3.0, reduction=reduction, backend=backend), reduce(per_r1)),
        (ganops.input_gradient_penalty(critic(x_real), x_real, center=0.0, weight=1.5, reduction=reduction,
                                       backend=backend), reduce(per_r1)),
    ]
    for got, expected in cases:
        assert got.shape == ((5,) if reduction == "none" else ())
        torch.testing.assert_close(got, expected, **tol(torch.float64))
        # Per-sample upstream weights make the reductions' backward differ sample by sample.
        w = torch.arange(1.0, 6.0, dtype=torch.float64, device=device)
        weigh = (lambda t: (t * w).sum()) if reduction == "none" else (lambda t: t)
        assert_close_list(retained_param_grads(critic, weigh(got)), retained_param_grads(critic, weigh(expected)),
                          **tol(torch.float64))


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("center,one_sided", [(1.0, False), (0.6, True), (0.0, False)])
def test_input_gradient_penalty_gradcheck(device, backend, reduction, center, one_sided):
    """Differentiable in the critic's weights (through the double backward) and the inputs."""
    gen = torch.Generator().manual_seed(3)
    w1 = torch.randn(4, 5, generator=gen, dtype=torch.float64).to(device).requires_grad_(True)
    w2 = torch.randn(5, 1, 1, 1, generator=gen, dtype=torch.float64).to(device) * 0.5
    x0 = torch.randn(3, 4, generator=gen, dtype=torch.float64).to(device).requires_grad_(True)

    def penalty(w, x):
        x = x * 1.0  # a non-leaf requiring grad, as interpolates are
        scores = (torch.tanh(x @ w) @ w2.reshape(5, 1)).reshape(3, 1, 1, 1)  # DCGAN-style (N, 1, 1, 1)
        return ganops.input_gradient_penalty(scores, x, center=center, weight=1.7, one_sided=one_sided,
                                             reduction=reduction, backend=backend)

    assert torch.autograd.gradcheck(penalty, (w1, x0))


@pytest.mark.parametrize("shape", [(5,), (5, 1), (5, 1, 1, 1)])
def test_one_score_per_sample_in_any_shape(shape):
    """DCGAN critics end in a 1x1 convolution: (N, 1, 1, 1) is one score per sample too."""
    base = mlp_critic()
    critic = lambda x: base(x).reshape(shape)  # noqa: E731
    real, fake, alpha = samples((5, 6))
    torch.testing.assert_close(ganops.gradient_penalty(critic, real, fake, alpha=alpha),
                               canonical_wgan_gp(base, real, fake, alpha), **tol(torch.float64))
    torch.testing.assert_close(ganops.r1_penalty(critic, real), canonical_r1(base, real), **tol(torch.float64))
    x = real.detach().requires_grad_(True)
    torch.testing.assert_close(ganops.input_gradient_penalty(critic(x), x, center=0.0, weight=5.0),
                               canonical_r1(base, real), **tol(torch.float64))


@pytest.mark.parametrize("shape", [(5, 2), (5, 1, 2), (1, 5), (10,)])
def test_scores_of_another_shape_are_refused(shape):
    real, fake, _ = samples((5, 6))
    critic = lambda x: x[:, :2].reshape(-1)[:math.prod(shape)].reshape(shape)  # noqa: E731
    with pytest.raises(ValueError, match=r"critic output must have shape \(5,\) or \(5, 1\)"):
        ganops.gradient_penalty(critic, real, fake)
    with pytest.raises(ValueError, match=r"critic output must have shape \(5,\) or \(5, 1\)"):
        ganops.r1_penalty(critic, real)
    x = real.detach().requires_grad_(True)
    with pytest.raises(ValueError, match=r"scores must have shape \(5,\) or \(5, 1\)"):
        ganops.input_gradient_penalty(critic(x), x)


@pytest.mark.parametrize("device,backend", CPU_BACKENDS)
def test_every_parameter_of_the_forward_gets_a_gradient(device, backend):
    """R1 alone (lazy R1): the last bias does not reach the input gradient, yet receives a
    zero gradient, as DDP with find_unused_parameters=False needs; the value is unchanged."""
    critic = mlp_critic()
    real, _, _ = samples((5, 6))
    penalty = ganops.r1_penalty(critic, real, gamma=2.0, backend=backend)
    penalty.backward()
    last_bias = critic[-1].bias
    assert last_bias.grad is not None and torch.equal(last_bias.grad, torch.zeros_like(last_bias))
    assert all(p.grad is not None for p in critic.parameters())
    assert torch.count_nonzero(critic[0].weight.grad) > 0
    # Without the link, autograd would not reach the last bias at all.
    x = real.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(critic(x).sum(), x, create_graph=True)
    assert torch.autograd.grad(g.square().sum(), last_bias, allow_unused=True)[0] is None
    torch.testing.assert_close(penalty, canonical_r1(critic, real, gamma=2.0), **tol(torch.float64))
    for reduction in ("sum", "none"):
        critic.zero_grad(set_to_none=True)
        ganops.r1_penalty(critic, real, reduction=reduction, backend=backend).sum().backward()
        assert last_bias.grad is not None


def test_infinite_scores_leave_the_penalty_value_alone():
    """The zero-gradient link is a sum over no element, not 0 * scores: an infinite score
    (whose input gradient is finite) does not turn the penalty into NaN."""
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    scores = x.sum(1) + torch.tensor([0.0, float("inf"), 0.0, 0.0], dtype=torch.float64)
    p = ganops.input_gradient_penalty(scores, x, center=0.0, weight=1.0)
    torch.testing.assert_close(p, torch.tensor(3.0, dtype=torch.float64), **tol(torch.float64))


@pytest.mark.parametrize("device,backend", CPU_BACKENDS)
def test_input_gradient_penalty_scaler_equals_unscaled(device, backend):
    critic = mlp_critic().float()
    real = samples((5, 6))[0].float()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    x = real.requires_grad_(True)
    scores = critic(x)
    plain = ganops.input_gradient_penalty(scores, x, backend=backend)
    scaled = ganops.input_gradient_penalty(scores, x, scaler=scaler, backend=backend)
    torch.testing.assert_close(scaled, plain, **tol(torch.float32))
    assert_close_list(retained_param_grads(critic, scaled), retained_param_grads(critic, plain),
                      **tol(torch.float32))


def test_input_gradient_penalty_bad_inputs():
    critic = mlp_critic()
    real, _, _ = samples((5, 6))
    x = real.detach().requires_grad_(True)
    scores = critic(x)
    with pytest.raises(ValueError, match="inputs must require grad"):
        ganops.input_gradient_penalty(critic(real), real)
    with pytest.raises(ValueError, match="scores do not depend on inputs"):
        ganops.input_gradient_penalty(critic(real.clone().requires_grad_(True)), x)
    with torch.no_grad():
        detached = critic(x)
    with pytest.raises(ValueError, match="scores must be computed from inputs with grad enabled"):
        ganops.input_gradient_penalty(detached, x)
    with pytest.raises(ValueError, match="reduction must be 'mean', 'sum' or 'none', got 'max'"):
        ganops.input_gradient_penalty(scores, x, reduction="max")
    with pytest.raises(ValueError, match="reduction must be"):
        ganops.gradient_penalty(critic, real, real, reduction=None)
    with pytest.raises(ValueError, match="reduction must be"):
        ganops.r1_penalty(critic, real, reduction="avg")
    with pytest.raises(TypeError, match="inputs must be a tensor"):
        ganops.input_gradient_penalty(scores, [1.0])
    with pytest.raises(ValueError, match="scores must be a tensor"):
        ganops.input_gradient_penalty([1.0] * 5, x)
    with pytest.raises(TypeError, match="scores has dtype torch.int64"):
        ganops.input_gradient_penalty(torch.ones(5, dtype=torch.long), x)
    with pytest.raises(ValueError, match="center must be finite"):
        ganops.input_gradient_penalty(scores, x, center=float("nan"))
    with pytest.raises(TypeError, match="one_sided must be a bool"):
        ganops.input_gradient_penalty(scores, x, one_sided="yes")
    with pytest.raises(TypeError, match="scaler must be a torch.amp.GradScaler"):
        ganops.input_gradient_penalty(scores, x, scaler=1)


# ---------------------------------------------------------------------------------------
# Regressions found by tests/test_differential.py and a reading of the GPU code
# ---------------------------------------------------------------------------------------

def _penalty_float64(grads, center, weight):
    n = grads.reshape(grads.shape[0], -1).double().norm(dim=1)
    return ((n - center) ** 2).mean() * weight


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("center,weight", [(1e300, 1.0), (1.0, 1e300), (1e39, 2.0), (0.1, 1e-310)])
def test_center_and_weight_beyond_float32_range(device, backend, center, weight):
    """center and weight are float64 numbers. The Triton launcher split each into float32
    hi + lo halves: past float32's range hi = inf and lo = value - inf = -inf, so the kernel
    saw inf - inf = NaN. Now the float64 accumulation gets the exact value, and a float32
    one the value rounded once (inf past its range), as the C++ kernels' Acc(value)."""
    g64 = torch.randn(3, 4, 5, dtype=torch.float64)
    for dtype in (torch.float64, torch.float32):
        grads = g64.to(device, dtype).requires_grad_(True)
        penalty = ganops.gradient_norm_penalty(grads, center=center, weight=weight, backend=backend)
        (dgrads,) = torch.autograd.grad(penalty, grads)
        if dtype == torch.float64:
            expected = _penalty_float64(g64, center, weight)
            torch.testing.assert_close(penalty.cpu(), expected, rtol=1e-10, atol=0)
            n = g64.reshape(3, -1).norm(dim=1)
            factor = 2 * (n - center) / n * weight / 3
            torch.testing.assert_close(dgrads.cpu(), g64 * factor[:, None, None], rtol=1e-10, atol=0)
        else:
            c32, w32 = torch.tensor(center, dtype=torch.float32), torch.tensor(weight, dtype=torch.float32)
            n = g64.to(torch.float32).reshape(3, -1).norm(dim=1)
            expected = ((n - c32) ** 2).mean() * w32
            assert torch.isnan(penalty).item() == torch.isnan(expected).item()
            torch.testing.assert_close(penalty.cpu(), expected, rtol=1e-5, atol=0, equal_nan=True)


def test_inv_scale_number_makes_no_host_copy(monkeypatch):
    """A Python-number inv_scale was built with torch.tensor(value, device=...), a blocking
    host-to-device copy on CUDA; it is now a device-side fill (torch.full)."""
    from ganops.ops import gradient_penalty as hub

    def no_host_tensor(*args, **kwargs):
        raise AssertionError("torch.tensor called: a host copy")

    grads = torch.randn(2, 3)
    monkeypatch.setattr(hub.torch, "tensor", no_host_tensor)
    scale = hub._inv_scale_tensor(0.25, grads)
    monkeypatch.undo()
    assert scale.dtype == torch.float32 and scale.shape == () and scale.item() == 0.25


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is visible")
def test_inv_scale_number_needs_no_sync_on_cuda():
    grads = torch.randn(4, 8, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ganops.gradient_norm_penalty(grads, inv_scale=0.5, backend="cpp")
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("device,backend", backend_params())
def test_backward_reads_grad_penalty_in_accumulation_precision(device, backend):
    """∂loss/∂penalty arrives in float32 for float16 gradients: the CUDA kernel rounded it to
    float16 first, the CPU and Triton kernels did not; all now read it in float32."""
    if backend == "torch":
        pytest.skip("the registered backward op belongs to the cpp and triton backends")
    op = (torch.ops.ganops.gradient_norm_penalty_backward if backend == "cpp"
          else torch.ops.ganops.gradient_norm_penalty_backward_triton)
    forward = (torch.ops.ganops.gradient_norm_penalty if backend == "cpp"
               else torch.ops.ganops.gradient_norm_penalty_triton)
    grads = torch.full((2, 8), 0.5, dtype=torch.float16, device=device)
    _, sumsq = forward(grads, None, 0.0, False, 1.5)
    go = 1 + 3 * 2.0 ** -12
    out = op(torch.tensor(go, dtype=torch.float32, device=device), grads, sumsq, None, 0.0, False, 1.5)
    # R1 (center 0): ∂ = go · weight / N · 2 · g = 0.75 · go: 0.75 + 1.1 float16 ulps, which
    # rounds down; with go rounded to float16 first it is 0.75 + 1.5 ulps, which rounds up.
    expected = torch.tensor(0.75 * go, dtype=torch.float64).to(torch.float16)
    double_rounded = torch.tensor(0.75 * float(torch.tensor(go).half()), dtype=torch.float64).to(torch.float16)
    assert expected != double_rounded
    torch.testing.assert_close(out.cpu(), expected.expand(2, 8), rtol=0, atol=0)
