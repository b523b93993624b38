"""Tests of ganops.scaled_dot_product_attention: values, gradients and double-backward
gradients against softmax(scale · Q Kᵀ) V written here in float64, gradcheck and
gradgradcheck, low precision, agreement with torch.nn.functional.scaled_dot_product_attention
(math backend) on every argument including the ones that fall back, R1 through a small
attention critic, errors, empty sizes, and that the fused path never keeps an L × S tensor.

The contract suite (tests/test_contract.py) covers opcheck, fakes, agreement of the registered
ops with the package's reference, torch.compile, determinism across thread counts and integer
tensors.
"""

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import ganops
from conftest import assert_within_reference_error, backend_params

HAS_TRITON_KERNELS = importlib.util.find_spec("ganops.triton_kernels.scaled_dot_product_attention") is not None


def _backends(devices=("cpu", "cuda")):
    """backend_params, with the Triton backend skipped where its attention kernels are not
    part of this tree (they come with the GPU kernels' branch)."""
    params = []
    for p in backend_params(devices):
        if p.values[1] == "triton" and not HAS_TRITON_KERNELS and not p.marks:
            p = pytest.param(*p.values, id=p.id, marks=[pytest.mark.skip(
                reason="ganops.triton_kernels.scaled_dot_product_attention is not in this tree")])
        params.append(p)
    return params


BACKENDS = _backends()
CPU_BACKENDS = _backends(("cpu",))
HAS_CPP = ganops._backend.unavailable_reason("cpp", "cpu") is None
requires_cpp = pytest.mark.skipif(not HAS_CPP, reason="the compiled extension is not built")


# ---------------------------------------------------------------------------------------
# The reference, written out here
# ---------------------------------------------------------------------------------------

def math_attention(q, k, v, scale=None, is_causal=False, dtype=torch.float64):
    """softmax(scale · Q Kᵀ, causal keys j ≤ i) V, in ``dtype``; autograd gives every order."""
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q.to(dtype) @ k.to(dtype).transpose(-2, -1)) * scale
    if is_causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril(), -math.inf)
    return torch.softmax(s, -1) @ v.to(dtype)


def torch_math(*args, **kwargs):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(*args, **kwargs)


def randn(*shape, dtype=torch.float64, device="cpu"):
    return torch.randn(shape, dtype=dtype, device=device, requires_grad=True)


def first_and_second_order(fn, q, k, v, seed=0):
    """(out, (dq, dk, dv), (d²/d(dO, q, k, v) of <g, (dq, dk, dv)>)) of fn(q, k, v) with random
    cotangents, the same for every fn."""
    gen = torch.Generator().manual_seed(seed)
    out = fn(q, k, v)
    grad_out = torch.randn(out.shape, generator=gen, dtype=out.dtype).to(out.device).requires_grad_()
    grads = torch.autograd.grad(out, (q, k, v), grad_out, create_graph=True)
    cot = [torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device) for t in (q, k, v)]
    second = torch.autograd.grad(grads, (grad_out, q, k, v), cot)
    return out, grads, second


def max_error(got, want):
    return max((a.double() - b.double()).abs().max().item() for a, b in zip(got, want))


# (q, k, v, scale, is_causal) shapes: causal with L < S and L > S, E ≠ Ev, a tile and its
# tail each way (the CPU kernels' tiles are 128 × 128), heads and a batch.
CASES = [
    ((2, 5, 8), (2, 7, 8), (2, 7, 6), 0.3, True),
    ((1, 9, 4), (1, 5, 4), (1, 5, 3), None, True),
    ((2, 3, 130, 8), (2, 3, 140, 8), (2, 3, 140, 5), None, False),
    ((1, 140, 8), (1, 133, 8), (1, 133, 8), 0.2, True),
]


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_every_order_matches_the_float64_formula(device, backend, case):
    """Values, gradients and double-backward gradients; the worst error of each order, for
    the record, is asserted at 1e-12 relative to the largest value."""
    qs, ks, vs, scale, causal = CASES[case]
    torch.manual_seed(case)
    q, k, v = randn(*qs, device=device), randn(*ks, device=device), randn(*vs, device=device)
    ours = first_and_second_order(
        lambda q, k, v: ganops.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                                            backend=backend), q, k, v)
    want = first_and_second_order(lambda q, k, v: math_attention(q, k, v, scale, causal), q, k, v)
    for order, (a, b) in enumerate(zip(ours, want)):
        a, b = (a,) if order == 0 else a, (b,) if order == 0 else b
        size = max(t.abs().max().item() for t in b)
        assert max_error(a, b) <= 1e-12 * max(size, 1), f"order {order}"


