"""Spectral normalization: every backend against torch.nn.utils.parametrizations.spectral_norm
and an independent float64 computation."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as torch_spectral_norm

import ganops
from ganops import _ext
from conftest import assert_within_reference_error, backend_params, tol
from triton_index_math import int32_index_math, record_index_math

ALL = backend_params()
CPU = backend_params(("cpu",))
COMPILED = [p for p in ALL if p.values[1] != "torch"]


def _modules():
    # Small shapes: Triton runs interpreted here. ConvTranspose2d takes dim=1 by default.
    return {
        "linear": (lambda: nn.Linear(27, 16), (5, 27)),
        "conv1d": (lambda: nn.Conv1d(3, 8, 3), (2, 3, 9)),
        "conv2d": (lambda: nn.Conv2d(3, 16, 3), (2, 3, 6, 6)),
        "conv3d": (lambda: nn.Conv3d(2, 4, 2), (1, 2, 4, 4, 4)),
        "convtranspose2d": (lambda: nn.ConvTranspose2d(6, 4, 3), (2, 6, 5, 5)),
        "embedding": (lambda: nn.Embedding(20, 12), None),
    }


def _input(kind, shape, device, generator):
    if kind == "embedding":
        return torch.randint(0, 20, (7,), generator=generator).to(device)
    return torch.randn(shape, generator=generator).to(device)


def _pair(make, device, dtype=torch.float32, seed=3, backend=None, **kwargs):
    """The same module under torch's and ganops' spectral norm, registered from the same seed."""
    torch.manual_seed(0)
    base = make().to(device, dtype)
    ours = copy.deepcopy(base)
    torch.manual_seed(seed)
    torch_spectral_norm(base, **kwargs)
    torch.manual_seed(seed)
    ganops.spectral_norm(ours, backend=backend, **kwargs)
    return base, ours


def _sn(module, name="weight"):
    return getattr(module.parametrizations, name)


def assert_same_state(theirs, ours, rtol, atol):
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=rtol, atol=atol, msg=key)


# ---------------------------------------------------------------------------------------
# Against torch's parametrization
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("device,backend", ALL)
@pytest.mark.parametrize("kind", list(_modules()))
def test_training_loop_matches_torch(device, backend, kind):
    make, shape = _modules()[kind]
    theirs, ours = _pair(make, device, backend=backend)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert_same_state(theirs, ours, rtol=1e-5, atol=1e-6)  # u, v after the 15 warm-up iterations
    opt_t = torch.optim.SGD(theirs.parameters(), lr=0.1)
    opt_o = torch.optim.SGD(ours.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = _input(kind, shape, device, g)
        for module, opt in ((theirs, opt_t), (ours, opt_o)):
            opt.zero_grad()
            module(x).square().mean().backward()
        torch.testing.assert_close(_sn(ours).original.grad, _sn(theirs).original.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.weight, theirs.weight, rtol=1e-5, atol=1e-6)
        opt_t.step()
        opt_o.step()
    assert_same_state(theirs, ours, rtol=1e-5, atol=1e-6)
    # Eval mode: no power iteration, u and v stay as they are.
    theirs.eval()
    ours.eval()
    u_before = _sn(ours)[0]._u.clone()
    x = _input(kind, shape, device, g)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)
    assert torch.equal(_sn(ours)[0]._u, u_before)
    assert_same_state(theirs, ours, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device,backend", ALL)
def test_float64_matches_torch_to_1e10(device, backend):
    theirs, ours = _pair(lambda: nn.Conv2d(4, 8, 3), device, torch.float64, backend=backend)
    for _ in range(2):
        for m in (theirs, ours):
            m.weight.square().sum().backward()
    t = tol(torch.float64)
    torch.testing.assert_close(ours.weight, theirs.weight, **t)
    torch.testing.assert_close(_sn(ours).original.grad, _sn(theirs).original.grad, **t)
    assert_same_state(theirs, ours, **t)


@pytest.mark.parametrize("device,backend", ALL)
@pytest.mark.parametrize("n_power_iterations,dim", [(3, 0), (1, 1), (2, -1), (1, 2)])
def test_dim_and_iterations_match_torch(device, backend, n_power_iterations, dim):
    theirs, ours = _pair(lambda: nn.Conv2d(5, 6, (3, 2)), device, backend=backend,
                         n_power_iterations=n_power_iterations, dim=dim)
    for _ in range(2):
        for m in (theirs, ours):
            m.weight.sum().backward()
    torch.testing.assert_close(ours.weight, theirs.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_sn(ours).original.grad, _sn(theirs).original.grad, rtol=1e-5, atol=1e-6)
    assert_same_state(theirs, ours, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device,backend", ALL)
def test_two_forwards_before_one_backward(device, backend):
    """D(real) - D(fake): the second forward updates u, v in place before the backward."""
    theirs, ours = _pair(lambda: nn.Linear(10, 6), device, backend=backend)
    g = torch.Generator().manual_seed(2)
    real, fake = torch.randn(4, 10, generator=g).to(device), torch.randn(4, 10, generator=g).to(device)
    for m in (theirs, ours):
        (m(real).mean() - m(fake).mean()).backward()
    torch.testing.assert_close(_sn(ours).original.grad, _sn(theirs).original.grad, rtol=1e-5, atol=1e-6)
    assert_same_state(theirs, ours, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device,backend", ALL)
def test_one_dimensional_weight_is_normalised(device, backend):
    theirs, ours = _pair(lambda: nn.Linear(4, 5), device, backend=backend, name="bias")
    torch.testing.assert_close(ours.bias, theirs.bias)
    torch.testing.assert_close(ours.bias.norm(), torch.tensor(1.0, device=device))
    assert list(ours.state_dict()) == list(theirs.state_dict())


def test_wide_conv_matches_torch():
    """A 3x3 conv with 512 channels in and out: the 512 x 4608 matrix of the benchmark."""
    theirs, ours = _pair(lambda: nn.Conv2d(512, 512, 3, bias=False), "cpu", backend="cpp")
    for m in (theirs, ours):
        (m.weight * torch.linspace(-1, 1, m.weight.numel()).view_as(m.weight)).sum().backward()
    torch.testing.assert_close(ours.weight, theirs.weight, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(_sn(ours).original.grad, _sn(theirs).original.grad, rtol=1e-5, atol=1e-7)
    assert_same_state(theirs, ours, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------
# state_dict: both ways, and the older hook API
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("direction", ["torch_to_ganops", "ganops_to_torch"])
def test_state_dict_round_trip(direction):
    theirs, ours = _pair(lambda: nn.Conv2d(3, 5, 3), "cpu", seed=1)
    fresh_theirs, fresh_ours = _pair(lambda: nn.Conv2d(3, 5, 3), "cpu", seed=2)
    src, dst = (theirs, fresh_ours) if direction == "torch_to_ganops" else (ours, fresh_theirs)
    src.weight.sum().backward()  # one step moves u and v off their initial values
    dst.load_state_dict(src.state_dict())
    for key, value in src.state_dict().items():
        assert torch.equal(dst.state_dict()[key], value), key
    src.eval()
    dst.eval()
    torch.testing.assert_close(dst.weight, src.weight, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["linear", "convtranspose2d"])
def test_hook_api_state_dict_loads(kind):
    make, _ = _modules()[kind]
    torch.manual_seed(0)
    old = torch.nn.utils.spectral_norm(make())
    old(torch.randn(2, *(_modules()[kind][1][1:]))).sum().backward()  # the hook API's u, v move
    old_state = old.state_dict()
    assert {"weight_orig", "weight_u", "weight_v"} <= set(old_state)
    torch.manual_seed(5)
    ours = ganops.spectral_norm(make())
    ours.load_state_dict(old_state)  # plain load_state_dict, strict
    sn = _sn(ours)
    assert torch.equal(sn.original, old_state["weight_orig"])
    assert torch.equal(sn[0]._u, old_state["weight_u"])
    assert torch.equal(sn[0]._v, old_state["weight_v"])
    old.eval()
    ours.eval()
    x = torch.randn(2, *(_modules()[kind][1][1:]))
    torch.testing.assert_close(ours(x), old(x), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------
# The functional form, half types, gradients
# ---------------------------------------------------------------------------------------

def exact_spectral_normalize(weight, u, v, dim, training, n=1, eps=1e-12):
    """Independent float64 truth: torch's power method and sigma = u^T W v, written out."""
    w = weight.detach().double().cpu()
    u, v = u.double().cpu(), v.double().cpu()
    mat = w.movedim(dim, 0).reshape(w.shape[dim], -1)
    if training:
        for _ in range(n):
            u = mat @ v
            u = u / max(u.norm(), eps)
            v = mat.T @ u
            v = v / max(v.norm(), eps)
    sigma = u @ mat @ v
    return w / sigma, sigma, u, v


