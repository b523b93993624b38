"""ganops.minibatch_similarity and ganops.nn.MinibatchDiscrimination against a naive
float64 reference written here, independent of the package's own."""

import itertools

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import ganops
from conftest import assert_within_reference_error, backend_params, requires_cuda, tol

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
FULL_GRID = list(itertools.product((1, 2, 7, 64, 300), (1, 5, 64), (1, 5, 16)))
# Interpreted Triton runs the j loop in Python: a subset that still covers N = 1, several
# programs per launch (N·B > 64), partial tiles, and C = 1 and 16.
TRITON_GRID = [(1, 5, 5), (2, 1, 1), (7, 5, 16), (7, 64, 5), (64, 5, 1)]
# The torch backend holds N×N×B×C differences; N = 300 would take ~1 GB at float64.
TORCH_GRID = [s for s in FULL_GRID if s[0] <= 64]


def naive_similarity(M: torch.Tensor, exclude_self: bool, rows_per_block: int = 16) -> torch.Tensor:
    """o[i, b] = Σ_j exp(−Σ_c |M[i,b,c] − M[j,b,c]|) in M's dtype, by broadcasting over
    blocks of rows i (bounded memory at N = 300)."""
    N = M.shape[0]
    blocks = []
    for start in range(0, N, rows_per_block):
        i = torch.arange(start, min(start + rows_per_block, N))
        K = torch.exp(-(M[i].unsqueeze(1) - M.unsqueeze(0)).abs().sum(-1))  # (rows, N, B)
        if exclude_self:
            K = K * (i.unsqueeze(1) != torch.arange(N)).unsqueeze(-1).to(K.dtype)
        blocks.append(K.sum(1))
    return torch.cat(blocks)


