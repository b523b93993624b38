"""The contract every registered op keeps, parametrized over the op registry
(ganops._library.REGISTRY), with the examples each op declares:

- the registry defines every compiled op, the C++ implements each and no other;
- torch.library.opcheck passes on both compiled backends;
- the fake gives every backend's output metadata;
- cpp and triton agree with the reference (outputs and arguments changed in place);
- torch.compile(fullgraph=True) runs the op, and its backward where it has one;
- the CPU kernels give the same bits whatever the thread count;
- a tensor of the wrong dtype is refused before anything is written.

A new op declared in its hub is covered here without a line added. Each op's own math (its
formulas against float64 references, its drop-in semantics, its launch) is tested in
tests/test_<op>.py; tests/test_differential.py compares the public functions on random inputs.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_flatten, tree_map

import ganops  # noqa: F401  (declares every op)
from ganops import _ext, _library
from conftest import HAS_CUDA, assert_within_reference_error, backend_params, tol

OPS = list(_library.REGISTRY.values())
op_params = pytest.mark.parametrize("op", OPS, ids=lambda op: op.name)
COMPILED = [p for p in backend_params() if p.values[1] != "torch"]
requires_cpp = pytest.mark.skipif(not _ext.load(), reason="the compiled extension is not built")


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


def examples(op: _library.Op, device: str, dtype: torch.dtype) -> list[tuple]:
    return op.examples(device, dtype)


def clone_args(args: tuple) -> tuple:
    """A deep copy of an argument tuple: tensors cloned with their strides, requires_grad kept."""
    def clone(x):
        if not isinstance(x, torch.Tensor):
            return x
        out = x.detach().clone()
        return out.requires_grad_(x.requires_grad)
    return tuple(tree_map(clone, list(args)))


def tensors_of(tree) -> list[torch.Tensor]:
    return [x for x in tree_flatten(tree)[0] if isinstance(x, torch.Tensor)]


def mutated(op: _library.Op, args: tuple) -> list[torch.Tensor]:
    """The tensors ``op`` changes in place, from its schema's (a!) annotations."""
    return tensors_of([args[op.arg_names.index(n)] for n in op.mutated_args])


def coarsest_dtype(args) -> torch.dtype:
    """The least precise floating dtype among the arguments: the tolerance an example earns."""
    return max((t.dtype for t in tensors_of(list(args)) if t.is_floating_point()),
               key=lambda d: torch.finfo(d).eps)


def assert_same_results(actual, expected, dtype) -> None:
    got, want = tensors_of(actual), tensors_of(expected)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, a.dtype, b.shape, b.dtype)
        torch.testing.assert_close(a.detach(), b.detach(), equal_nan=True, **tol(dtype))


# ---------------------------------------------------------------------------------------
# The registry is the one place an op's schema is written
# ---------------------------------------------------------------------------------------

@requires_cpp
@op_params
def test_cpp_schema_is_the_registrys(op):
    """The registry defines the compiled op (the C++ registers kernels only), and its Triton
    twin, with the one schema written in the hub."""
    declared = str(torch._C.parse_schema(f"ganops::{op.name}{op.schema}"))
    assert str(op.overload("cpp")._schema) == declared
    twin = str(op.overload("triton")._schema)
    assert twin == declared.replace(op.qualname("cpp"), op.qualname("triton"), 1)