@pytest.mark.parametrize("device,backend", ALL)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_within_twice_torch_error(device, backend, dtype):
    g = torch.Generator().manual_seed(4)
    w = torch.randn(24, 3, 3, 3, generator=g).to(device, dtype)
    u0 = F.normalize(torch.randn(24, generator=g), dim=0).to(device, dtype)
    v0 = F.normalize(torch.randn(27, generator=g), dim=0).to(device, dtype)
    exact_w, exact_sigma, _, _ = exact_spectral_normalize(w, u0, v0, 0, True)
    # torch's parametrization math in the same low precision.
    mat = w.flatten(1)
    u_low = F.normalize(torch.mv(mat, v0), dim=0)
    v_low = F.normalize(torch.mv(mat.t(), u_low), dim=0)
    torch_low = w / torch.vdot(u_low, torch.mv(mat, v_low))
    u, v = u0.clone(), v0.clone()
    w_sn, sigma = ganops.spectral_normalize(w, u, v, backend=backend)
    assert w_sn.dtype == dtype and sigma.dtype == torch.float32 and u.dtype == dtype
    assert_within_reference_error(w_sn, torch_low, exact_w, dtype)
    torch.testing.assert_close(sigma.double().cpu(), exact_sigma, rtol=2e-2, atol=0)