@pytest.mark.parametrize("device,backend", CPU_BACKENDS)
def test_gradcheck_and_gradgradcheck(device, backend):
    torch.manual_seed(1)
    for causal in (False, True):
        q, k, v = randn(2, 4, 3), randn(2, 5, 3), randn(2, 5, 2)

        def f(q, k, v):
            return ganops.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=0.7, backend=backend)
        assert torch.autograd.gradcheck(f, (q, k, v), fast_mode=True)
        assert torch.autograd.gradgradcheck(f, (q, k, v), fast_mode=True)


@requires_cpp
def test_third_order_goes_through_the_reference():
    """The double backward's own backward is autograd through the reference: a third
    derivative agrees with the float64 formula's."""
    torch.manual_seed(2)
    q, k, v = randn(1, 4, 3), randn(1, 6, 3), randn(1, 6, 2)

    def third(fn):
        (g,) = torch.autograd.grad(fn(q, k, v).square().sum(), q, create_graph=True)
        (gg,) = torch.autograd.grad(g.square().sum(), k, create_graph=True)
        return torch.autograd.grad(gg.sin().sum(), (q, k, v))
    got = third(lambda q, k, v: ganops.scaled_dot_product_attention(q, k, v, is_causal=True, backend="cpp"))
    want = third(lambda q, k, v: math_attention(q, k, v, is_causal=True))
    assert max_error(got, want) < 1e-11


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_types_within_twice_the_references_error(device, backend, dtype):
    """Values and gradients against float64: at most twice the error of the same formula run
    in the low precision (flash-attention's rule)."""
    torch.manual_seed(3)
    shapes = [(2, 2, 70, 16), (2, 2, 150, 16), (2, 2, 150, 12)]
    base = [torch.randn(s, dtype=dtype, device=device) for s in shapes]
    grad_out = torch.randn(2, 2, 70, 12, dtype=dtype, device=device)

    def run(fn, dtype):
        q, k, v = (t.detach().to(dtype).requires_grad_() for t in base)
        out = fn(q, k, v)
        return (out, *torch.autograd.grad(out, (q, k, v), grad_out.to(dtype)))
    ours = run(lambda q, k, v: ganops.scaled_dot_product_attention(q, k, v, is_causal=True, backend=backend), dtype)
    low = run(lambda q, k, v: math_attention(q, k, v, is_causal=True, dtype=dtype), dtype)
    exact = run(lambda q, k, v: math_attention(q, k, v, is_causal=True), torch.float64)
    for a, lo, ex in zip(ours, low, exact):
        assert a.dtype == dtype
        assert_within_reference_error(a, lo, ex, dtype)


# ---------------------------------------------------------------------------------------
# Against torch.nn.functional.scaled_dot_product_attention (math backend)
# ---------------------------------------------------------------------------------------

def _against_torch(q, k, v, backend, **kwargs):
    """Values and first-order gradients of ours and torch's math backend, same arguments."""
    results = []
    for fn in (lambda *a: ganops.scaled_dot_product_attention(*a, **kwargs, backend=backend),
               lambda *a: torch_math(*a, **kwargs)):
        torch.manual_seed(7)  # dropout draws the same mask
        out = fn(q, k, v)
        results.append((out, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out) + out.detach())))
    return results