def make_M(N, B, C, dtype, device="cpu", seed=0, scale=0.4):
    """Entries ~ N(0, scale²): the similarities spread over (0, 1) instead of all vanishing."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, B, C, generator=g, dtype=torch.float64) * scale).to(device, dtype)


def values_and_grad(fn, M, g):
    """(o, dM) with dM the gradient of Σ o·g."""
    M = M.detach().requires_grad_()
    o = fn(M)
    (dM,) = torch.autograd.grad(o, M, g)
    return o.detach(), dM


def assert_close_normwise(actual, exact, dtype):
    """Within the dtype's rtol of the largest |exact| entry, elementwise: dM sums terms of
    both signs, so an entry can cancel to far below the terms' rounding error (plain float32
    PyTorch misses an elementwise 1e-5 there too)."""
    exact = exact.double()
    scale = exact.abs().max().item() if exact.numel() else 0.0
    t = tol(dtype)
    torch.testing.assert_close(actual.cpu().double(), exact, rtol=t["rtol"], atol=t["atol"] + t["rtol"] * scale)


def grid_for(backend):
    return {"cpp": FULL_GRID, "triton": TRITON_GRID, "torch": TORCH_GRID}[backend]


def _check_values(device, backend, dtype, N, B, C, exclude_self):
    M = make_M(N, B, C, dtype, device, seed=N * 100 + B * 10 + C)
    g = torch.randn(N, B, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device, dtype)
    o, dM = values_and_grad(lambda x: ganops.minibatch_similarity(x, exclude_self=exclude_self, backend=backend),
                            M, g)
    assert o.shape == (N, B) and o.dtype == dtype and dM.shape == (N, B, C) and dM.dtype == dtype
    o_exact, dM_exact = values_and_grad(lambda x: naive_similarity(x, exclude_self), M.cpu().double(), g.cpu().double())
    if dtype in (torch.float64, torch.float32):
        assert_close_normwise(o, o_exact, dtype)
        assert_close_normwise(dM, dM_exact, dtype)
    else:
        o_low, dM_low = values_and_grad(lambda x: naive_similarity(x, exclude_self), M.cpu(), g.cpu())
        assert_within_reference_error(o.cpu(), o_low, o_exact, dtype)
        assert_within_reference_error(dM.cpu(), dM_low, dM_exact, dtype)


def _backend_shape_params():
    """(device, backend, N, B, C) over each backend's grid, keeping backend_params' skips."""
    params = []
    for p in backend_params():
        device, backend = p.values
        for N, B, C in grid_for(backend):
            params.append(pytest.param(device, backend, N, B, C, marks=p.marks, id=f"{p.id}-{N}x{B}x{C}"))
    return params


@pytest.mark.parametrize("device,backend,N,B,C", _backend_shape_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_values_and_gradients(device, backend, N, B, C, dtype):
    _check_values(device, backend, dtype, N, B, C, exclude_self=True)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("dtype", (torch.float64, torch.float16), ids=str)
@pytest.mark.parametrize("N,B,C", [(1, 3, 2), (7, 5, 16), (64, 5, 5)])
def test_keep_self(device, backend, dtype, N, B, C):
    _check_values(device, backend, dtype, N, B, C, exclude_self=False)


@pytest.mark.parametrize("device,backend", backend_params())
def test_non_contiguous_inputs(device, backend):
    N, B, C = 9, 6, 5
    base = make_M(C, N, 2 * B, torch.float64, device)
    M = base.permute(1, 2, 0)[:, ::2]  # (N, B, C), no dimension contiguous
    assert not M.is_contiguous()
    g = torch.randn(N, 1, dtype=torch.float64, device=device).expand(N, B)  # stride 0
    o, dM = values_and_grad(lambda x: ganops.minibatch_similarity(x, backend=backend), M, g)
    o_exact, dM_exact = values_and_grad(lambda x: naive_similarity(x, True), M.cpu().contiguous(), g.cpu())
    torch.testing.assert_close(o.cpu(), o_exact, **tol(torch.float64))
    torch.testing.assert_close(dM.cpu(), dM_exact, **tol(torch.float64))


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("exclude_self", (True, False))
@pytest.mark.parametrize("N,B,C", [(1, 2, 3), (6, 3, 4)])
def test_gradcheck_and_gradgradcheck(device, backend, exclude_self, N, B, C):
    # Distinct entries keep every difference away from the kink of |x| at 0.
    M = make_M(N, B, C, torch.float64, device, seed=3, scale=0.5).requires_grad_()

    def fn(x):
        return ganops.minibatch_similarity(x, exclude_self=exclude_self, backend=backend)

    assert gradcheck(fn, (M,))
    assert gradgradcheck(fn, (M,))


@pytest.mark.parametrize("device,backend", backend_params())
def test_double_backward_matches_reference(device, backend):
    """The second-order terms a gradient penalty needs, against autograd through the naive reference."""
    N, B, C = 11, 4, 5
    M = make_M(N, B, C, torch.float64, device, seed=5)
    g = torch.randn(N, B, dtype=torch.float64, device=device)
    h = torch.randn(N, B, C, dtype=torch.float64, device=device)

    def second_order(fn, M, g):
        M = M.detach().requires_grad_()
        g = g.detach().requires_grad_()
        (dM,) = torch.autograd.grad(fn(M), M, g, create_graph=True)
        return torch.autograd.grad(dM, (g, M), h.to(M.device))

    got = second_order(lambda x: ganops.minibatch_similarity(x, backend=backend), M, g)
    want = second_order(lambda x: naive_similarity(x, True), M.cpu(), g.cpu())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, **tol(torch.float64))


class _Critic(torch.nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.features = torch.nn.Linear(6, 8)
        self.mbd = ganops.nn.MinibatchDiscrimination(8, 5, 3, backend=backend)
        self.head = torch.nn.Linear(13, 1)

    def forward(self, x):
        return self.head(self.mbd(torch.tanh(self.features(x))))


@pytest.mark.parametrize("device,backend", backend_params())
def test_r1_penalty_through_critic(device, backend):
    """R1 (‖∇ₓD(x)‖²) differentiates through the layer twice; the critic's parameter
    gradients match the same critic on the naive-equivalent torch backend."""
    torch.manual_seed(0)
    critics = {}
    for name in (backend, "torch"):
        torch.manual_seed(0)
        critics[name] = _Critic(name).to(device, torch.float64)
        critics[name].mbd.T.data.mul_(0.3)
    x = torch.randn(10, 6, dtype=torch.float64, device=device)
    grads = {}
    for name, critic in critics.items():
        xr = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(critic(xr).sum(), xr, create_graph=True)
        penalty = gx.pow(2).sum()
        grads[name] = torch.autograd.grad(penalty, list(critic.parameters()), materialize_grads=True)
    for a, b in zip(grads[backend], grads["torch"]):
        torch.testing.assert_close(a, b, **tol(torch.float64))


@pytest.mark.parametrize("device,backend", backend_params())
def test_module(device, backend):
    torch.manual_seed(0)
    layer = ganops.nn.MinibatchDiscrimination(12, 7, 4, backend=backend).to(device, torch.float64)
    assert layer.T.shape == (12, 7, 4)
    x = torch.randn(9, 12, dtype=torch.float64, device=device, requires_grad=True)
    out = layer(x)
    assert out.shape == (9, 12 + 7)
    torch.testing.assert_close(out[:, :12], x)
    T = layer.T.detach().cpu().requires_grad_()
    xc = x.detach().cpu().requires_grad_()
    want = torch.cat([xc, naive_similarity((xc @ T.reshape(12, -1)).view(9, 7, 4), True)], 1)
    torch.testing.assert_close(out.detach().cpu(), want.detach(), **tol(torch.float64))
    w = torch.randn_like(want)
    out.backward(w.to(device))
    dT, dx = torch.autograd.grad(want, (T, xc), w)
    torch.testing.assert_close(layer.T.grad.cpu(), dT, **tol(torch.float64))
    torch.testing.assert_close(x.grad.cpu(), dx, **tol(torch.float64))


def test_module_init_and_errors():
    torch.manual_seed(0)
    layer = ganops.nn.MinibatchDiscrimination(64, 32, 16)
    # T ~ N(0, 1), as torchgan initialises it.
    assert abs(layer.T.mean().item()) < 0.05 and abs(layer.T.std().item() - 1) < 0.05
    with pytest.raises(ValueError, match="x must have shape"):
        layer(torch.randn(3, 63))
    with pytest.raises(ValueError, match="kernel_dims"):
        ganops.nn.MinibatchDiscrimination(4, 4, 0)


@pytest.mark.parametrize("device,backend", backend_params())
def test_single_sample(device, backend):
    M = make_M(1, 4, 3, torch.float32, device)
    assert torch.equal(ganops.minibatch_similarity(M, backend=backend).cpu(), torch.zeros(1, 4))
    assert torch.equal(ganops.minibatch_similarity(M, exclude_self=False, backend=backend).cpu(), torch.ones(1, 4))


@pytest.mark.parametrize("device,backend", backend_params())
def test_nan_propagates(device, backend):
    M = make_M(5, 3, 4, torch.float32, device)
    M[2, 1, 0] = float("nan")
    o = ganops.minibatch_similarity(M, backend=backend).cpu()
    # Every sample is compared with sample 2 in kernel 1, and only there.
    assert o[:, 1].isnan().all()
    assert not o[:, [0, 2]].isnan().any()


@pytest.mark.parametrize("device,backend", backend_params())
def test_bad_input(device, backend):
    f = ganops.minibatch_similarity
    with pytest.raises(ValueError, match="M must be 3-D"):
        f(torch.randn(4, 5, device=device), backend=backend)
    with pytest.raises(ValueError, match="at least one sample"):
        f(torch.randn(0, 5, 3, device=device), backend=backend)
    with pytest.raises(TypeError, match="M has dtype"):
        f(torch.ones(4, 5, 3, dtype=torch.int64, device=device), backend=backend)
    with pytest.raises(TypeError, match="M must be a tensor"):
        f([[[1.0]]], backend=backend)
    with pytest.raises(TypeError, match="exclude_self must be a bool"):
        f(torch.randn(4, 5, 3, device=device), exclude_self=1, backend=backend)


def test_compiled_ops_check_their_inputs():
    """Direct torch.ops calls, which skip the Python checks, get errors naming the argument."""
    ops = torch.ops.ganops
    with pytest.raises(RuntimeError, match="M must be 3-D"):
        ops.minibatch_discrimination(torch.randn(4, 5), True)
    with pytest.raises(RuntimeError, match="at least one sample"):
        ops.minibatch_discrimination(torch.randn(0, 5, 3), True)
    with pytest.raises(RuntimeError, match="grad must have shape"):
        ops.minibatch_discrimination_backward(torch.randn(4, 4), torch.randn(4, 5, 3))
    with pytest.raises(RuntimeError, match="grad must have M's dtype"):
        ops.minibatch_discrimination_backward(torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, 3))
    with pytest.raises(RuntimeError, match="grad_grad_M must have shape"):
        ops.minibatch_discrimination_double_backward(torch.randn(4, 5, 2), torch.randn(4, 5), torch.randn(4, 5, 3))


# C = 16 is the widest row the backward passes keep in registers, C = 17 the narrowest they
# accumulate in place (minibatch_discrimination.h's kRegisterC).
@pytest.mark.parametrize("N,B,C", [(1, 1, 1), (3, 5, 2), (300, 1, 3), (33, 17, 16), (9, 64, 5), (7, 3, 17)])
def test_cuda_launch_check(N, B, C):
    """The CUDA kernels' per-thread functions, run on the CPU for every (block, thread) of
    the launch the CUDA host code chooses: each (i, b) row exactly once, right values."""
    M = make_M(N, B, C, torch.float64)
    g = torch.randn(N, B, dtype=torch.float64)
    h = torch.randn(N, B, C, dtype=torch.float64)
    coverage, o, dM, dg, dM2 = torch.ops.ganops._minibatch_discrimination_cuda_launch_check(M, g, h, True)
    assert torch.equal(coverage, torch.ones(N, B, dtype=torch.int32))
    o_exact, dM_exact = values_and_grad(lambda x: naive_similarity(x, True), M, g)
    torch.testing.assert_close(o, o_exact, **tol(torch.float64))
    torch.testing.assert_close(dM, dM_exact, **tol(torch.float64))
    Mr, gr = M.clone().requires_grad_(), g.clone().requires_grad_()
    (first,) = torch.autograd.grad(naive_similarity(Mr, True), Mr, gr, create_graph=True)
    dg_exact, dM2_exact = torch.autograd.grad(first, (gr, Mr), h)
    torch.testing.assert_close(dg, dg_exact, **tol(torch.float64))
    torch.testing.assert_close(dM2, dM2_exact, **tol(torch.float64))


def _compiled_fwd_bwd(device, backend):
    M = make_M(20, 7, 4, torch.float32, device)
    g = torch.randn(20, 7, device=device)

    def step(M):
        return ganops.minibatch_similarity(M, backend=backend)

    compiled = torch.compile(step, fullgraph=True)
    got = values_and_grad(compiled, M, g)
    want = values_and_grad(lambda x: naive_similarity(x, True), M.cpu().double(), g.cpu().double())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu().double(), b, **tol(torch.float32))


def test_torch_compile_cpp_cpu():
    torch._dynamo.reset()
    _compiled_fwd_bwd("cpu", "cpp")


@requires_cuda
@pytest.mark.parametrize("backend", ("cpp", "triton"))
def test_torch_compile_cuda(backend):
    torch._dynamo.reset()
    _compiled_fwd_bwd("cuda", backend)


# ---------------------------------------------------------------------------------------
# torchgan's signature: MinibatchDiscrimination1d(in_features, out_features,
# intermediate_features=16), its parameter and its output
# ---------------------------------------------------------------------------------------

def torchgan_formula(x, T):
    """torchgan's layer written out: o[i, b] = Σ_j exp(−‖M_ib − M_jb‖₁) − 1 over every j
    (the j = i term is exp(0) = 1), concatenated after x."""
    n, a = x.shape
    M = (x @ T.reshape(a, -1)).reshape(n, T.shape[1], T.shape[2])
    l1 = (M[:, None] - M[None, :]).abs().sum(-1)  # (N, N, B)
    return torch.cat([x, torch.exp(-l1).sum(1) - 1], dim=1)


def test_torchgan_calls_positional_and_keyword():
    default = ganops.nn.MinibatchDiscrimination(100, 20)
    assert default.T.shape == (100, 20, 16) and default.intermediate_features == 16
    keyword = ganops.nn.MinibatchDiscrimination(in_features=10, out_features=4, intermediate_features=5)
    positional = ganops.nn.MinibatchDiscrimination(10, 4, 5)
    assert keyword.T.shape == positional.T.shape == (10, 4, 5)
    assert "intermediate_features=5" in repr(keyword)
    with pytest.raises(ValueError, match="intermediate_features"):
        ganops.nn.MinibatchDiscrimination(4, 4, intermediate_features=0)
    with pytest.raises(ValueError, match="out_features must be a positive int"):
        ganops.nn.MinibatchDiscrimination(4, True)


def test_kernel_dims_is_a_deprecated_alias():
    with pytest.warns(FutureWarning, match=r"kernel_dims=\.\.\.\) is deprecated; use intermediate_features"):
        layer = ganops.nn.MinibatchDiscrimination(6, 3, kernel_dims=7)
    assert layer.T.shape == (6, 3, 7) and layer.kernel_dims == 7


@pytest.mark.parametrize("device,backend", backend_params(devices=("cpu",)))
def test_torchgan_state_dict_and_output(device, backend):
    """A torchgan state dict ({'T': (A, B, C)}) loads as it is, and the output is torchgan's."""
    torch.manual_seed(1)
    T = torch.randn(9, 6, 4, dtype=torch.float64) * 0.4
    layer = ganops.nn.MinibatchDiscrimination(9, 6, 4, backend=backend).double()
    layer.load_state_dict({"T": T})
    x = torch.randn(7, 9, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    want = torchgan_formula(x, T)
    torch.testing.assert_close(out, want, **tol(torch.float64))
    (dx,) = torch.autograd.grad(out.square().sum(), x)
    (dx_want,) = torch.autograd.grad(want.square().sum(), x)
    torch.testing.assert_close(dx, dx_want, **tol(torch.float64))


# ---------------------------------------------------------------------------------------
# Regressions found by tests/test_differential.py and a reading of the GPU code
# ---------------------------------------------------------------------------------------

def test_triton_column_tile_is_capped():
    """BLOCK_C was next_pow2(C) with no cap: a [64, 128] tile spills registers and past 2^20
    elements per tile the kernel does not compile. Columns now come in tiles of at most 64."""
    pytest.importorskip("triton")
    from ganops.triton_kernels import minibatch_discrimination as kernels
    assert kernels.block_c(5) == 8
    assert kernels.block_c(64) == 64
    assert kernels.block_c(200) == 64 and kernels.block_c(2**21) == 64


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("C", [65, 130])
def test_more_columns_than_one_tile(device, backend, C):
    """C past the column tile: distances summed over several tiles, and the backward passes'
    per-column programs; value, gradient and double backward against float64 formulas."""
    g = torch.Generator().manual_seed(C)
    M64 = torch.randn(4, 3, C, generator=g, dtype=torch.float64) / C
    M = M64.clone().to(device).requires_grad_(True)
    o = ganops.minibatch_similarity(M, exclude_self=False, backend=backend)
    ref = torch.exp(-(M64[:, None] - M64[None]).abs().sum(-1)).sum(1)
    torch.testing.assert_close(o.cpu(), ref, rtol=1e-10, atol=1e-12)
    grad = torch.randn(4, 3, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    (dM,) = torch.autograd.grad(o, M, grad, create_graph=True)
    h = torch.randn(4, 3, C, generator=g, dtype=torch.float64).to(device)
    d_grad, d_M = torch.autograd.grad(dM, (grad, M), h)
    m = M64.clone().requires_grad_(True)
    gr = grad.detach().cpu().clone().requires_grad_(True)
    (dm,) = torch.autograd.grad(torch.exp(-(m[:, None] - m[None]).abs().sum(-1)).sum(1), m, gr, create_graph=True)
    ref_d_grad, ref_d_M = torch.autograd.grad(dm, (gr, m), h.cpu())
    torch.testing.assert_close(dM.detach().cpu(), dm.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(d_grad.cpu(), ref_d_grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(d_M.cpu(), ref_d_M, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("exclude_self", [True, False])
def test_infinite_entry_gives_the_same_gradient_on_every_backend(device, backend, exclude_self):
    """The self term has no gradient. The torch backend's autograd took it through
    exp(-|inf - inf|) and gave NaN where the kernels give 0 (N = 1: the only term is j = i)."""
    M = torch.tensor([[[float("inf"), 0.5]]], device=device, requires_grad=True)
    o = ganops.minibatch_similarity(M, exclude_self=exclude_self, backend=backend)
    assert torch.isnan(o).item() != exclude_self  # exp(-NaN) kept when the self term is
    (dM,) = torch.autograd.grad(o, M, torch.ones_like(o))
    torch.testing.assert_close(dM, torch.zeros_like(M), rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", backend_params())
def test_zero_kernel_dims_double_backward_writes_zeros(device, backend):
    """C = 0: every distance is 0, Q is 0, so d/dg is 0. With one program per column tile the
    Triton double backward launched no program for C = 0 and returned uninitialised memory."""
    M = torch.zeros(2, 4, 0, requires_grad=True, device=device)
    grad = torch.randn(2, 4, device=device, requires_grad=True)
    o = ganops.minibatch_similarity(M, exclude_self=False, backend=backend)
    torch.testing.assert_close(o, torch.full((2, 4), 2.0, device=device))
    (dM,) = torch.autograd.grad(o, M, grad, create_graph=True)
    d_grad, d_M = torch.autograd.grad(dM, (grad, M), torch.zeros_like(M), allow_unused=True)
    assert d_grad is None or torch.equal(d_grad, torch.zeros_like(grad))
