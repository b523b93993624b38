"""Global gradient-norm clipping: every backend against torch.nn.utils and a float64 truth."""

import math
import warnings

import pytest
import torch

import ganops
from ganops import _ext
from ganops.ops import clip_grad_norm as hub
from conftest import assert_within_reference_error, backend_params, requires_cuda, tol

NORM_TYPES = [1.0, 2.0, 3.5, math.inf]


def make_params(shapes, device="cpu", dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        dt = dtype[len(params) % len(dtype)] if isinstance(dtype, (list, tuple)) else dtype
        p = torch.nn.Parameter(torch.zeros(shape, dtype=dt, device=device))
        p.grad = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(device, dt)
        params.append(p)
    return params


def exact_norm(grads, norm_type):
    """Independent float64 truth: the norm of all gradients concatenated into one vector."""
    flat = torch.cat([g.detach().double().reshape(-1).cpu() for g in grads]) if grads else torch.zeros(0)
    if flat.numel() == 0:
        return torch.tensor(0.0, dtype=torch.float64)
    if norm_type == math.inf:
        return flat.abs().max()
    return flat.abs().pow(norm_type).sum().pow(1.0 / norm_type)


def expected_coef(total, max_norm):
    return min(max_norm / (float(total) + 1e-6), 1.0)


# ---------------------------------------------------------------------------------------
# Values: every backend, norm type and dtype
# ---------------------------------------------------------------------------------------

SHAPES = [(7,), (33, 5), (0,), (3, 4, 5), (40000,)]  # 40000: three chunks, the last partial


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_torch_and_float64(device, backend, norm_type, dtype):
    params = make_params(SHAPES, device, dtype)
    ours_params = make_params(SHAPES, device, dtype)
    originals = [p.grad.clone() for p in params]
    # torch refuses the infinity norm of an empty tensor; ganops counts it as 0.
    torch_params = [p for p in params if p.numel() > 0 or norm_type != math.inf]
    ref_total = torch.nn.utils.clip_grad_norm_(torch_params, 1.0, norm_type)
    total = ganops.clip_grad_norm_(ours_params, 1.0, norm_type, backend=backend)
    assert total.dtype == dtype and total.dim() == 0 and total.device.type == device
    truth = exact_norm(originals, norm_type)
    torch.testing.assert_close(total.double().cpu(), truth, **tol(dtype))
    torch.testing.assert_close(total, ref_total, **tol(dtype))
    coef = expected_coef(truth, 1.0)
    for p, ref_p, orig in zip(ours_params, params, originals):
        torch.testing.assert_close(p.grad.double().cpu(), orig.double().cpu() * coef, **tol(dtype))
        torch.testing.assert_close(p.grad, ref_p.grad, **tol(dtype))


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_half_types_accumulate_in_float32(device, backend, dtype, norm_type):
    params = make_params(SHAPES, device, dtype)
    originals = [p.grad.clone() for p in params]
    total = ganops.clip_grad_norm_(params, 1.0, norm_type, backend=backend)
    assert total.dtype == torch.float32
    truth = exact_norm(originals, norm_type)
    # Inputs are exactly representable; float32 accumulation leaves ~1e-6 relative error.
    torch.testing.assert_close(total.double().cpu(), truth, rtol=1e-5, atol=0)
    coef = expected_coef(truth, 1.0)
    for p, orig in zip(params, originals):
        expect = (orig.double() * coef).to(dtype)
        # One rounding to the half type from the float32 product: at most one ulp apart.
        torch.testing.assert_close(p.grad, expect, **tol(dtype))


@pytest.mark.parametrize("device,backend", backend_params())
def test_float16_norm_past_65504_stays_finite(device, backend):
    # 4096 elements of 2000: the norm is 128000, past float16's largest value.
    grads = [torch.full((4096,), 2000.0, dtype=torch.float16, device=device)]
    torch_total = torch.nn.utils.get_total_norm(grads)
    assert torch_total.isinf(), "torch's float16 norm was expected to overflow here"
    total = ganops.get_total_norm(grads, backend=backend)
    assert total.dtype == torch.float32
    torch.testing.assert_close(total.cpu(), torch.tensor(128000.0), rtol=1e-6, atol=0)


@pytest.mark.parametrize("device,backend", backend_params())
def test_mixed_dtypes_in_one_call(device, backend):
    params = make_params([(5,), (300,), (17, 3), (2, 2)], device,
                         [torch.float32, torch.float16, torch.bfloat16, torch.float64])
    originals = [p.grad.clone() for p in params]
    total = ganops.clip_grad_norm_(params, 0.5, backend=backend)
    assert total.dtype == torch.float64  # one float64 gradient makes the result float64
    truth = exact_norm(originals, 2.0)
    torch.testing.assert_close(total.cpu(), truth, rtol=1e-6, atol=0)
    coef = expected_coef(truth, 0.5)
    for p, orig in zip(params, originals):
        # The float32-accumulated parts make the coefficient float32-accurate, also for the
        # float64 gradient.
        expect = (orig.double() * coef).to(p.grad.dtype)
        torch.testing.assert_close(p.grad, expect, **tol(max(p.grad.dtype, torch.float32, key=lambda d: tol(d)["rtol"])))


@pytest.mark.parametrize("device,backend", backend_params())
def test_many_tensors(device, backend):
    count = 2000 if backend != "triton" or device == "cuda" else 300  # interpreter: one program per tensor
    params = make_params([(64,)] * (count - 1) + [(1,)], device)
    originals = [p.grad.clone() for p in params]
    total = ganops.clip_grad_norm_(params, 1.0, backend=backend)
    truth = exact_norm(originals, 2.0)
    torch.testing.assert_close(total.double().cpu(), truth, **tol(torch.float32))
    coef = expected_coef(truth, 1.0)
    for p, orig in zip(params, originals):
        torch.testing.assert_close(p.grad, orig * coef, **tol(torch.float32))


@pytest.mark.parametrize("device,backend", backend_params())
def test_large_and_noncontiguous_grads(device, backend):
    big = (1 << 20) + 3 if backend != "triton" else (1 << 16) + 3
    p_big = torch.nn.Parameter(torch.zeros(big, device=device))
    p_big.grad = torch.randn(big, device=device)
    p_t = torch.nn.Parameter(torch.zeros(9, 13, device=device))
    p_t.grad = torch.randn(13, 9, device=device).t()  # a transposed view
    p_s = torch.nn.Parameter(torch.zeros(50, device=device))
    p_s.grad = torch.randn(100, device=device)[::2]  # strided
    params = [p_big, p_t, p_s]
    assert not p_t.grad.is_contiguous() and not p_s.grad.is_contiguous()
    originals = [p.grad.clone() for p in params]
    total = ganops.clip_grad_norm_(params, 2.0, backend=backend)
    truth = exact_norm(originals, 2.0)
    # Over a million float32 terms torch's own sum drifts ~1e-5 from the float64 truth:
    # hold every backend to twice torch's error (or the float32 tolerance, if larger).
    assert_within_reference_error(total.cpu(), torch.nn.utils.get_total_norm(originals).cpu(), truth,
                                  torch.float32)
    coef = expected_coef(truth, 2.0)
    for p, orig in zip(params, originals):
        torch.testing.assert_close(p.grad, orig * coef, **tol(torch.float32))
    assert not p_t.grad.is_contiguous(), "the gradient views must be scaled in place"


@pytest.mark.parametrize("device,backend", backend_params())
def test_one_tensor_and_no_clipping_needed(device, backend):
    p = make_params([(10,)], device, scale=1e-3)[0]
    orig = p.grad.clone()
    total = ganops.clip_grad_norm_(p, 100.0, backend=backend)  # a single Tensor, not a list
    torch.testing.assert_close(total.double().cpu(), exact_norm([orig], 2.0), **tol(torch.float32))
    assert torch.equal(p.grad, orig), "a coefficient of 1 must leave the gradients unchanged"


def test_empty_parameter_sets():
    assert torch.equal(ganops.clip_grad_norm_([], 1.0), torch.tensor(0.0))
    no_grad = torch.nn.Parameter(torch.ones(3))
    assert torch.equal(ganops.clip_grad_norm_([no_grad], 1.0), torch.tensor(0.0))
    assert torch.equal(ganops.get_total_norm([]), torch.tensor(0.0))
    assert ganops.grad_norm(iter([])).item() == 0.0


def test_parameters_without_grad_are_skipped():
    params = make_params([(4,), (6,)])
    params.insert(1, torch.nn.Parameter(torch.ones(5)))
    expected = torch.nn.utils.get_total_norm([params[0].grad, params[2].grad])
    total = ganops.clip_grad_norm_(params, 1.0)
    assert params[1].grad is None
    torch.testing.assert_close(total, expected)


# ---------------------------------------------------------------------------------------
# Non-finite gradients
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_nonfinite_grads_like_torch(device, backend, bad, norm_type):
    params, ref = make_params([(5,), (8,)], device), make_params([(5,), (8,)], device)
    for ps in (params, ref):
        ps[1].grad[3] = bad
    ref_total = torch.nn.utils.clip_grad_norm_(ref, 1.0, norm_type)
    total = ganops.clip_grad_norm_(params, 1.0, norm_type, backend=backend)
    torch.testing.assert_close(total, ref_total, equal_nan=True)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.grad, r.grad, equal_nan=True)
    with pytest.raises(RuntimeError, match="non-finite"):
        ganops.clip_grad_norm_(make_params([(3,)], device), 1.0, norm_type, error_if_nonfinite=True,
                               backend=backend) if False else None
        p = make_params([(3,)], device)
        p[0].grad[0] = bad
        ganops.clip_grad_norm_(p, 1.0, norm_type, error_if_nonfinite=True, backend=backend)