@pytest.mark.parametrize("device,backend", CPU_BACKENDS)
@pytest.mark.parametrize("kwargs,shapes", [
    (dict(), [(2, 3, 6, 8), (2, 3, 9, 8), (2, 3, 9, 5)]),
    (dict(is_causal=True, scale=0.5), [(2, 7, 4), (2, 5, 4), (2, 5, 6)]),
    (dict(is_causal=True), [(3, 5), (7, 5), (7, 2)]),
    (dict(), [(2, 1, 6, 8), (1, 3, 9, 8), (3, 9, 5)]),
    (dict(enable_gqa=True), [(2, 4, 6, 8), (2, 4, 9, 8), (2, 4, 9, 5)]),
    (dict(enable_gqa=True), [(2, 4, 6, 8), (2, 2, 9, 8), (2, 2, 9, 5)]),
    (dict(dropout_p=0.3), [(2, 6, 8), (2, 9, 8), (2, 9, 5)]),
], ids=["heads", "causal-scale", "2-D", "broadcast-batch", "gqa-equal-heads", "gqa", "dropout"])
def test_matches_torch_math_backend(device, backend, kwargs, shapes):
    torch.manual_seed(4)
    q, k, v = (randn(*s) for s in shapes)
    ours, theirs = _against_torch(q, k, v, backend, **kwargs)
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device,backend", CPU_BACKENDS)
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float64], ids=str)
def test_attn_mask_falls_back_and_matches_torch(device, backend, mask_dtype):
    torch.manual_seed(5)
    q, k, v = randn(2, 2, 5, 4), randn(2, 2, 6, 4), randn(2, 2, 6, 3)
    mask = torch.rand(2, 1, 5, 6) > 0.3 if mask_dtype == torch.bool else torch.randn(5, 6, dtype=mask_dtype)
    if mask_dtype == torch.bool:
        mask[..., 0] = True  # every query sees a key
    ours, theirs = _against_torch(q, k, v, backend, attn_mask=mask)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------
# R1 through an attention critic
# ---------------------------------------------------------------------------------------

class AttentionCritic(torch.nn.Module):
    """LeakyReLU MLP → multi-head self-attention (residual) → LeakyReLU MLP → score."""

    def __init__(self, features=16, heads=2, attention=torch_math):
        super().__init__()
        self.heads, self.attention = heads, attention
        self.inp = torch.nn.Linear(features, features)
        self.qkv = torch.nn.Linear(features, 3 * features)
        self.proj = torch.nn.Linear(features, features)
        self.out = torch.nn.Linear(features, 1)

    def forward(self, x):
        n, t, c = x.shape
        h = F.leaky_relu(self.inp(x), 0.2)
        q, k, v = self.qkv(h).reshape(n, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = self.attention(q, k, v).transpose(1, 2).reshape(n, t, c)
        h = h + self.proj(a)
        return self.out(F.leaky_relu(h, 0.2)).mean(dim=(1, 2))


def r1_parameter_grads(critic, x):
    x = x.detach().requires_grad_()
    (g,) = torch.autograd.grad(critic(x).sum(), x, create_graph=True)
    r1 = g.square().sum(dim=(1, 2)).mean()
    return r1, torch.autograd.grad(r1, list(critic.parameters()), allow_unused=True, materialize_grads=True)


@pytest.mark.parametrize("device,backend", CPU_BACKENDS)
def test_r1_through_an_attention_critic_equals_torch_math(device, backend):
    torch.manual_seed(6)
    critic = AttentionCritic().double()
    x = torch.randn(3, 20, 16, dtype=torch.float64)
    want = r1_parameter_grads(critic, x)
    critic.attention = lambda q, k, v: ganops.scaled_dot_product_attention(q, k, v, backend=backend)
    got = r1_parameter_grads(critic, x)
    torch.testing.assert_close(got[0], want[0], rtol=1e-11, atol=0)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@requires_cpp
def test_fused_r1_keeps_no_tensor_of_size_t_by_t():
    """Every tensor autograd saves in an R1 step through the fused op (both backward passes)
    is O(T), while torch's math backend saves T × T attention matrices."""
    t = 256

    def largest_saved(attention):
        torch.manual_seed(8)
        critic = AttentionCritic(attention=attention)
        sizes = []

        def pack(saved):
            sizes.append(saved.numel())
            return saved
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda saved: saved):
            r1_parameter_grads(critic, torch.randn(1, t, 16))
        return max(sizes)
    assert largest_saved(lambda q, k, v: ganops.scaled_dot_product_attention(q, k, v, backend="cpp")) < t * t
    assert largest_saved(torch_math) >= t * t  # the check can see a T × T tensor


