"""Tests of the kernels of scaled-dot-product attention, to second order: the Triton launchers
(called directly: on CPU tensors under TRITON_INTERPRET=1, else on the GPU), the CUDA kernels
(through their ops, where a GPU is visible) and the CUDA kernels' launch run on the CPU (every
block and thread), against attention written out here in float64 and
differentiated by autograd, on the edge cases of the tiling: tails of L and S, causal masks
with L ≠ S, E ≠ Ev, every float dtype, strided inputs, absent cotangents, and empty sizes.

The op's public function, its registry entries and the contract suite are tested in
tests/test_scaled_dot_product_attention.py.
"""

import math

import pytest
import torch

import ganops
from conftest import assert_within_reference_error, tol

# Triton runs on the GPU where one is visible, else on CPU tensors under the interpreter.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() and not ganops._backend.triton_interpret() else "cpu"
HAS_CPP = ganops._backend.unavailable_reason("cpp", "cpu") is None
requires_cpp = pytest.mark.skipif(not HAS_CPP, reason="the compiled extension is not built")


def _kernel_param(kernel, reason):
    return pytest.param(kernel, id=kernel, marks=pytest.mark.skipif(reason is not None, reason=f"{kernel}: {reason}"))


# The kernels run directly: the Triton launchers, and the CUDA kernels through their ops.
KERNELS = [
    _kernel_param("triton", ganops._backend.unavailable_reason("triton", TRITON_DEVICE)),
    _kernel_param("cuda", "needs a CUDA GPU; none is visible" if not torch.cuda.is_available()
                  else ganops._backend.unavailable_reason("cpp", "cuda")),
]


# ---------------------------------------------------------------------------------------
# The reference, written out here
# ---------------------------------------------------------------------------------------