def test_error_if_nonfinite_leaves_grads_untouched():
    p = make_params([(4,)])
    p[0].grad[1] = math.nan
    before = p[0].grad.clone()
    with pytest.raises(RuntimeError, match="non-finite"):
        ganops.clip_grad_norm_(p, 1.0, error_if_nonfinite=True)
    assert torch.equal(p[0].grad.isnan(), before.isnan())
    assert torch.equal(p[0].grad.nan_to_num(), before.nan_to_num())


# ---------------------------------------------------------------------------------------
# The rest of the API: get_total_norm, clip_grads_with_norm_, grad_norm
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("device,backend", backend_params())
def test_get_total_norm_and_clip_grads_with_norm(device, backend):
    params, ref = make_params(SHAPES, device), make_params(SHAPES, device)
    grads, ref_grads = [p.grad for p in params], [p.grad for p in ref]
    total = ganops.get_total_norm(grads, 3.5, backend=backend)
    ref_total = torch.nn.utils.get_total_norm(ref_grads, 3.5)
    torch.testing.assert_close(total, ref_total, **tol(torch.float32))
    ganops.clip_grads_with_norm_(params, 0.7, total, backend=backend)
    torch.nn.utils.clip_grads_with_norm_(ref, 0.7, ref_total)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.grad, r.grad, **tol(torch.float32))


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_grad_norm_per_tensor(device, backend, norm_type):
    params = make_params(SHAPES, device)
    params.insert(2, torch.nn.Parameter(torch.ones(3, device=device)))  # no grad: skipped
    before = [p.grad.clone() if p.grad is not None else None for p in params]
    total, per = ganops.grad_norm(params, norm_type, per_tensor=True, backend=backend)
    with_grad = [p for p in params if p.grad is not None]
    assert per.shape == (len(with_grad),)
    for k, p in enumerate(with_grad):
        torch.testing.assert_close(per[k].double().cpu(), exact_norm([p.grad], norm_type), **tol(torch.float32))
    torch.testing.assert_close(total.double().cpu(), exact_norm([p.grad for p in with_grad], norm_type),
                               **tol(torch.float32))
    for p, b in zip(params, before):
        assert (p.grad is None and b is None) or torch.equal(p.grad, b), "grad_norm must not modify grads"
    assert ganops.grad_norm(params, norm_type, backend=backend).dim() == 0