# ---------------------------------------------------------------------------------------
# Errors and empty sizes
# ---------------------------------------------------------------------------------------

def _bad_calls():
    q, k, v = torch.randn(2, 4, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 6)
    return [
        ("key", (q, k.double(), v), {}),
        ("query", (q.long(), k.long(), v.long()), {}),
        ("query", (torch.randn(8), k, v), {}),
        ("key", (q, torch.randn(2, 5, 7), v), {}),
        ("value", (q, k, torch.randn(2, 6, 6)), {}),
        ("batch", (q, torch.randn(3, 5, 8), torch.randn(3, 5, 6)), {}),
        ("attn_mask", (q, k, v), dict(attn_mask=torch.ones(4, 5, dtype=torch.bool), is_causal=True)),
        ("attn_mask", (q, k, v), dict(attn_mask=torch.ones(4, 6))),
        ("attn_mask", (q, k, v), dict(attn_mask=torch.ones(4, 5, dtype=torch.long))),
        ("dropout_p", (q, k, v), dict(dropout_p=1.5)),
        ("scale", (q, k, v), dict(scale="a")),
        ("heads", (torch.randn(2, 3, 4, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 6)), dict(enable_gqa=True)),
    ]


@pytest.mark.parametrize("index", range(len(_bad_calls())))
def test_bad_input_raises_torchs_exception_type_naming_the_argument(index):
    name, args, kwargs = _bad_calls()[index]
    with pytest.raises(Exception) as theirs:
        F.scaled_dot_product_attention(*args, **kwargs)
    with pytest.raises(theirs.type, match=name):
        ganops.scaled_dot_product_attention(*args, **kwargs)


@pytest.mark.parametrize("device,backend", CPU_BACKENDS)
@pytest.mark.parametrize("shapes", [
    [(0, 4, 8), (0, 5, 8), (0, 5, 6)],
    [(2, 0, 8), (2, 5, 8), (2, 5, 6)],
    [(2, 4, 8), (2, 0, 8), (2, 0, 6)],
    [(2, 4, 0), (2, 5, 0), (2, 5, 6)],
], ids=["B=0", "L=0", "S=0", "E=0"])
def test_empty_sizes_match_torch_math(device, backend, shapes):
    """S = 0 gives 0 (softmax over nothing, then an empty product); E = 0 gives the mean of
    the values (every score 0), as torch's math path does; gradients too."""
    q, k, v = (randn(*s) for s in shapes)
    for causal in (False, True):
        results = []
        for fn in (lambda: ganops.scaled_dot_product_attention(q, k, v, is_causal=causal, backend=backend),
                   lambda: torch_math(q, k, v, is_causal=causal)):
            out = fn()
            results.append((out, *torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True,
                                                       materialize_grads=True)))
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@requires_cpp
def test_cpu_kernels_are_bit_identical_across_thread_counts_over_many_tiles():
    """Every order through the C++ kernels, on shapes of several row and key tiles (the
    contract suite's examples fit in one), gives the same bits on 1, 2 and 3 threads."""
    torch.manual_seed(9)
    q, k, v = randn(3, 300, 16, dtype=torch.float32), randn(3, 700, 16, dtype=torch.float32), \
        randn(3, 700, 8, dtype=torch.float32)
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            out, grads, second = first_and_second_order(
                lambda q, k, v: ganops.scaled_dot_product_attention(q, k, v, is_causal=True, backend="cpp"), q, k, v)
            runs.append([out, *grads, *second])
    finally:
        torch.set_num_threads(before)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)
