"""Global gradient-norm clipping: every backend against torch.nn.utils and a float64 truth."""

import math
import warnings

import pytest
import torch

import ganops
from ganops import _backend, _ext
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
# The kernels' structure: CUDA index math on the CPU, determinism, registered ops
# ---------------------------------------------------------------------------------------

@pytest.mark.skipif(not _ext.load(), reason="the compiled extension is not built")
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_cuda_launch_covers_every_element_once(norm_type):
    tensors = [torch.randn(s, dtype=dt) for s, dt in [
        ((40000,), torch.float32), ((0,), torch.float32), ((16384,), torch.float16),
        ((16385,), torch.float64), ((1,), torch.bfloat16), ((513,), torch.float32), ((70000,), torch.float16)]]
    coverage, per, total = torch.ops.ganops._multi_tensor_norm_cuda_launch_check(tensors, norm_type)
    assert coverage.numel() == sum(t.numel() for t in tensors)
    assert coverage.min().item() == 1 and coverage.max().item() == 1, "an element was skipped or visited twice"
    for k, t in enumerate(tensors):
        torch.testing.assert_close(per[k], exact_norm([t], norm_type), rtol=1e-6, atol=0)
    torch.testing.assert_close(total, exact_norm(tensors, norm_type), rtol=1e-6, atol=0)


@pytest.mark.skipif(not _ext.load(), reason="the compiled extension is not built")
def test_cpu_kernel_is_bit_identical_across_thread_counts():
    params = make_params([(300000,), (77,), (20000, 3)], dtype=torch.float32)
    saved = [p.grad.clone() for p in params]
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 4):
            torch.set_num_threads(n)
            for p, s in zip(params, saved):
                p.grad.copy_(s)
            total = ganops.clip_grad_norm_(params, 1.0, backend="cpp")
            results.append((total.clone(), [p.grad.clone() for p in params]))
    finally:
        torch.set_num_threads(threads)
    for total, grads in results[1:]:
        assert torch.equal(total, results[0][0])
        assert all(torch.equal(a, b) for a, b in zip(grads, results[0][1]))


def _op_samples(device):
    tensors = [torch.randn(5, device=device), torch.randn(3, 4, device=device)]
    return tensors


@pytest.mark.parametrize("device,backend", [p for p in backend_params() if p.values[1] != "torch"])
def test_opcheck(device, backend):
    suffix = "" if backend == "cpp" else "_triton"
    norm_op = getattr(torch.ops.ganops, f"multi_tensor_norm{suffix}")
    scale_op = getattr(torch.ops.ganops, "multi_tensor_scale_" if backend == "cpp" else "multi_tensor_scale_triton_")
    clip_op = getattr(torch.ops.ganops, "clip_grad_norm_" if backend == "cpp" else "clip_grad_norm_triton_")
    tensors = _op_samples(device)
    for per_tensor in (True, False):
        torch.library.opcheck(norm_op, (tensors, 2.0, per_tensor))
    torch.library.opcheck(scale_op, (_op_samples(device), torch.tensor(1.5, device=device), 1.0))
    torch.library.opcheck(clip_op, (_op_samples(device), 1.0, 2.0))


@pytest.mark.parametrize("device,backend", [p for p in backend_params() if p.values[1] != "torch"])
def test_torch_compile_fullgraph(device, backend):
    torch._dynamo.reset()
    params = make_params([(6,), (4, 5)], device)
    ref = make_params([(6,), (4, 5)], device)

    @torch.compile(fullgraph=True, backend="aot_eager" if device == "cpu" and backend == "triton" else "inductor")
    def step(ps):
        total, per = ganops.grad_norm(ps, per_tensor=True, backend=backend)
        clipped = ganops.clip_grad_norm_(ps, 0.5, backend=backend)
        return total, per, clipped

    total, per, clipped = step(params)
    ref_total = torch.nn.utils.clip_grad_norm_(ref, 0.5)
    torch.testing.assert_close(total, ref_total)
    torch.testing.assert_close(clipped, ref_total)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.grad, r.grad)


# ---------------------------------------------------------------------------------------
# Backend selection
# ---------------------------------------------------------------------------------------

def test_backend_selection(monkeypatch):
    assert "torch" in ganops.available_backends("cpu")
    monkeypatch.delenv("GANOPS_BACKEND", raising=False)
    assert ganops.get_backend() == "auto"
    monkeypatch.setenv("GANOPS_BACKEND", "torch")
    assert ganops.get_backend() == "torch"
    ganops.set_backend("cpp")
    try:
        assert ganops.get_backend() == "cpp"
        with ganops.use_backend("triton"):
            assert ganops.get_backend() == "triton"
            with ganops.use_backend("torch"):
                assert ganops.get_backend() == "torch"
            assert ganops.get_backend() == "triton"
        assert ganops.get_backend() == "cpp"
    finally:
        ganops.set_backend(None)
    assert ganops.get_backend() == "torch"
    with pytest.raises(ValueError, match="backend"):
        ganops.set_backend("cuda")
    monkeypatch.setenv("GANOPS_BACKEND", "fast")
    with pytest.raises(ValueError, match="GANOPS_BACKEND"):
        ganops.get_backend()


def test_backend_context_reaches_the_op(monkeypatch):
    calls = []
    monkeypatch.setattr(hub, "multi_tensor_norm_reference",
                        lambda *a, **k: calls.append("torch") or (torch.tensor(1.0), torch.zeros(0)))
    with ganops.use_backend("torch"):
        ganops.get_total_norm([torch.ones(3)])
    assert calls == ["torch"]


def test_named_backend_that_cannot_serve_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    # Without triton installed (a CPU-only torch) that is the reason given instead.
    reason = "TRITON_INTERPRET" if ganops._backend._triton_installed() else "triton is not installed"
    with pytest.raises(ganops.BackendUnavailableError, match=reason):
        ganops.clip_grad_norm_(make_params([(3,)]), 1.0, backend="triton")
    assert "triton" not in ganops.available_backends("cpu")
    # auto falls back silently
    assert ganops.clip_grad_norm_(make_params([(3,)]), 1.0).dim() == 0
    with pytest.raises(ganops.BackendUnavailableError, match="meta"):
        _backend.resolve("cpp", "meta")


def test_missing_extension_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setattr(_ext, "_loaded", None)
    monkeypatch.setattr(_ext, "_load_error", None)
    info = dict(_ext._build_info_module() or {}, torch_version="2.0.0")
    monkeypatch.setattr(_ext, "_build_info_module", lambda: dict(info))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not _ext.load()
        assert not _ext.load()
    assert len(caught) == 1 and "built against torch 2.0.0" in str(caught[0].message)
    assert "cpp" not in ganops.available_backends("cpu")
    with pytest.raises(ganops.BackendUnavailableError, match="2.0.0"):
        ganops.clip_grad_norm_(make_params([(3,)]), 1.0, backend="cpp")
    params = make_params([(3,)])
    ganops.clip_grad_norm_(params, 1.0)  # auto still serves


def test_build_info():
    info = ganops.build_info()
    for key in ("torch_version", "cuda_kernels", "cuda_arch_list", "available_backends", "extension_loaded"):
        assert key in info
    if info["cuda_kernels"]:
        assert "9.0" in info["cuda_arch_list"]