@pytest.mark.parametrize("device,backend", ALL)
@pytest.mark.parametrize("training", [True, False])
def test_functional_matches_float64_truth(device, backend, training):
    g = torch.Generator().manual_seed(6)
    w = torch.randn(6, 5, 7, generator=g, dtype=torch.float64).to(device)
    u0 = torch.randn(5, generator=g, dtype=torch.float64).to(device)
    v0 = torch.randn(42, generator=g, dtype=torch.float64).to(device)
    u, v = u0.clone(), v0.clone()
    w_sn, sigma = ganops.spectral_normalize(w, u, v, n_power_iterations=2, dim=1, training=training,
                                            backend=backend)
    exact_w, exact_sigma, exact_u, exact_v = exact_spectral_normalize(w, u0, v0, 1, training, n=2)
    t = tol(torch.float64)
    torch.testing.assert_close(w_sn.cpu(), exact_w, **t)
    torch.testing.assert_close(sigma.cpu(), exact_sigma, **t)
    torch.testing.assert_close(u.cpu(), exact_u if training else u0.cpu(), **t)
    torch.testing.assert_close(v.cpu(), exact_v if training else v0.cpu(), **t)


@pytest.mark.parametrize("device,backend", ALL)
@pytest.mark.parametrize("dim", [0, 1])
def test_gradcheck_float64(device, backend, dim):
    g = torch.Generator().manual_seed(7)
    w = torch.randn(4, 3, 2, generator=g, dtype=torch.float64).to(device).requires_grad_()
    rows = w.shape[dim]
    u = F.normalize(torch.randn(rows, generator=g, dtype=torch.float64), dim=0).to(device)
    v = F.normalize(torch.randn(24 // rows, generator=g, dtype=torch.float64), dim=0).to(device)

    # Eval mode: u and v are the constants the analytic gradient assumes (in training they
    # are recomputed from W, which the gradient deliberately does not follow, as in torch).
    def fn(weight):
        return ganops.spectral_normalize(weight, u, v, dim=dim, training=False, backend=backend)

    assert torch.autograd.gradcheck(fn, (w,))


@pytest.mark.parametrize("device,backend", ALL)
def test_gradients_match_torch_autograd_with_sigma_used(device, backend):
    g = torch.Generator().manual_seed(8)
    w = torch.randn(9, 11, generator=g, dtype=torch.float64).to(device)
    u = F.normalize(torch.randn(9, generator=g, dtype=torch.float64), dim=0).to(device)
    v = F.normalize(torch.randn(11, generator=g, dtype=torch.float64), dim=0).to(device)
    gw = torch.randn(9, 11, generator=g, dtype=torch.float64).to(device)
    ours = w.clone().requires_grad_()
    w_sn, sigma = ganops.spectral_normalize(ours, u.clone(), v.clone(), backend=backend)
    ((w_sn * gw).sum() + 3 * sigma).backward()
    ref = w.clone().requires_grad_()
    uu, vv = F.normalize(w @ v, dim=0), None
    vv = F.normalize(w.T @ uu, dim=0)
    ref_sigma = uu @ ref @ vv
    ((ref / ref_sigma * gw).sum() + 3 * ref_sigma).backward()
    torch.testing.assert_close(ours.grad, ref.grad, **tol(torch.float64))


# 0 / 0 is the expected answer; the Triton interpreter (numpy) warns about it.
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
@pytest.mark.parametrize("device,backend", ALL)
def test_zero_weight_gives_nan_like_torch(device, backend):
    theirs, ours = _pair(lambda: nn.Linear(3, 4), device, backend=backend)
    with torch.no_grad():
        _sn(theirs).original.zero_()
        _sn(ours).original.zero_()
    assert theirs.weight.isnan().all() and ours.weight.isnan().all()


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------

def test_bad_module_arguments_raise_torch_errors():
    with pytest.raises(IndexError, match="Dimension out of range"):
        ganops.spectral_norm(nn.Linear(3, 4), dim=2)
    with pytest.raises(ValueError, match="n_power_iterations"):
        ganops.spectral_norm(nn.Linear(3, 4), n_power_iterations=0)
    with pytest.raises(ValueError, match="no parameter or buffer with name 'kernel'"):
        ganops.spectral_norm(nn.Linear(3, 4), name="kernel")
    with pytest.raises(TypeError, match="complex64 and complex128 weights"):
        ganops.spectral_norm(nn.Linear(3, 4, dtype=torch.complex32))
    with pytest.raises(TypeError, match="dtype"):
        m = nn.Linear(3, 4)
        m.weight = nn.Parameter(torch.ones(4, 3, dtype=torch.int64), requires_grad=False)
        ganops.spectral_norm(m)


def test_bad_functional_arguments_name_the_argument():
    w, u, v = torch.randn(4, 6), torch.randn(4), torch.randn(6)
    with pytest.raises(ValueError, match="u must be 1-D with 4"):
        ganops.spectral_normalize(w, torch.randn(5), v)
    with pytest.raises(ValueError, match="v must be 1-D with 6"):
        ganops.spectral_normalize(w, u, torch.randn(2, 3))
    with pytest.raises(TypeError, match="v must have the weight's dtype"):
        ganops.spectral_normalize(w, u, v.double())
    with pytest.raises(ValueError, match="u is updated in place"):
        ganops.spectral_normalize(w, u.requires_grad_(), v)
    with pytest.raises(ValueError, match="weight must not be empty"):
        ganops.spectral_normalize(torch.randn(0, 6), torch.randn(0), v)
    with pytest.raises(ValueError, match="eps"):
        ganops.spectral_normalize(w, torch.randn(4), v, eps=-1.0)
    with pytest.raises(IndexError, match="Dimension out of range"):
        ganops.spectral_normalize(w, torch.randn(4), v, dim=-3)
    with pytest.raises(TypeError, match="weight must be a tensor"):
        ganops.spectral_normalize([1.0], torch.randn(4), v)


@pytest.mark.skipif(not _ext.load(), reason="the compiled extension is not built")
def test_compiled_ops_check_their_inputs():
    w, u, v = torch.randn(4, 6), torch.randn(4), torch.randn(6)
    with pytest.raises(RuntimeError, match="dim must be in"):
        torch.ops.ganops.spectral_norm_forward_(w, u, v, 2, 1, 1e-12)
    with pytest.raises(RuntimeError, match="v must be 1-D with 6"):
        torch.ops.ganops.spectral_norm_forward_(w, u, torch.randn(5), 0, 1, 1e-12)
    with pytest.raises(RuntimeError, match="n_power_iterations must be >= 0"):
        torch.ops.ganops.spectral_norm_forward_(w, u, v, 0, -1, 1e-12)
    with pytest.raises(RuntimeError, match="sigma must be"):
        torch.ops.ganops.spectral_norm_backward(w, None, w, u, v, torch.tensor(1.0, dtype=torch.float64), 0)


# ---------------------------------------------------------------------------------------
# The CUDA index math on the CPU; the public functions under torch.compile
# ---------------------------------------------------------------------------------------

@pytest.mark.skipif(not _ext.load(), reason="the compiled extension is not built")
@pytest.mark.parametrize("shape,dim", [((70, 300), 0), ((16, 3, 3, 3), 0), ((5, 130, 3, 3), 1),
                                       ((3, 4, 2, 5), 2), ((129, 4097), 0), ((300, 70), 1), ((2, 3, 70), 2),
                                       ((4097, 129), 1)])
def test_cuda_launch_covers_every_element_once(shape, dim):
    g = torch.Generator().manual_seed(9)
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    rows = shape[dim]
    u = F.normalize(torch.randn(rows, generator=g, dtype=torch.float64), dim=0)
    v = F.normalize(torch.randn(w.numel() // rows, generator=g, dtype=torch.float64), dim=0)
    grad = torch.randn(shape, generator=g, dtype=torch.float64)
    visits, u1, v1, sigma, w_sn, dw = torch.ops.ganops._spectral_norm_cuda_launch_check(w, u, v, grad, dim, 1e-12)
    assert visits.shape == (4, w.numel())
    for launch, name in enumerate(["W v", "W^T u", "scale", "backward dot"]):
        assert visits[launch].min().item() == 1 and visits[launch].max().item() == 1, \
            f"{name}: an element was skipped or visited twice"
    exact_w, exact_sigma, exact_u, exact_v = exact_spectral_normalize(w, u, v, dim, True)
    t = tol(torch.float64)
    torch.testing.assert_close(u1, exact_u, **t)
    torch.testing.assert_close(v1, exact_v, **t)
    torch.testing.assert_close(sigma, exact_sigma, **t)
    torch.testing.assert_close(w_sn, exact_w, **t)
    ref = w.clone().requires_grad_()
    mat = ref.movedim(dim, 0).reshape(rows, -1)
    (ref / (exact_u @ mat @ exact_v) * grad).sum().backward()
    torch.testing.assert_close(dw, ref.grad, **t)


_TRITON_OPS = {"spectral_norm_forward_": "spectral_norm_forward_triton_",
               "spectral_norm_backward": "spectral_norm_backward_triton"}


def _op(name, backend):
    return getattr(torch.ops.ganops, name if backend == "cpp" else _TRITON_OPS[name])


@pytest.mark.parametrize("device,backend", [p for p in COMPILED if p.values[1] == "cpp"])
@pytest.mark.parametrize("form", ["module", "functional"])
def test_torch_compile_fullgraph(device, backend, form):
    """Forward (power iteration in place on the buffers) and compiled backward, no graph break."""
    torch._dynamo.reset()
    _, eager = _pair(lambda: nn.Linear(12, 7), device, backend=backend)
    model = copy.deepcopy(eager)

    def loss_of(m, x):
        if form == "module":
            return m(x).square().mean()
        sn = _sn(m)
        w_sn, sigma = ganops.spectral_normalize(sn.original, sn[0]._u, sn[0]._v, backend=backend)
        return (x @ w_sn.t()).square().mean() + sigma

    compiled = torch.compile(loss_of, fullgraph=True)
    x = torch.randn(3, 12, device=device)
    for _ in range(2):
        loss_c = compiled(model, x)
        loss_e = loss_of(eager, x)
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
        loss_c.backward()
        loss_e.backward()
    torch.testing.assert_close(_sn(model).original.grad, _sn(eager).original.grad, rtol=1e-5, atol=1e-6)
    assert_same_state(eager, model, rtol=1e-5, atol=1e-6)


def test_backend_argument_reaches_the_module():
    m = ganops.spectral_norm(nn.Linear(3, 4), backend="torch")
    assert _sn(m)[0].backend == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        ganops.spectral_norm(nn.Linear(3, 4), backend="fast")


# ---------------------------------------------------------------------------------------
# Complex weights, torch's parametrization behaviours, and regressions found by
# tests/test_differential.py
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("device,backend", ALL)
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_weight_matches_torch_parametrization(device, backend, dtype):
    """Complex weights go through the reference (conjugate transpose) on every backend and
    give torch's numbers from the same seed: buffers, weight, and the gradient."""
    theirs, ours = _pair(lambda: nn.Linear(5, 4, dtype=dtype), device, dtype=dtype, backend=backend)
    x = torch.randn(3, 5, dtype=dtype, device=device)
    for _ in range(3):
        y_t, y_o = theirs(x), ours(x)
        torch.testing.assert_close(y_o, y_t, rtol=1e-5, atol=1e-6)
        y_t.abs().sum().backward()
        y_o.abs().sum().backward()
    assert_same_state(theirs, ours, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_sn(ours).original.grad, _sn(theirs).original.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device,backend", ALL)
def test_complex_diagonal_weight_is_divided_by_its_largest_modulus(device, backend):
    """sigma of a diagonal matrix is its largest |entry|, complex entries too."""
    diag = torch.tensor([3 - 4j, 1 + 1j], dtype=torch.complex64, device=device)
    m = nn.Linear(2, 2, dtype=torch.complex64, device=device)
    with torch.no_grad():
        m.weight = nn.Parameter(torch.diag(diag))
        ganops.spectral_norm(m, backend=backend)
        torch.testing.assert_close(m.weight, torch.diag(diag / 5.0))


def test_complex_functional_sigma_is_u_conj_W_v():
    w = torch.randn(4, 3, dtype=torch.complex128)
    u = F.normalize(torch.randn(4, dtype=torch.complex128), dim=0)
    v = F.normalize(torch.randn(3, dtype=torch.complex128), dim=0)
    w_sn, sigma = ganops.spectral_normalize(w, u, v, n_power_iterations=50)
    # After many iterations sigma is the top singular value, real up to rounding.
    torch.testing.assert_close(sigma, torch.linalg.svdvals(w)[0].to(sigma.dtype), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w_sn, w / sigma)


def test_parametrization_structure_and_removal():
    """Buffers, not parameters; a plain attribute weight of the original's size and stride; removal
    (in eval mode) keeps the last weight; registering twice and on the bias works."""
    m = ganops.spectral_norm(nn.Linear(5, 7, dtype=torch.float64))
    sn = _sn(m)
    assert "original" in sn._parameters
    assert {"_u", "_v"} <= set(sn[0]._buffers)
    assert "weight" not in m._parameters and "weight" not in m._buffers
    assert sn.original.shape == m.weight.shape and sn.original.stride() == m.weight.stride()
    m.eval()
    before = m.weight.detach().clone()
    torch.nn.utils.parametrize.remove_parametrizations(m, "weight")
    assert "weight" in m._parameters
    torch.testing.assert_close(m.weight.detach(), before)
    ganops.spectral_norm(m, "weight")
    ganops.spectral_norm(m, "weight")
    ganops.spectral_norm(m, "bias")
    torch.nn.utils.parametrize.remove_parametrizations(m, "bias")
    assert "bias" in m._parameters and torch.nn.utils.parametrize.is_parametrized(m, "weight")


@pytest.mark.parametrize("device,backend", CPU)
def test_eval_repeats_the_last_training_weight_and_gradchecks(device, backend):
    """Eval mode gives the last training forward's weight and leaves u, v alone; mixed
    train/eval forwards from saved u, v are differentiable (float64 gradcheck)."""
    m = ganops.spectral_norm(nn.Linear(3, 4, dtype=torch.float64), backend=backend)
    x = torch.randn(2, 3, dtype=torch.float64)
    m(x)
    last = m(x).detach()
    u, v = _sn(m)[0]._u.clone(), _sn(m)[0]._v.clone()
    m.eval()
    # To rounding: training takes sigma from the norm its last step already has, eval from
    # u^T W v (bit-identical on some builds, 4e-16 apart on torch 2.13's).
    torch.testing.assert_close(m(x), last, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(m(x), last, rtol=1e-12, atol=1e-14)
    assert torch.equal(_sn(m)[0]._u, u) and torch.equal(_sn(m)[0]._v, v)

    def mixed(inp):
        _sn(m)[0]._u.copy_(u)
        _sn(m)[0]._v.copy_(v)
        outs = []
        for training in (True, False, True, False):
            m.train(training)
            outs.append(m(inp))
        return sum(outs)

    assert torch.autograd.gradcheck(mixed, (x.clone().requires_grad_(),))


def test_state_dict_after_training_reloads_to_the_same_outputs():
    """A state_dict saved after some training forwards, loaded into a fresh registration,
    gives the same eval and train outputs; unknown keys are refused when strict."""
    x = torch.randn(2, 3)
    m = ganops.spectral_norm(nn.Linear(3, 5))
    for _ in range(3):
        m(x)
    state = copy.deepcopy(m.state_dict())
    assert set(state) == {"parametrizations.weight.original", "bias", "parametrizations.weight.0._u",
                          "parametrizations.weight.0._v"}
    with torch.no_grad():
        m.eval()
        outs = [m(x)]
        m.train()
        outs += [m(x), m(x)]
    fresh = ganops.spectral_norm(torch.nn.utils.parametrize.remove_parametrizations(m, "weight"))
    with pytest.raises(RuntimeError, match="Unexpected key"):
        fresh.load_state_dict({**state, "nonsense": torch.zeros(1)}, strict=True)
    fresh.load_state_dict(state)
    with torch.no_grad():
        fresh.eval()
        torch.testing.assert_close(fresh(x), outs[0])
        fresh.train()
        torch.testing.assert_close(fresh(x), outs[1])
        torch.testing.assert_close(fresh(x), outs[2])


@pytest.mark.parametrize("device,backend", ALL)
def test_nan_weight_entry_makes_u_nan_like_torch(device, backend):
    """A NaN in W makes |W v| NaN: torch's normalize keeps it (clamp_min(NaN) is NaN) and u is
    all NaN. The kernels' clamp used `norm > eps ? norm : eps`, which turned the NaN norm into
    eps and left the other entries of u finite and huge (inf in float16)."""
    w = torch.tensor([[float("nan")], [-0.2935]], dtype=torch.float16, device=device)
    u = torch.tensor([0.9824, -0.1870], dtype=torch.float16, device=device)
    v = torch.tensor([-1.0], dtype=torch.float16, device=device)
    ganops.spectral_normalize(w, u, v, backend=backend)
    assert torch.isnan(u).all() and torch.isnan(v).all()


@pytest.mark.parametrize("device,backend", ALL)
def test_float64_eps_is_exact_on_every_backend(device, backend):
    """eps is a float64 for float64 weights: a compiled Triton kernel takes a Python float as
    a float32 argument, so an eps of 1e40 became inf and u, v became 0. (The interpreter
    keeps Python floats as they are, so only a GPU run showed it; now eps travels split.)"""
    eps = 1e40
    w = torch.randn(4, 3, dtype=torch.float64, device=device)
    u = F.normalize(torch.randn(4, dtype=torch.float64), dim=0).to(device)
    v = F.normalize(torch.randn(3, dtype=torch.float64), dim=0).to(device)
    u_ref, v_ref = u.cpu().clone(), v.cpu().clone()
    w_sn, sigma = ganops.spectral_normalize(w, u, v, eps=eps, backend=backend)
    mat = w.cpu()
    u_ref = mat @ v_ref / max(float((mat @ v_ref).norm()), eps)
    v_ref = mat.t() @ u_ref / max(float((mat.t() @ u_ref).norm()), eps)
    torch.testing.assert_close(u.cpu(), u_ref, rtol=1e-10, atol=0)
    torch.testing.assert_close(v.cpu(), v_ref, rtol=1e-10, atol=0)
    torch.testing.assert_close(sigma.cpu(), u_ref @ mat @ v_ref, rtol=1e-10, atol=0)


def test_triton_column_partials_fit_cuda_grid_limits():
    """Row chunks rode on grid axis 1, which CUDA caps at 65535 (4.2 M rows); the column
    partials now use a 1-D grid of every (column tile, row chunk)."""
    pytest.importorskip("triton")
    from ganops.triton_kernels import spectral_norm as kernels
    rows = 65535 * kernels.ROWS_PER_CHUNK + 1
    n_a_tiles, n_b_tiles, grid = kernels.col_partial_grid((1, rows, 300))
    assert len(grid) == 1 and grid[0] <= kernels.MAX_GRID_X
    assert grid[0] == n_a_tiles * n_b_tiles * 65536 and (n_a_tiles, n_b_tiles) == (1, 2)


@pytest.mark.skipif(not ganops._backend.triton_interpret(), reason="reads the Triton interpreter's arithmetic")
@pytest.mark.parametrize("shape,dim", [((70, 300), 0), ((300, 70), 1), ((5, 130, 3, 3), 1)])
def test_triton_index_math_is_64_bit(shape, dim):
    """Every pointer offset and every integer product of the Triton kernels (forward, eval
    mode, backward) is int64, so none wraps past 2^31 elements. A weight that large does not
    fit this machine; the interpreter shows the dtypes the arithmetic runs in (this found the
    int32 products r * cols of the partials' index and rows * inner of the backward's)."""
    pytest.importorskip("triton")
    w = torch.randn(shape, requires_grad=True)
    rows = shape[dim]
    u = F.normalize(torch.randn(rows), dim=0)
    v = F.normalize(torch.randn(w.numel() // rows), dim=0)
    with record_index_math() as seen:
        w_sn, sigma = ganops.spectral_normalize(w, u, v, dim=dim, backend="triton")
        (w_sn.sum() + sigma).backward()
        ganops.spectral_normalize(w.detach(), u, v, dim=dim, training=False, backend="triton")
    assert len(seen) > 100
    assert int32_index_math(seen) == []


def test_triton_launchers_make_the_tensors_device_current():
    """Every Triton launcher of spectral norm, the gradient penalty and minibatch similarity
    runs under the tensors' device guard (Triton launches on the current device)."""
    pytest.importorskip("triton")
    from ganops.triton_kernels import gradient_penalty, minibatch_discrimination, spectral_norm
    launchers = [spectral_norm.spectral_norm_forward_, spectral_norm.spectral_norm_backward,
                 gradient_penalty.interpolate, gradient_penalty.interpolate_backward,
                 gradient_penalty.gradient_norm_penalty, gradient_penalty.gradient_norm_penalty_backward,
                 minibatch_discrimination.minibatch_discrimination, minibatch_discrimination.minibatch_discrimination_backward,
                 minibatch_discrimination.minibatch_discrimination_double_backward]
    assert all(getattr(f, "guards_device", False) for f in launchers)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_triton_on_second_gpu_while_first_is_current():
    w = torch.randn(6, 5, device="cuda:1")
    u = F.normalize(torch.randn(6, device="cuda:1"), dim=0)
    v = F.normalize(torch.randn(5, device="cuda:1"), dim=0)
    u_ref, v_ref = u.clone(), v.clone()
    with torch.cuda.device(0):
        w_sn, _ = ganops.spectral_normalize(w, u, v, backend="triton")
        ref, _ = ganops.spectral_normalize(w, u_ref, v_ref, backend="torch")
    torch.testing.assert_close(w_sn, ref)