@requires_cpp
@op_params
def test_every_op_has_its_compiled_kernels(op):
    """csrc/<op>/ implements each registry op on the CPU, and on CUDA where the CUDA kernels
    are loaded: an op the C++ forgot (or registered under another name) fails here."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op.qualname("cpp"), "CPU")
    if _ext.has_cuda_kernels():
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.qualname("cpp"), "CUDA")


def _ops_with_kernels(*dispatch_keys):
    return {name.split("::")[1] for key in dispatch_keys
            for name in torch._C._dispatch_get_registrations_for_dispatch_key(key) if name.startswith("ganops::")}


@requires_cpp
def test_every_compiled_kernel_implements_a_registry_op():
    """The C++ implements no op the registry does not define (a kernel registered for a name
    no hub declares would never be reached), but the CPU-only test hooks of the launch checks
    (``_<op>_cuda_launch_check``)."""
    kernels = {name for name in _ops_with_kernels("CPU", "CUDA") if not name.endswith("_cuda_launch_check")}
    assert kernels == set(_library.REGISTRY)


def test_the_shipped_extensions_hold_no_launch_check():
    """The launch checks are test ops: they live in ganops._C_launch_checks (built for the
    suite, not shipped), never in ganops._C or ganops._C_cuda."""
    import importlib.util
    import re
    origins = [spec.origin for spec in map(importlib.util.find_spec, ("ganops._C", "ganops._C_cuda"))
               if spec is not None and spec.origin]
    if not origins:
        pytest.skip("the compiled extension is not built")
    for origin in origins:
        with open(origin, "rb") as f:
            assert not re.search(rb"_cuda_launch_check", f.read()), origin


def _expanded(*shape):
    """A tensor of ``shape`` too large to exist: one element, expanded."""
    return torch.zeros((1,) * len(shape)).expand(*shape)


@pytest.mark.parametrize("launch", ["gradient_penalty", "minibatch_discrimination"])
def test_a_grid_past_cudas_limit_is_refused_with_a_clear_error(launch):
    """The CUDA host code checks a 1-D grid against CUDA's limit of 2^31 - 1 blocks before it
    launches (ganops/grid.h); each launch check makes the same check with the same sizes, on
    inputs expanded past it."""
    if launch == "gradient_penalty":
        # One chunk per sample: 2^31 + 1 samples, 2^31 + 1 blocks.
        g = _expanded(2**31 + 1, 1)
        call = lambda: torch.ops.ganops._gradient_penalty_cuda_launch_check(g, g, g, 1.0, False, 10.0)  # noqa: E731
    else:
        # One thread per (i, b) row, 256 per block: 2^40 rows, 2^32 blocks.
        M, grad = _expanded(2**20, 2**20, 1), _expanded(2**20, 2**20)
        call = lambda: torch.ops.ganops._minibatch_discrimination_cuda_launch_check(M, grad, M, True)  # noqa: E731
    with pytest.raises(RuntimeError, match=r"past CUDA's limit of 2\^31 - 1 blocks"):
        call()


# ---------------------------------------------------------------------------------------
# opcheck, fakes, agreement with the reference
# ---------------------------------------------------------------------------------------

@op_params
@pytest.mark.parametrize("device,backend", COMPILED)
def test_opcheck(op, device, backend):
    utils = torch.library._OPCHECK_DEFAULT_UTILS
    if backend == "triton" and device == "cpu":
        # Under the interpreter torch.compile cannot trace a Triton launch (fake tensors have
        # no data pointer, docs/design.md): opcheck's other checks run.
        utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    for args in examples(op, device, torch.float64):
        torch.library.opcheck(op.overload(backend), args, test_utils=utils)


@op_params
@pytest.mark.parametrize("device,backend", backend_params())
def test_fake_gives_every_backends_output_metadata(op, device, backend):
    for args in examples(op, device, torch.float32):
        with torch.no_grad():
            real = _library.call(op, backend, device, *clone_args(args))
        with FakeTensorMode() as mode:
            fake = op.fake(*tree_map(lambda x: mode.from_tensor(x) if isinstance(x, torch.Tensor) else x, list(args)))
        real, fake = tensors_of(real), tensors_of(fake)
        assert [(t.shape, t.dtype) for t in real] == [(t.shape, t.dtype) for t in fake]


def in_float64(args: tuple) -> tuple:
    return tuple(tree_map(lambda x: x.detach().double() if isinstance(x, torch.Tensor) else x, list(args)))


@op_params
@pytest.mark.parametrize("device,backend", COMPILED)
def test_matches_the_reference_in_float64(op, device, backend):
    for args in examples(op, device, torch.float64):
        ours, theirs = clone_args(args), clone_args(args)
        with torch.no_grad():
            got = op.overload(backend)(*ours)
            want = op.reference(*theirs)
        assert_same_results(got, want, coarsest_dtype(args))
        assert_same_results(mutated(op, ours), mutated(op, theirs), coarsest_dtype(args))


@op_params
@pytest.mark.parametrize("device,backend", COMPILED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_low_precision_within_twice_the_references_error(op, device, backend, dtype):
    """Against the reference run in float64, the kernels' error is at most twice the error of
    the reference run in the same low precision (plus the dtype's floor)."""
    for args in examples(op, device, dtype):
        ours, low, exact = clone_args(args), clone_args(args), in_float64(args)
        with torch.no_grad():
            got = tensors_of(op.overload(backend)(*ours)) + mutated(op, ours)
            want_low = tensors_of(op.reference(*low)) + mutated(op, low)
            want_exact = tensors_of(op.reference(*exact)) + mutated(op, exact)
        assert len(got) == len(want_exact)
        for a, lo, ex in zip(got, want_low, want_exact):
            assert a.shape == ex.shape
            if ex.numel():
                assert_within_reference_error(a, lo, ex, coarsest_dtype(args))


# ---------------------------------------------------------------------------------------
# torch.compile and determinism
# ---------------------------------------------------------------------------------------

def _compile_params():
    params = [pytest.param("cpu", "cpp", id="cpu-cpp",
                           marks=[] if _ext.load() else [pytest.mark.skip(reason="the compiled extension is not built")])]
    for p in COMPILED:
        if p.values[0] == "cuda":
            params.append(p)
    return params


def _differentiable_outputs(out) -> list[torch.Tensor]:
    return [t for t in tensors_of(out) if t.requires_grad]


@op_params
@pytest.mark.parametrize("device,backend", _compile_params())
def test_torch_compile_fullgraph(op, device, backend):
    """The op, and its backward where it has one, traced with no graph break (the Triton ops
    only on a GPU: under the interpreter a launch cannot be traced)."""
    torch._dynamo.reset()
    overload = op.overload(backend)
    compiled = torch.compile(lambda *a: overload(*a), fullgraph=True, backend="aot_eager")
    args = examples(op, device, torch.float32)[0]
    eager_args, compiled_args = clone_args(args), clone_args(args)
    want, got = overload(*eager_args), compiled(*compiled_args)
    assert_same_results(got, want, torch.float32)
    assert_same_results(mutated(op, compiled_args), mutated(op, eager_args), torch.float32)
    if op.backward is None or not _differentiable_outputs(want):
        return
    leaves = lambda a: [t for t in tensors_of(a) if t.requires_grad]  # noqa: E731
    grads_want = torch.autograd.grad(sum(t.sum() for t in _differentiable_outputs(want)), leaves(eager_args),
                                     allow_unused=True, materialize_grads=True)
    grads_got = torch.autograd.grad(sum(t.sum() for t in _differentiable_outputs(got)), leaves(compiled_args),
                                    allow_unused=True, materialize_grads=True)
    assert_same_results(grads_got, grads_want, torch.float32)


@requires_cpp
@op_params
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_cpu_kernels_are_bit_identical_across_thread_counts(op, dtype):
    args = examples(op, "cpu", dtype)
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results = []
            with torch.no_grad():
                for a in args:
                    a = clone_args(a)
                    results += tensors_of(op.overload("cpp")(*a)) + mutated(op, a)
            runs.append(results)
    finally:
        torch.set_num_threads(before)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------
# Bad input: refused, and refused before anything is written
# ---------------------------------------------------------------------------------------

def _with_integer_tensor(args: tuple, index: int) -> tuple:
    """args with the index-th tensor (counting tensors in lists too) as int64."""
    count = [0]

    def swap(x):
        if not isinstance(x, torch.Tensor):
            return x
        count[0] += 1
        return x.detach().to(torch.int64) if count[0] - 1 == index else x.detach()
    return tuple(tree_map(swap, list(clone_args(args))))


@op_params
@pytest.mark.parametrize("device,backend", COMPILED)
def test_an_integer_tensor_is_refused_before_anything_is_written(op, device, backend):
    args = examples(op, device, torch.float32)[0]
    for index in range(len(tensors_of(list(args)))):
        bad = _with_integer_tensor(args, index)
        before = [t.clone() for t in mutated(op, bad)]
        with pytest.raises((RuntimeError, TypeError, ValueError)):
            op.overload(backend)(*bad)
        for t, saved in zip(mutated(op, bad), before):
            assert torch.equal(t, saved), "a refused call wrote to an argument"


def test_examples_are_fresh_each_call():
    """The suite relies on examples not sharing tensors between calls (ops write in place)."""
    for op in OPS:
        first, second = examples(op, "cpu", torch.float32), examples(op, "cpu", torch.float32)
        for a, b in zip(tensors_of(first), tensors_of(second)):
            assert a.data_ptr() != b.data_ptr() or a.numel() == 0


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU; none is visible")
def test_examples_on_cuda_stay_on_cuda():
    for op in OPS:
        for t in tensors_of(examples(op, "cuda", torch.float32)):
            assert t.is_cuda


def test_an_op_is_declared_once():
    """Declaring a name twice is an error, not a second registration over the first."""
    op = OPS[0]
    with pytest.raises(ValueError, match="declared twice"):
        _library.define(op.name, op.schema, fake=op.fake, reference=op.reference, triton=op.triton)
    assert _library.REGISTRY[op.name] is op