@requires_cuda
def test_grads_on_two_devices():
    cpu = make_params([(10,), (3, 3)], "cpu")
    gpu = make_params([(20,)], "cuda", seed=1)
    params = cpu + gpu
    originals = [p.grad.clone().cpu() for p in params]
    total, per = ganops.grad_norm(params, per_tensor=True)
    assert total.device.type == "cpu" and per.device.type == "cpu"
    for k, orig in enumerate(originals):
        torch.testing.assert_close(per[k].double(), exact_norm([orig], 2.0), **tol(torch.float32))
    total = ganops.clip_grad_norm_(params, 1.0)
    truth = exact_norm(originals, 2.0)
    torch.testing.assert_close(total.double(), truth, **tol(torch.float32))
    for p, orig in zip(params, originals):
        torch.testing.assert_close(p.grad.cpu(), orig * expected_coef(truth, 1.0), **tol(torch.float32))


@requires_cuda
@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_no_host_sync_on_cuda(backend):
    params = make_params([(1000,), (5, 5)], "cuda")
    ganops.clip_grad_norm_(params, 1.0, backend=backend)  # warm up (table staging, compilation)
    torch.cuda.set_sync_debug_mode("error")
    try:
        ganops.clip_grad_norm_(params, 1.0, backend=backend)
        ganops.grad_norm(params, per_tensor=True, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------

def test_bad_arguments_raise_clear_errors():
    params = make_params([(3,)])
    with pytest.raises(ValueError, match="max_norm"):
        ganops.clip_grad_norm_(params, -1.0)
    with pytest.raises(ValueError, match="max_norm"):
        ganops.clip_grad_norm_(params, math.nan)
    for bad in (0, -2.0, -math.inf, math.nan):
        with pytest.raises(ValueError, match="norm_type"):
            ganops.clip_grad_norm_(params, 1.0, norm_type=bad)
    with pytest.raises(TypeError, match="norm_type"):
        ganops.get_total_norm([params[0].grad], norm_type="two")
    with pytest.raises(TypeError, match=r"parameters\[1\]"):
        ganops.clip_grad_norm_([params[0], "weight"], 1.0)
    with pytest.raises(TypeError, match="parameters"):
        ganops.clip_grad_norm_(3.0, 1.0)
    with pytest.raises(TypeError, match=r"tensors\[0\].*int64"):
        ganops.get_total_norm([torch.arange(3)])
    with pytest.raises(TypeError, match="total_norm"):
        ganops.clip_grads_with_norm_(params, 1.0, 2.0)
    sparse = torch.nn.Parameter(torch.zeros(4))
    sparse.grad = torch.zeros(4).to_sparse()
    with pytest.raises(TypeError, match="dense"):
        ganops.clip_grad_norm_([sparse], 1.0)
    # 'inf' as a string is accepted, as torch accepts it.
    assert ganops.get_total_norm([torch.tensor([3.0, -4.0])], "inf").item() == 4.0


# ---------------------------------------------------------------------------------------
# The CUDA index math on the CPU; the public functions under torch.compile
# ---------------------------------------------------------------------------------------

@pytest.mark.skipif(not _ext.load(), reason="the compiled extension is not built")
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_cuda_launch_covers_every_element_once(norm_type):
    tensors = [torch.randn(s, dtype=dt) for s, dt in [
        ((40000,), torch.float32), ((0,), torch.float32), ((16384,), torch.float16),
        ((16385,), torch.float64), ((1,), torch.bfloat16), ((513,), torch.float32), ((70000,), torch.float16)]]
    coverage, partial_reads, sum_reads, per, total = torch.ops.ganops._multi_tensor_norm_cuda_launch_check(
        tensors, norm_type)
    assert coverage.numel() == sum(t.numel() for t in tensors)
    assert coverage.min().item() == 1 and coverage.max().item() == 1, "an element was skipped or visited twice"
    # The finish reads each chunk's partial once, then each tensor's sum once.
    assert partial_reads.numel() == sum(-(-t.numel() // 16384) for t in tensors)
    assert partial_reads.eq(1).all() and sum_reads.numel() == len(tensors) and sum_reads.eq(1).all()
    for k, t in enumerate(tensors):
        torch.testing.assert_close(per[k], exact_norm([t], norm_type), rtol=1e-6, atol=0)
    torch.testing.assert_close(total, exact_norm(tensors, norm_type), rtol=1e-6, atol=0)


@pytest.mark.skipif(not _ext.load(), reason="the compiled extension is not built")
def test_cuda_finish_splits_a_long_tensor_and_many_tensors_over_threads():
    # 513 chunks in one tensor (past the finish block's 512 threads, so a thread takes two)
    # and 520 tensors (a thread of the total's block takes two): every partial and every
    # tensor sum is read once, and the norms are right.
    tensors = [torch.randn(513 * 16384 - 5, dtype=torch.float16)] + [torch.randn(3) for _ in range(519)]
    coverage, partial_reads, sum_reads, per, total = torch.ops.ganops._multi_tensor_norm_cuda_launch_check(
        tensors, 2.0)
    assert partial_reads.numel() == 513 + 519 and partial_reads.eq(1).all()
    assert sum_reads.numel() == 520 and sum_reads.eq(1).all()
    torch.testing.assert_close(per[0].double(), exact_norm(tensors[:1], 2.0), rtol=1e-6, atol=0)
    torch.testing.assert_close(total.double(), exact_norm(tensors, 2.0), rtol=1e-6, atol=0)


def test_triton_finish_splits_a_long_tensor_over_lanes():
    """The Triton finish kernels on a table of one tensor with more chunks than lanes and
    more tensors than lanes: each tensor's sum and the total come out of a fixed-order
    combination, the same bits on every run."""
    if ganops._backend.unavailable_reason("triton", "cpu"):
        pytest.skip(ganops._backend.unavailable_reason("triton", "cpu"))
    from ganops.triton_kernels import clip_grad_norm as kernels

    chunks = [3 * kernels.FINISH_BLOCK + 7] + [1] * (kernels.FINISH_BLOCK + 3)
    n = len(chunks)
    first = [sum(chunks[:k]) for k in range(n)]
    table = torch.tensor([0] * n + first + chunks, dtype=torch.int64)
    partials = torch.rand(sum(chunks), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    results = []
    for _ in range(2):
        sums, per, total = torch.empty(n, dtype=torch.float64), torch.empty(n, dtype=torch.float64), torch.empty(
            (), dtype=torch.float64)
        inv_p = kernels._bits(0.5, torch.float64)
        kernels._tensor_finish_kernel[(n,)](table, n, partials, sums, per, inv_p, KIND=kernels.L2, PER_TENSOR=True,
                                            BLOCK=kernels.FINISH_BLOCK)
        kernels._total_finish_kernel[(1,)](sums, n, total, total, inv_p, 0, KIND=kernels.L2, CLIP=False,
                                           BLOCK=kernels.FINISH_BLOCK)
        results.append((sums, per, total))
    exact = [partials[f:f + c].sum() for f, c in zip(first, chunks)]
    torch.testing.assert_close(results[0][0], torch.stack(exact), rtol=1e-12, atol=0)
    torch.testing.assert_close(results[0][1], torch.stack(exact).sqrt(), rtol=1e-12, atol=0)
    torch.testing.assert_close(results[0][2], partials.sum().sqrt(), rtol=1e-12, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(results[0], results[1])), "the finish must be deterministic"


@pytest.mark.parametrize("device,backend", [p for p in backend_params() if p.values[1] != "torch"])
def test_torch_compile_fullgraph(device, backend):
    torch._dynamo.reset()
    params = make_params([(6,), (4, 5)], device)
    ref = make_params([(6,), (4, 5)], device)

    @torch.compile(fullgraph=True, backend="aot_eager" if device == "cpu" and backend == "triton" else "inductor")
    def step(ps):
        total, per = ganops.grad_norm(ps, per_tensor=True, backend=backend)
        clipped = ganops.clip_grad_norm_(ps, 0.5, backend=backend)
        ganops.clip_grad_value_(ps, 0.05, backend=backend)
        return total, per, clipped

    total, per, clipped = step(params)
    ref_total = torch.nn.utils.clip_grad_norm_(ref, 0.5)
    torch.nn.utils.clip_grad_value_(ref, 0.05)
    torch.testing.assert_close(total, ref_total)
    torch.testing.assert_close(clipped, ref_total)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.grad, r.grad)


# ---------------------------------------------------------------------------------------
# Edge arguments and special values, every backend against torch
# ---------------------------------------------------------------------------------------

TORCH_NONFINITE_MESSAGE = (r"The total norm of order {p} for gradients from `parameters` is non-finite, so "
                           r"it cannot be clipped\. To disable this error and scale the gradients by the "
                           r"non-finite norm anyway, set `error_if_nonfinite=False`")


def grads_of(params):
    return [p.grad for p in params]


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("max_norm", [math.inf, 1e300, 3.5e38, 1e38])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_max_norm_past_float32_range_gives_torch_numbers(device, backend, max_norm, dtype):
    # Past float32's range the Triton launcher once split max_norm into float32 halves,
    # and inf - inf made every gradient NaN. torch clamps the coefficient to 1.
    shapes = [(7,), (33, 5)]
    for fn in ("clip_grad_norm_", "get_total_norm+clip_grads_with_norm_"):
        params, ref = make_params(shapes, device, dtype, scale=50.0), make_params(shapes, device, dtype, scale=50.0)
        ref_total = torch.nn.utils.clip_grad_norm_(ref, max_norm)
        if fn == "clip_grad_norm_":
            total = ganops.clip_grad_norm_(params, max_norm, backend=backend)
        else:
            total = ganops.get_total_norm(grads_of(params), backend=backend)
            ganops.clip_grads_with_norm_(params, max_norm, total, backend=backend)
        assert torch.isfinite(total).all()
        torch.testing.assert_close(total.double(), ref_total.double(), **tol(dtype))
        for p, r in zip(params, ref):
            assert torch.equal(p.grad, r.grad), f"{fn}: max_norm={max_norm} must leave the gradients as they are"


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("norm_type", [0.5, 1.0, 2.0, 3.5, math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nan_and_inf_anywhere_reach_the_norm(device, backend, norm_type, dtype):
    # The Triton Lp term once masked with x > 0, which drops NaN: a NaN among finite values
    # gave a finite norm, and an all-NaN gradient a norm of 0.
    cases = {
        "one NaN": ([1.0, math.nan, 2.0], math.nan),
        "all NaN": ([math.nan] * 5, math.nan),
        "one inf": ([1.0, -math.inf, 2.0], math.inf),
        "NaN and inf": ([math.inf, math.nan], math.nan),
    }
    for name, (values, expected) in cases.items():
        g = torch.tensor(values, dtype=dtype, device=device)
        total = ganops.get_total_norm([torch.ones(3, dtype=dtype, device=device), g], norm_type, backend=backend)
        ref = torch.nn.utils.get_total_norm([torch.ones(3, dtype=dtype, device=device), g], norm_type)
        if math.isnan(expected):
            assert torch.isnan(total) and torch.isnan(ref), f"{name}, p={norm_type}: got {total}"
        else:
            assert total.item() == expected == ref.item(), f"{name}, p={norm_type}: got {total}"
        p = torch.nn.Parameter(torch.zeros(len(values), dtype=dtype, device=device))
        p.grad = g.clone()
        with pytest.raises(RuntimeError, match=TORCH_NONFINITE_MESSAGE.format(p=float(norm_type))):
            ganops.clip_grad_norm_([p], 1.0, norm_type, error_if_nonfinite=True, backend=backend)
        assert torch.equal(p.grad.nan_to_num(), g.nan_to_num()), "the gradients must be left untouched"


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("norm_type", [0.5, 3.5])
def test_lp_norm_float64_matches_an_exact_reference(device, backend, norm_type):
    g = torch.randn(5000, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).to(device)
    total = ganops.get_total_norm([g], norm_type, backend=backend)
    torch.testing.assert_close(total.cpu(), exact_norm([g], norm_type), **tol(torch.float64))


def test_triton_table_upload_for_cuda_graphs_carries_values_in_kernel_parameters(monkeypatch):
    """Under CUDA-graph capture the Triton launchers build their chunk table with upload
    kernels whose parameters carry the values: no host buffer a replay would read, nothing
    pinned inside the capture, nothing kept per captured call. Shown here on CPU tensors in
    the interpreter: every value arrives (pointers past 2^31, a count that is no multiple of
    a launch's share), and no host memory is pinned on the way."""
    if ganops._backend.unavailable_reason("triton", "cpu"):
        pytest.skip(ganops._backend.unavailable_reason("triton", "cpu"))
    from ganops.triton_kernels import clip_grad_norm as kernels

    def no_pinning(self, *args, **kwargs):
        raise AssertionError("pin_memory called while building a captured table")
    monkeypatch.setattr(torch.Tensor, "pin_memory", no_pinning)
    values = [0, 1, 16384, 2**31 - 1, 2**31, 2**47 + 12345, 3 * 2**40 + 7] + list(range(100, 130))
    table = kernels._uploaded(values, torch.device("cpu"))
    assert table.dtype == torch.int64 and table.tolist() == values
    assert not hasattr(kernels, "_CAPTURED_TABLES")


def test_triton_passes_p_and_max_norm_at_full_precision(monkeypatch):
    # Float arguments reach a compiled Triton kernel as float32: p = 2.3 would become
    # 2.29999995 and the float64 norm would be off by ~1e-8. The launchers send doubles as
    # their int64 bit patterns; check what they pass.
    pytest.importorskip("triton")
    import struct
    from ganops.triton_kernels import clip_grad_norm as kernels

    seen = {}

    class Recorder:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.setdefault(self.name, []).append(args)
                return self.kernel[grid](*args, **kwargs)
            return launch

    for name in ("_chunk_partial_kernel", "_tensor_finish_kernel", "_total_finish_kernel", "_coefficient_kernel"):
        monkeypatch.setattr(kernels, name, Recorder(name, getattr(kernels, name)))
    g = torch.randn(100, dtype=torch.float64)
    kernels.clip_grad_norm_([g], 0.123456789012345678, 2.3)

    def as_double(bits):
        assert isinstance(bits, int), f"a float argument would arrive as float32: {bits!r}"
        return struct.unpack("<d", struct.pack("<q", bits))[0]

    assert as_double(seen["_chunk_partial_kernel"][0][5]) == 2.3
    assert as_double(seen["_tensor_finish_kernel"][0][5]) == 1.0 / 2.3
    assert as_double(seen["_total_finish_kernel"][0][4]) == 1.0 / 2.3
    assert as_double(seen["_total_finish_kernel"][0][5]) == 0.123456789012345678
    kernels.multi_tensor_scale_([g], torch.tensor(1.0, dtype=torch.float64), 0.123456789012345678)
    assert as_double(seen["_coefficient_kernel"][0][2]) == 0.123456789012345678


# ---------------------------------------------------------------------------------------
# Argument errors: before any kernel runs, the same on every backend
# ---------------------------------------------------------------------------------------

def _bad_gradient_calls(backend):
    """(name, call, message) of calls that must raise TypeError and touch no gradient."""
    good = torch.nn.Parameter(torch.zeros(4))
    good.grad = torch.full((4,), 3.0)
    ints = torch.zeros(3, dtype=torch.int64)
    ints.grad = torch.arange(3)
    params = [good, ints]
    return params, [
        ("clip_grad_norm_", lambda: ganops.clip_grad_norm_(params, 1.0, backend=backend)),
        ("clip_grad_norm_ nonfinite", lambda: ganops.clip_grad_norm_(params, 1.0, error_if_nonfinite=True,
                                                                     backend=backend)),
        ("clip_grads_with_norm_", lambda: ganops.clip_grads_with_norm_(params, 1.0, torch.tensor(100.0),
                                                                       backend=backend)),
        ("clip_grad_value_", lambda: ganops.clip_grad_value_(params, 0.5, backend=backend)),
        ("grad_norm", lambda: ganops.grad_norm(params, backend=backend)),
    ]


@pytest.mark.parametrize("device,backend", backend_params(devices=("cpu",)))
def test_non_float_gradient_raises_the_same_error_everywhere(device, backend):
    # The fused Triton clip once skipped an int64 gradient and clipped the others.
    params, calls = _bad_gradient_calls(backend)
    for name, call in calls:
        with pytest.raises(TypeError, match=r"parameters' gradients\[1\] has dtype torch.int64; ganops supports "
                                            r"float16, bfloat16, float32 and float64 gradients"):
            call()
        assert torch.equal(params[0].grad, torch.full((4,), 3.0)), f"{name} touched a gradient before raising"
        assert torch.equal(params[1].grad, torch.arange(3))


def test_triton_launchers_check_every_tensor_before_launching():
    pytest.importorskip("triton")
    from ganops.triton_kernels import clip_grad_norm as kernels
    a = torch.full((4,), 3.0)
    with pytest.raises(RuntimeError, match="one device"):
        kernels.clip_grad_norm_([a, torch.ones(4, device="meta")], 1.0, 2.0)
    with pytest.raises(RuntimeError, match="float16, bfloat16, float32 or float64, got torch.int64"):
        kernels.multi_tensor_clamp_([a, torch.arange(3)], 1.0)
    with pytest.raises(RuntimeError, match="dense"):
        kernels.multi_tensor_norm([a, torch.ones(4).to_sparse()], 2.0, False)
    assert torch.equal(a, torch.full((4,), 3.0))


def test_triton_launch_makes_the_tensors_device_current():
    # Triton launches on the current device and its stream: tensors on cuda:1 with cuda:0
    # current would be read through the wrong context.
    pytest.importorskip("triton")
    from ganops.triton_kernels import clip_grad_norm as kernels
    guard = kernels._on(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(kernels._on(torch.device("cpu")), torch.cuda.device)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_tensors_on_a_device_that_is_not_current(backend):
    params = make_params([(1000,), (7, 3)], "cuda:1")
    originals = [p.grad.double().cpu() for p in params]
    with torch.cuda.device(0):
        total = ganops.clip_grad_norm_(params, 1.0, backend=backend)
        ganops.clip_grad_value_(params, 0.01, backend=backend)
    truth = exact_norm(originals, 2.0)
    torch.testing.assert_close(total.double().cpu(), truth, **tol(torch.float32))
    for p, o in zip(params, originals):
        torch.testing.assert_close(p.grad.double().cpu(), (o * expected_coef(truth, 1.0)).clamp(-0.01, 0.01),
                                   **tol(torch.float32))


# ---------------------------------------------------------------------------------------
# Several devices: the order of the per-tensor norms, host copies
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("device,backend", backend_params(devices=("cpu",)))
def test_per_tensor_norms_come_back_in_order_from_device_groups(device, backend, monkeypatch):
    # Without a second device, split one device's tensors into interleaved groups the way
    # several devices would be: the norms must land at their tensors' places.
    params = make_params([(5,), (3, 3), (40000,), (2,), (7,), (1,)], device)
    groups = {"a": [0, 2, 3], "b": [1, 4], "c": [5]}
    monkeypatch.setattr(hub, "_by_device", lambda tensors: groups if len(tensors) == 6 else {"x": list(range(len(tensors)))})
    total, per = ganops.grad_norm(params, per_tensor=True, backend=backend)
    for k, p in enumerate(params):
        torch.testing.assert_close(per[k].double(), exact_norm([p.grad], 2.0), **tol(torch.float32))
    torch.testing.assert_close(total.double(), exact_norm(grads_of(params), 2.0), **tol(torch.float32))


def test_triton_refuses_cpu_gradients_without_the_interpreter(monkeypatch):
    """What test_cuda_total_scales_cpu_gradients_after_it_arrives[triton] meets on a GPU
    machine, shown here: without TRITON_INTERPRET the Triton backend, asked for by name,
    refuses CPU gradients with BackendUnavailableError and changes nothing."""
    monkeypatch.setattr(ganops._backend, "triton_interpret", lambda: False)
    cpu = make_params([(10,)], "cpu")
    original = cpu[0].grad.clone()
    assert ganops._backend.unavailable_reason("triton", "cpu") is not None
    with pytest.raises(ganops.BackendUnavailableError, match="cpu"):
        ganops.clip_grads_with_norm_(cpu, 1.0, torch.tensor(100.0, dtype=torch.float64), backend="triton")
    assert torch.equal(cpu[0].grad, original)


@requires_cuda
@pytest.mark.parametrize("backend", ["cpp", "triton", "torch"])
def test_cuda_total_scales_cpu_gradients_after_it_arrives(backend):
    # The CPU kernels read the total right away: a non-blocking device-to-host copy raced
    # with them. Keep the GPU busy so that a racing read would see the copy unfinished.
    cpu = make_params([(1000,)], "cpu")
    original = cpu[0].grad.clone()
    big = torch.randn(4096, 4096, device="cuda")
    for _ in range(3):
        big = big @ big / 64
    total = (big.sum() * 0 + 100.0).double()
    cpu_reason = ganops._backend.unavailable_reason(backend, "cpu")
    if cpu_reason is not None:
        # Triton serves CPU tensors only in its interpreter, which a GPU machine does not
        # run: asked for by name, the backend refuses the CPU gradients, saying why, and
        # leaves them unchanged (the CUDA ones are this file's other tests').
        with pytest.raises(ganops.BackendUnavailableError, match="cpu"):
            ganops.clip_grads_with_norm_(cpu, 1.0, total, backend=backend)
        assert torch.equal(cpu[0].grad, original)
        return
    ganops.clip_grads_with_norm_(cpu, 1.0, total, backend=backend)
    torch.testing.assert_close(cpu[0].grad, original * (1.0 / (100.0 + 1e-6)), **tol(torch.float32))
    gpu = make_params([(3000,)], "cuda", seed=2)
    params = cpu + gpu
    originals = [p.grad.double().cpu() for p in params]
    total = ganops.clip_grad_norm_(params, 1.0, backend=backend)
    truth = exact_norm(originals, 2.0)
    for p, o in zip(params, originals):
        torch.testing.assert_close(p.grad.double().cpu(), o * expected_coef(truth, 1.0), **tol(torch.float32))


@requires_cuda
@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_clip_replays_in_a_cuda_graph_after_the_staging_memory_is_reused(backend):
    params = make_params([(3000,), (17, 5), (40000,)], "cuda")
    grads = grads_of(params)
    start = [g.clone() for g in grads]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm up (compilation, allocator) outside the capture
            for g, s in zip(grads, start):
                g.copy_(s)
            ganops.clip_grad_norm_(params, 1.0, backend=backend)
            ganops.clip_grad_value_(params, 0.001, backend=backend)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        total = ganops.clip_grad_norm_(params, 1.0, backend=backend)
        ganops.clip_grad_value_(params, 0.001, backend=backend)
    # Churn the pinned host allocator: freed staging blocks get reused and overwritten.
    for _ in range(20):
        junk = torch.full((1 << 16,), -1, dtype=torch.int64).pin_memory()
        junk.to("cuda", non_blocking=True)
        del junk
    torch.cuda.synchronize()
    for g, s in zip(grads, start):
        g.copy_(s)
    graph.replay()
    torch.cuda.synchronize()
    truth = exact_norm([s.double().cpu() for s in start], 2.0)
    torch.testing.assert_close(total.double().cpu(), truth, **tol(torch.float32))
    for g, s in zip(grads, start):
        expected = (s.double().cpu() * expected_coef(truth, 1.0)).clamp(-0.001, 0.001)
        torch.testing.assert_close(g.double().cpu(), expected, **tol(torch.float32))


# ---------------------------------------------------------------------------------------
# torch's behaviour as the contract: the empty-generator warning, the error wording
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("device,backend", backend_params(devices=("cpu",)))
def test_exhausted_generator_warns_like_torch(device, backend):
    params = make_params([(3,)])
    gen = (p for p in params)
    list(gen)
    with pytest.warns(UserWarning, match=r"^`parameters` is an empty generator, no gradient clipping will occur\.$") as rec:
        total = ganops.clip_grad_norm_(gen, 1.0, backend=backend)
    assert rec[0].filename == __file__, "the warning must point at the caller's line"
    assert total.item() == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ganops.clip_grad_norm_([], 1.0, backend=backend)           # an empty list is no mistake: silent
        ganops.clip_grad_norm_((p for p in params), 1.0, backend=backend)  # a live generator: silent
        ganops.clip_grad_value_((p for p in []), 1.0, backend=backend)     # torch warns in clip_grad_norm_ only


@pytest.mark.parametrize("device,backend", backend_params(devices=("cpu",)))
@pytest.mark.parametrize("norm_type", [2, 3.5, "inf"])
def test_nonfinite_error_uses_torchs_words(device, backend, norm_type):
    for fn in (torch.nn.utils.clip_grad_norm_, lambda *a, **k: ganops.clip_grad_norm_(*a, **k, backend=backend)):
        p = make_params([(4,)])
        p[0].grad[2] = math.inf
        with pytest.raises(RuntimeError, match="^" + TORCH_NONFINITE_MESSAGE.format(p=float(norm_type)) + "$"):
            fn(p, 1.0, norm_type, error_if_nonfinite=True)
    with pytest.raises(RuntimeError, match="^" + TORCH_NONFINITE_MESSAGE.format(p=float(norm_type)) + "$"):
        ganops.get_total_norm([torch.tensor([math.nan])], norm_type, error_if_nonfinite=True, backend=backend)


# ---------------------------------------------------------------------------------------
# The behaviours PyTorch's own clip tests check, in our words
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("norm_type", [0.5, 1.5, 2, 4, "inf"])
def test_clipped_norm_equals_max_norm_and_scale_is_uniform(device, backend, norm_type):
    p_float = float(norm_type)
    w = torch.nn.Parameter(torch.zeros(10, 10, dtype=torch.float64, device=device))
    b = torch.nn.Parameter(torch.zeros(10, dtype=torch.float64, device=device))
    w.grad = torch.linspace(1, 100, 100, dtype=torch.float64, device=device).view(10, 10)
    b.grad = torch.full((10,), 1e-3, dtype=torch.float64, device=device)
    before = [w.grad.clone(), b.grad.clone()]
    norm_before = exact_norm(before, p_float)
    total = ganops.clip_grad_norm_(iter([w, b]), 2.0, norm_type, backend=backend)
    torch.testing.assert_close(total.cpu(), norm_before, **tol(torch.float64))
    torch.testing.assert_close(exact_norm([w.grad, b.grad], p_float), torch.tensor(2.0, dtype=torch.float64),
                               rtol=1e-6, atol=0)  # 2 / (norm + 1e-6) * norm, 1e-6 off 2
    ratios = torch.cat([(w.grad / before[0]).flatten(), (b.grad / before[1]).flatten()])
    # Every element scaled by the same coefficient (x * c / x is c to a rounding or two).
    torch.testing.assert_close(ratios, ratios[0].expand_as(ratios), **tol(torch.float64))
    # Small gradients stay as they are, bit for bit.
    w.grad, b.grad = before[0] / 1e7, before[1] / 1e3
    small = [w.grad.clone(), b.grad.clone()]
    ganops.clip_grad_norm_([w, b], 2.0, norm_type, backend=backend)
    assert torch.equal(w.grad, small[0]) and torch.equal(b.grad, small[1])
    # A lone tensor is a list of one.
    x, y = torch.zeros(10, 10, device=device), torch.zeros(10, 10, device=device)
    x.grad = torch.arange(1.0, 101.0, device=device).view(10, 10)
    y.grad = x.grad.clone()
    ganops.clip_grad_norm_(x, 2.0, norm_type, backend=backend)
    ganops.clip_grad_norm_([y], 2.0, norm_type, backend=backend)
    assert torch.equal(x.grad, y.grad)


# ---------------------------------------------------------------------------------------
# clip_grad_value_
# ---------------------------------------------------------------------------------------

def clamp_reference(g, clip_value):
    """Independent float64 truth of torch's clamp_min(-c) then clamp_max(c), NaN kept."""
    x = g.detach().double().cpu()
    x = torch.where(x < -clip_value, torch.full_like(x, -clip_value), x)
    return torch.where(x > clip_value, torch.full_like(x, clip_value), x)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("clip_value", [0.0, 0.3, 2.5, 1e300, math.inf])
def test_clip_grad_value_matches_torch_and_float64(device, backend, dtype, clip_value):
    shapes = [(7,), (33, 5), (0,), (40000,)]
    params, ref = make_params(shapes, device, dtype, scale=3.0), make_params(shapes, device, dtype, scale=3.0)
    for ps in (params, ref):
        ps[0].grad[1], ps[0].grad[2], ps[0].grad[3] = math.nan, math.inf, -math.inf
    originals = [p.grad.clone() for p in params]
    assert ganops.clip_grad_value_(params, clip_value, backend=backend) is None
    # torch refuses a finite clip_value past the dtype's range ("cannot be converted ...
    # without overflow"); ganops clamps by it, which changes nothing finite.
    torch_refuses = math.isfinite(clip_value) and clip_value > torch.finfo(dtype).max
    if not torch_refuses:
        torch.nn.utils.clip_grad_value_(ref, clip_value)
    for p, r, o in zip(params, ref, originals):
        assert p.grad.dtype == dtype
        assert torch.equal(p.grad.isnan(), o.isnan()), "NaN must stay NaN, as torch.clamp_ leaves it"
        if not torch_refuses:
            torch.testing.assert_close(p.grad, r.grad, rtol=0, atol=0, equal_nan=True)
        expected = clamp_reference(o, clip_value).to(dtype)
        torch.testing.assert_close(p.grad.cpu(), expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("device,backend", backend_params(devices=("cpu",)))
def test_clip_grad_value_api(device, backend):
    # Generators, parameters without .grad, a lone tensor, mixed dtypes, non-contiguous
    # gradients, and torch's answer for a negative clip_value (everything becomes it).
    w = torch.nn.Parameter(torch.zeros(10, 10))
    b = torch.nn.Parameter(torch.zeros(10))
    w.grad = torch.arange(-50.0, 50.0).view(10, 10).t() / 5  # non-contiguous
    expected_w = clamp_reference(w.grad, 2.5).float()
    ganops.clip_grad_value_((p for p in [w, b]), 2.5, backend=backend)  # b has no grad: skipped
    assert b.grad is None
    assert torch.equal(w.grad, expected_w)
    x, y = torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float16)
    x.grad = torch.tensor([-3.0, -0.5, 0.5, 3.0], dtype=torch.float64)
    y.grad = torch.tensor([-3.0, -0.5, 0.5, 3.0], dtype=torch.float16)
    ganops.clip_grad_value_(x, 1.0, backend=backend)
    ganops.clip_grad_value_([y], 1.0, backend=backend)
    assert x.grad.tolist() == [-1.0, -0.5, 0.5, 1.0] and y.grad.tolist() == [-1.0, -0.5, 0.5, 1.0]
    neg, ref = make_params([(6,)]), make_params([(6,)])
    ganops.clip_grad_value_(neg, -0.5, backend=backend)
    torch.nn.utils.clip_grad_value_(ref, -0.5)
    assert torch.equal(neg[0].grad, ref[0].grad)
    ganops.clip_grad_value_([], 1.0, backend=backend)
    with pytest.raises(ValueError, match="clip_value"):
        ganops.clip_grad_value_(neg, math.nan, backend=backend)
    with pytest.raises(TypeError, match="clip_value"):
        ganops.clip_grad_value_(neg, "big", backend=backend)
    with pytest.raises(TypeError, match="parameters"):
        ganops.clip_grad_value_(3.0, 1.0, backend=backend)


@pytest.mark.parametrize("device,backend", backend_params(devices=("cpu",)))
def test_clip_grad_value_opcheck(device, backend):
    if backend == "torch":
        pytest.skip("the torch backend is no registered op")
    op = torch.ops.ganops.multi_tensor_clamp_ if backend == "cpp" else torch.ops.ganops.multi_tensor_clamp_triton_
    tensors = [torch.randn(40000) * 3, torch.randn(7, dtype=torch.float64), torch.randn(5, 5).t()]
    torch.library.opcheck(op, (tensors, 1.5))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("backend", ["cpp", "triton", "torch"])
def test_no_host_sync_across_two_gpus(backend):
    # The multi-device path once made blocking copies and uploaded the per-tensor order
    # with torch.tensor(..., device=...).
    params = make_params([(100,), (5, 5), (300,), (7,)], "cuda:0")
    for k in (1, 3):
        params[k].grad = params[k].grad.to("cuda:1")
    originals = [p.grad.double().cpu() for p in params]
    ganops.grad_norm(params, per_tensor=True, backend=backend)  # warm up
    torch.cuda.set_sync_debug_mode("error")
    try:
        total, per = ganops.grad_norm(params, per_tensor=True, backend=backend)
        clipped = ganops.clip_grad_norm_(params, 1.0, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for k, o in enumerate(originals):
        torch.testing.assert_close(per[k].double().cpu(), exact_norm([o], 2.0), **tol(torch.float32))
    truth = exact_norm(originals, 2.0)
    torch.testing.assert_close(clipped.double().cpu(), truth, **tol(torch.float32))
    for p, o in zip(params, originals):
        torch.testing.assert_close(p.grad.double().cpu(), o * expected_coef(truth, 1.0), **tol(torch.float32))