def attention(q, k, v, scale, is_causal):
    """(softmax(scale · q kᵀ, masked) v, logsumexp), in q's dtype; key j masked for query i
    where j > i when is_causal. S = 0 gives out = 0 and lse = −inf."""
    s = scale * q @ k.transpose(-1, -2)
    if is_causal:
        L, S = s.shape[-2:]
        s = s.masked_fill(torch.ones(L, S, dtype=torch.bool).triu(1), -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    return torch.exp(s - lse[..., None]) @ v, lse


def reference_orders(q, k, v, grad_out, cotangents, scale, is_causal, dtype=torch.float64):
    """Forward (out, lse), backward (dQ, dK, dV) and double backward (grad of dO, of Q, of K,
    of V) of `attention` computed in dtype by autograd; cotangents (gQ, gK, gV), None zero."""
    q, k, v, grad_out = (t.detach().to(dtype).requires_grad_(True) for t in (q, k, v, grad_out))
    out, lse = attention(q, k, v, scale, is_causal)
    grads = torch.autograd.grad(out, (q, k, v), grad_out, create_graph=True)
    pairs = [(g, c.to(dtype)) for g, c in zip(grads, cotangents) if c is not None]
    second = torch.autograd.grad([g for g, _ in pairs], (grad_out, q, k, v), [c for _, c in pairs],
                                 allow_unused=True) if pairs else (None,) * 4
    second = tuple(torch.zeros_like(t) if g is None else g for g, t in zip(second, (grad_out, q, k, v)))
    detach = lambda ts: tuple(t.detach() for t in ts)  # noqa: E731
    return detach((out, lse)), detach(grads), detach(second)


def rand(*shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def inputs(B, L, S, E, Ev, dtype, seed=0):
    """q, k, v, grad_out and the three cotangents, with values of order 1."""
    return (rand(B, L, E, dtype=dtype, seed=seed), rand(B, S, E, dtype=dtype, seed=seed + 1),
            rand(B, S, Ev, dtype=dtype, seed=seed + 2), rand(B, L, Ev, dtype=dtype, seed=seed + 3),
            (rand(B, L, E, dtype=dtype, seed=seed + 4), rand(B, S, E, dtype=dtype, seed=seed + 5),
             rand(B, S, Ev, dtype=dtype, seed=seed + 6)))


def _ops(kernel):
    if kernel == "triton":
        from ganops.triton_kernels import scaled_dot_product_attention as ops
        return ops
    return torch.ops.ganops


def device_orders(kernel, q, k, v, grad_out, cotangents, scale, is_causal):
    """The three orders from `kernel`'s launchers ("triton", or "cuda": the ops on CUDA
    tensors), each fed the previous one's results, on the inputs' device."""
    ops = _ops(kernel)
    out, lse = ops.scaled_dot_product_attention(q, k, v, scale, is_causal)
    grads = ops.scaled_dot_product_attention_backward(grad_out, q, k, v, out, lse, scale, is_causal)
    second = ops.scaled_dot_product_attention_double_backward(*cotangents, grad_out, q, k, v, out, lse, scale,
                                                              is_causal)
    return (out, lse), grads, second


def kernel_orders(kernel, q, k, v, grad_out, cotangents, scale, is_causal):
    """device_orders with the inputs moved to the kernel's device and the results back."""
    device = TRITON_DEVICE if kernel == "triton" else "cuda"
    q, k, v, grad_out = (t.to(device) for t in (q, k, v, grad_out))
    cotangents = tuple(None if c is None else c.to(device) for c in cotangents)
    got = device_orders(kernel, q, k, v, grad_out, cotangents, scale, is_causal)
    return tuple(tuple(t.cpu() for t in order) for order in got)


def launch_check_orders(q, k, v, grad_out, cotangents, scale, is_causal):
    """The three orders from the CUDA launches replayed on the CPU, and every visit count."""
    results = torch.ops.ganops._scaled_dot_product_attention_cuda_launch_check(q, k, v, grad_out, *cotangents,
                                                                                scale, is_causal)
    *values, visits = results
    return (tuple(values[:2]), tuple(values[2:5]), tuple(values[5:9])), visits


# (B, L, S, E, Ev): one tile; tails of L and S over several tiles; L < S and L > S for the
# causal mask's corner; a head dimension that is no power of two and E ≠ Ev.
SHAPES = [(1, 5, 7, 4, 4), (2, 37, 21, 5, 3), (2, 21, 40, 8, 6), (1, 70, 67, 16, 12)]
SHAPE_IDS = ["one_tile", "tails_L_gt_S", "tails_L_lt_S", "over_64"]


def assert_orders_close(got, want, dtype):
    for name, got_order, want_order in zip(("forward", "backward", "double backward"), got, want):
        for i, (g, w) in enumerate(zip(got_order, want_order)):
            assert g.shape == w.shape, f"{name} output {i}: shape {tuple(g.shape)}, want {tuple(w.shape)}"
            assert g.is_contiguous(), f"{name} output {i} is not contiguous"
            torch.testing.assert_close(g.double(), w.double(), **tol(dtype), msg=lambda m: f"{name} output {i}: {m}")


# Half types: causal, tails, scale 1/√E.
HALF_SHAPE, HALF_SCALE = (2, 37, 45, 8, 8), 1 / math.sqrt(8)


def assert_half_orders(got, q, k, v, grad_out, cotangents):
    """Every order within 2× the error of the formula run in the inputs' half dtype (causal,
    HALF_SCALE); logsumexp in float32, the rest in the half dtype."""
    dtype = q.dtype
    exact = reference_orders(q, k, v, grad_out, cotangents, HALF_SCALE, True)
    low = reference_orders(q, k, v, grad_out, cotangents, HALF_SCALE, True, dtype=dtype)
    for got_order, low_order, exact_order in zip(got, low, exact):
        for g, lo, ex in zip(got_order, low_order, exact_order):
            assert g.dtype == (torch.float32 if g is got[0][1] else dtype)
            assert_within_reference_error(g, lo, ex, dtype)


# ---------------------------------------------------------------------------------------
# Triton, on the interpreter
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape", SHAPES[:3], ids=SHAPE_IDS[:3])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_float64(kernel, shape, is_causal):
    """Every order of the kernels equals autograd through the formula, in float64
    (whose tiles are 16 wide: these shapes cross several)."""
    q, k, v, grad_out, cotangents = inputs(*shape, torch.float64)
    scale = 1 / math.sqrt(shape[3])
    got = kernel_orders(kernel, q, k, v, grad_out, cotangents, scale, is_causal)
    assert got[0][1].dtype == torch.float64
    assert_orders_close(got, reference_orders(q, k, v, grad_out, cotangents, scale, is_causal), torch.float64)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3]], ids=["tails", "over_64"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_float32(kernel, shape, is_causal):
    """float32 to float32's tolerance of the float64 formula, with float32 logsumexp; the
    64-wide tiles of float32 have tails here."""
    q, k, v, grad_out, cotangents = inputs(*shape, torch.float32)
    scale = 0.3
    got = kernel_orders(kernel, q, k, v, grad_out, cotangents, scale, is_causal)
    assert got[0][1].dtype == torch.float32
    assert_orders_close(got, reference_orders(q, k, v, grad_out, cotangents, scale, is_causal), torch.float32)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_within_reference_error(kernel, dtype):
    """Half types within 2× the error of the formula run in that dtype; logsumexp in float32."""
    q, k, v, grad_out, cotangents = inputs(*HALF_SHAPE, dtype)
    got = kernel_orders(kernel, q, k, v, grad_out, cotangents, HALF_SCALE, True)
    assert_half_orders(got, q, k, v, grad_out, cotangents)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("present", [(True, False, False), (False, True, False), (False, False, True),
                                     (False, False, False)], ids=["gQ", "gK", "gV", "none"])
def test_absent_cotangents(kernel, present):
    """None cotangents count as zero (and are not read)."""
    q, k, v, grad_out, cotangents = inputs(2, 19, 23, 6, 5, torch.float64, seed=3)
    cotangents = tuple(c if p else None for c, p in zip(cotangents, present))
    got = kernel_orders(kernel, q, k, v, grad_out, cotangents, 0.5, True)
    assert_orders_close(got[2:], reference_orders(q, k, v, grad_out, cotangents, 0.5, True)[2:], torch.float64)


@pytest.mark.parametrize("kernel", KERNELS)
def test_strided_inputs(kernel):
    """Transposed and sliced views give what their contiguous copies give."""
    B, L, S, E, Ev = 2, 19, 23, 6, 5
    q, k, v, grad_out, cotangents = inputs(B, L, S, E, Ev, torch.float64, seed=5)
    views = [t.transpose(0, 1).contiguous().transpose(0, 1) for t in (q, k, v, grad_out)]
    views[0] = torch.cat([q, q], dim=-1)[..., ::2][..., :E].copy_(q)
    views[2] = rand(B, S, 2 * Ev, seed=9)[..., ::2].copy_(v)
    strided_cotangents = tuple(c.transpose(1, 2).contiguous().transpose(1, 2) for c in cotangents)
    assert not any(t.is_contiguous() for t in (*views, *strided_cotangents))
    got = kernel_orders(kernel, *views, strided_cotangents, 0.4, False)
    want = kernel_orders(kernel, q, k, v, grad_out, cotangents, 0.4, False)
    for got_order, want_order in zip(got, want):
        for g, w in zip(got_order, want_order):
            torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape", [(2, 4, 0, 3, 5), (2, 0, 6, 3, 5), (0, 4, 6, 3, 5)], ids=["S0", "L0", "B0"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_empty(kernel, shape, is_causal):
    """S = 0: out = 0, lse = −inf, dQ = 0 and empty dK, dV; L = 0 or B = 0: empty results and
    zero key gradients, as the math backend gives."""
    q, k, v, grad_out, cotangents = inputs(*shape, torch.float64)
    got = kernel_orders(kernel, q, k, v, grad_out, cotangents, 0.5, is_causal)
    want = reference_orders(q, k, v, grad_out, cotangents, 0.5, is_causal)
    if shape[2] == 0 and shape[1] > 0:
        assert (got[0][1] == -math.inf).all() and (got[0][0] == 0).all()
    assert_orders_close(got, want, torch.float64)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_no_features_with_the_default_infinite_scale(kernel, is_causal):
    """E = 0: every score is the empty sum 0, so P is uniform over the visible keys, even with
    the default scale 1/√0 = inf (torch's math path scales q, which has no elements)."""
    q, k, v, grad_out, cotangents = inputs(2, 5, 6, 0, 3, torch.float64)
    got = kernel_orders(kernel, q, k, v, grad_out, cotangents, math.inf, is_causal)
    want = reference_orders(q, k, v, grad_out, cotangents, 1.0, is_causal)
    assert_orders_close(got, want, torch.float64)


def special_rows():
    """q, k, v whose query rows 0, 1, 2 score −inf, +inf and NaN against every key (k > 0);
    the other rows are finite."""
    q, k, v, _, _ = inputs(1, 5, 6, 2, 3, torch.float64, seed=7)
    k = k.abs() + 0.1
    q[0, 0, 0], q[0, 1, 0], q[0, 2, 0] = -math.inf, math.inf, math.nan
    return q, k, v


def assert_special_forward(out, lse, q, k, v):
    """The math formula's values: out NaN for rows 0-2 (softmax of all −inf or with +inf or
    NaN), lse −inf, +inf and NaN as torch.logsumexp gives."""
    want_out, want_lse = attention(q, k, v, 0.5, False)
    assert want_out[0, :3].isnan().all()
    torch.testing.assert_close(out, want_out, **tol(torch.float64), equal_nan=True)
    torch.testing.assert_close(lse, want_lse, **tol(torch.float64), equal_nan=True)


@pytest.mark.parametrize("kernel", KERNELS)
def test_special_scores(kernel):
    q, k, v = special_rows()
    (forward, _, _) = kernel_orders(kernel, q, k, v, torch.zeros(1, 5, 3, dtype=torch.float64), (None,) * 3, 0.5,
                                    False)
    assert_special_forward(*forward, q, k, v)


@pytest.mark.parametrize("kernel", KERNELS)
def test_rejects_bad_shapes(kernel):
    """Errors name the argument (ValueError from the Triton launchers, RuntimeError from the ops)."""
    q, k, v, grad_out, cotangents = inputs(1, 4, 5, 3, 2, torch.float64)
    with pytest.raises((ValueError, RuntimeError), match="value must be"):
        kernel_orders(kernel, q, k, v[:, :4], grad_out, (None,) * 3, 0.5, False)
    with pytest.raises((ValueError, RuntimeError), match="grad_grad_key must"):
        kernel_orders(kernel, q, k, v, grad_out, (None, k[:, :2], None), 0.5, False)


@pytest.mark.parametrize("kernel", KERNELS)
def test_cuda_graph_capture(kernel):
    """The three orders launch without a host synchronisation: a CUDA graph captures them, and
    its replay gives the eager results to the bit."""
    if kernel == "triton" and TRITON_DEVICE != "cuda":
        pytest.skip("needs a CUDA GPU: the Triton kernels run interpreted on CPU tensors here")
    q, k, v, grad_out, cotangents = (t.cuda() if isinstance(t, torch.Tensor) else tuple(c.cuda() for c in t)
                                     for t in inputs(2, 37, 45, 8, 8, torch.float32))
    want = device_orders(kernel, q, k, v, grad_out, cotangents, 0.3, True)  # also compiles the Triton kernels
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = device_orders(kernel, q, k, v, grad_out, cotangents, 0.3, True)
    graph.replay()
    torch.cuda.synchronize()
    for got_order, want_order in zip(got, want):
        for g, w in zip(got_order, want_order):
            torch.testing.assert_close(g, w, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------
# The CUDA kernels' launch, run on the CPU
# ---------------------------------------------------------------------------------------

# (B, L, S, E, Ev): tails; more keys (S > 128) and more queries (L > 128) than a block has
# threads, so the tiles of a row and of a key column have tails; a head dimension over 128,
# so output columns take two passes.
LAUNCH_SHAPES = [(2, 7, 5, 3, 4), (1, 150, 131, 6, 5), (2, 9, 11, 136, 7)]
LAUNCH_IDS = ["small", "tiles_over_128", "columns_over_128"]


@requires_cpp
@pytest.mark.parametrize("shape", LAUNCH_SHAPES, ids=LAUNCH_IDS)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_cuda_launch_check(shape, is_causal, dtype):
    """Every (block, thread) of the CUDA launches: each element of every output and
    intermediate written exactly once, and every order equal to autograd through the formula."""
    q, k, v, grad_out, cotangents = inputs(*shape, dtype)
    scale = 1 / math.sqrt(shape[3])
    got, visits = launch_check_orders(q, k, v, grad_out, cotangents, scale, is_causal)
    B, L, S, E, Ev = shape
    assert visits.numel() == B * L * (2 * Ev + 2 * E + 5) + B * S * 2 * (E + Ev)
    assert (visits == 1).all(), f"{(visits != 1).sum().item()} elements not written exactly once"
    assert_orders_close(got, reference_orders(q, k, v, grad_out, cotangents, scale, is_causal), dtype)


@requires_cpp
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_launch_check_half_within_reference_error(dtype):
    q, k, v, grad_out, cotangents = inputs(*HALF_SHAPE, dtype)
    got, visits = launch_check_orders(q, k, v, grad_out, cotangents, HALF_SCALE, True)
    assert (visits == 1).all()
    assert_half_orders(got, q, k, v, grad_out, cotangents)


@requires_cpp
@pytest.mark.parametrize("present", [(True, False, False), (False, True, False), (False, False, True),
                                     (False, False, False)], ids=["gQ", "gK", "gV", "none"])
def test_cuda_launch_check_absent_cotangents(present):
    q, k, v, grad_out, cotangents = inputs(2, 19, 23, 6, 5, torch.float64, seed=3)
    cotangents = tuple(c if p else None for c, p in zip(cotangents, present))
    got, visits = launch_check_orders(q, k, v, grad_out, cotangents, 0.5, True)
    assert (visits == 1).all()
    assert_orders_close(got[2:], reference_orders(q, k, v, grad_out, cotangents, 0.5, True)[2:], torch.float64)


@requires_cpp
@pytest.mark.parametrize("shape", [(2, 4, 0, 3, 5), (2, 0, 6, 3, 5)], ids=["S0", "L0"])
def test_cuda_launch_check_empty(shape):
    """S = 0: out = 0, lse = −inf, every row's outputs written once; L = 0: no launch, zero
    key gradients."""
    q, k, v, grad_out, cotangents = inputs(*shape, torch.float64)
    got, visits = launch_check_orders(q, k, v, grad_out, cotangents, 0.5, True)
    if shape[1] > 0:
        assert (visits == 1).all()
        assert (got[0][1] == -math.inf).all() and (got[0][0] == 0).all()
    else:
        assert (visits == 0).all()
    assert_orders_close(got, reference_orders(q, k, v, grad_out, cotangents, 0.5, True), torch.float64)


@requires_cpp
def test_cuda_launch_check_rejects_bad_shapes():
    q, k, v, grad_out, _ = inputs(1, 4, 5, 3, 2, torch.float64)
    with pytest.raises(RuntimeError, match="value must be"):
        launch_check_orders(q, k, v[:, :4], grad_out, (None,) * 3, 0.5, False)
    with pytest.raises(RuntimeError, match="grad_grad_key must have shape"):
        launch_check_orders(q, k, v, grad_out, (None, k[:, :2], None), 0.5, False)


@requires_cpp
def test_cuda_launch_check_special_scores():
    q, k, v = special_rows()
    (forward, _, _), _ = launch_check_orders(q, k, v, torch.zeros(1, 5, 3, dtype=torch.float64), (None,) * 3, 0.5,
                                             False)
    assert_special_forward(*forward, q, k, v)
