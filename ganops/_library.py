"""The op registry: every registered op is declared once, in its hub (ganops/ops/<op>.py),
and everything else is derived from that declaration.

    interpolate = _library.define(
        "interpolate", "(Tensor real, Tensor fake, Tensor alpha) -> Tensor",
        fake=..., reference=..., triton="gradient_penalty.interpolate",
        backward=..., setup_context=..., examples=...)

From it come:

- on the ``cpp`` backend, the op ``ganops::<name>``, defined here with this schema (the one
  place it is written) when the compiled kernels are loaded; csrc/<op>/ registers only its
  CPU and CUDA kernels (GANOPS_KERNEL). It gets its fake (for torch.compile and meta tensors)
  and its autograd formula. tests/test_contract.py checks that every op has its kernels and
  that the C++ implements no op the registry does not define.
- on the ``triton`` backend, the twin ``ganops::<name>_triton`` (``<stem>_triton_`` for an
  in-place ``<stem>_``): a custom op of the same schema around the launcher named by
  ``triton`` (a function of ganops.triton_kernels.<module>, imported on first use), with the
  same fake and autograd formula.
- the dispatch: ``call(op, backend, device, *args)`` runs the op on the backend that serves
  (cpp, triton, or the reference for ``torch``), and ``kernels(backend, device)`` gives the
  ops of a compiled backend by name, or None where the reference serves.
- the contract suite (tests/test_contract.py), parametrized over REGISTRY with each op's
  ``examples``: opcheck on both compiled backends, the fake against the kernels, every backend
  against the reference, torch.compile, determinism across thread counts, bad inputs.
- the GPU checks (tools/gpu_workloads.py): compute-sanitizer and the CUDA-graph capture call
  every op on each of its ``examples`` and ``gpu_examples``, forward and backward.

``backward(kernels, ctx, *grads)`` is the op's autograd formula; ``kernels`` holds the ops of
the backend being differentiated, so the cpp op's backward calls cpp ops and the Triton op's
backward calls Triton ops. ``setup_context(ctx, inputs, output)`` saves what it needs, as
torch.library.register_autograd expects.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ganops import _backend, _ext
from ganops._checks import FLOAT_DTYPES

# Every op declared so far, by name, in declaration order.
REGISTRY: dict[str, Op] = {}


def triton_name(name: str) -> str:
    """The Triton twin's name: ``<name>_triton``, or ``<stem>_triton_`` for an in-place ``<stem>_``."""
    return f"{name[:-1]}_triton_" if name.endswith("_") else f"{name}_triton"


@dataclass(eq=False)
class Op:
    """One registered op: its declaration, and the overloads that serve it per backend."""

    name: str
    schema: str
    fake: Callable
    reference: Callable
    triton: str
    backward: Callable | None = None
    setup_context: Callable | None = None
    examples: Callable | None = None
    gpu_examples: Callable | None = None
    arg_names: tuple[str, ...] = field(init=False)
    mutated_args: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        parsed = torch._C.parse_schema(f"ganops::{self.name}{self.schema}")
        self.arg_names = tuple(a.name for a in parsed.arguments)
        self.mutated_args = tuple(a.name for a in parsed.arguments if a.alias_info is not None and a.alias_info.is_write)

    def qualname(self, backend: str) -> str:
        """``ganops::<name>`` on cpp, ``ganops::<twin>`` on triton."""
        return f"ganops::{self.name if backend == 'cpp' else triton_name(self.name)}"

    def overload(self, backend: str) -> torch._ops.OpOverload:
        """The op's default overload on a compiled backend. Calling an overload skips the
        packet's overload resolution: a few microseconds per call on small inputs."""
        return getattr(torch.ops.ganops, self.qualname(backend).split("::")[1]).default


class Kernels:
    """The registered ops of one compiled backend, by op name: ``kernels.interpolate(...)``
    calls that backend's interpolate. Each overload is looked up once, then is an attribute."""

    def __init__(self, backend: str) -> None:
        self.backend = backend

    def __getattr__(self, name: str):
        if name not in REGISTRY:
            raise AttributeError(f"no ganops op named {name!r} is registered")
        overload = REGISTRY[name].overload(self.backend)
        setattr(self, name, overload)
        return overload


# The reference serves `torch`; it has no entry here.
_KERNELS = {"cpp": Kernels("cpp"), "triton": Kernels("triton")}


def kernels(backend: str | None, device: torch.device | str) -> Kernels | None:
    """The ops of the compiled backend that serves ``device`` for ``backend`` (None: the
    current default), or None where the reference serves (the ``torch`` backend)."""
    return _KERNELS.get(_backend.resolve(backend, device))


def call(op: Op, backend: str | None, device: torch.device | str, *args, **reference_options):
    """``op(*args)`` on the backend that serves ``device``. Keyword arguments reach only the
    reference: options the kernels do not have (e.g. clip's ``foreach``)."""
    served_by = kernels(backend, device)
    if served_by is None:
        return op.reference(*args, **reference_options)
    return getattr(served_by, op.name)(*args)


def differentiating(*tensors) -> bool:
    """Whether autograd is recording the backward being run (create_graph=True through it, as
    a gradient penalty's double backward does). A fused backward op has no derivative of its
    own, so an op's ``backward`` then gives way to a differentiable reference backward."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _triton_twin(op: Op) -> Callable:
    """The Triton twin's implementation: checks the dtype of every tensor argument, as the C++
    ops do (a Triton kernel would reinterpret an integer tensor's bits), then calls the
    launcher ``ganops.triton_kernels.<module>.<function>``, imported on first call (importing
    triton costs a second, and only Triton calls need it). Tensor lists (the gradients of
    clipping) are checked by their launchers, which walk them anyway."""
    module, function = op.triton.rsplit(".", 1)

    @functools.cache
    def launcher() -> Callable:
        return getattr(importlib.import_module(f"ganops.triton_kernels.{module}"), function)

    def launch(*args):
        for name, value in zip(op.arg_names, args):
            if isinstance(value, torch.Tensor) and value.dtype not in FLOAT_DTYPES:
                raise TypeError(f"{op.qualname('triton')}: {name} has dtype {value.dtype}; the kernels take "
                                f"float16, bfloat16, float32 or float64 tensors")
        return launcher()(*args)

    return launch


# The library the cpp ops are defined in; kept for the life of the process (the definitions
# go with it).
_CPP_LIBRARY: torch.library.Library | None = None


def _define_cpp_op(op: Op) -> None:
    global _CPP_LIBRARY
    if _CPP_LIBRARY is None:
        _CPP_LIBRARY = torch.library.Library("ganops", "FRAGMENT")
    _CPP_LIBRARY.define(f"{op.name}{op.schema}")


def _register_fake_and_autograd(op: Op, backend: str) -> None:
    qualname = op.qualname(backend)
    torch.library.register_fake(qualname)(op.fake)
    if op.backward is not None:
        torch.library.register_autograd(qualname, functools.partial(op.backward, _KERNELS[backend]),
                                        setup_context=op.setup_context)


def define(name: str, schema: str, *, fake: Callable, reference: Callable, triton: str,
           backward: Callable | None = None, setup_context: Callable | None = None,
           examples: Callable | None = None, gpu_examples: Callable | None = None) -> Op:
    """Declares the op ``ganops::<name>`` with ``schema`` (``"(args) -> returns"``): registers
    the compiled op's fake and autograd when the extension is loaded, defines its Triton twin,
    and enters it in REGISTRY.

    ``fake``: the outputs' metadata from the inputs'. ``reference``: the pure-PyTorch op, same
    arguments, the ``torch`` backend. ``triton``: "<module>.<function>" in ganops.triton_kernels.
    ``backward`` / ``setup_context``: the autograd formula (see the module docstring).
    ``examples(device, dtype)``: a list of argument tuples, fresh tensors each call, for the
    contract suite and the GPU checks. ``gpu_examples(device, dtype)``: more argument tuples,
    of the same form, for the GPU checks only (sanitizer, CUDA graphs): sizes that reach a
    CUDA kernel's other launch shapes (several blocks, another tiling), too large for the
    CPU suite's every-backend runs.
    """
    if name in REGISTRY:
        raise ValueError(f"ganops op {name!r} is declared twice")
    op = Op(name, schema, fake, reference, triton, backward, setup_context, examples, gpu_examples)
    if _ext.load():
        _define_cpp_op(op)
        _register_fake_and_autograd(op, "cpp")
    torch.library.custom_op(op.qualname("triton"), _triton_twin(op), mutates_args=op.mutated_args,
                            schema=schema)
    _register_fake_and_autograd(op, "triton")
    REGISTRY[name] = op
    return op
