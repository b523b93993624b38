"""Backend selection: which implementation of an op serves a call.

``cpp``     the compiled kernels: C++ for CPU tensors, CUDA for CUDA tensors.
``triton``  Triton kernels: CUDA tensors, and CPU tensors when TRITON_INTERPRET=1.
``torch``   the pure-PyTorch reference; serves anywhere.
``auto``    the first of cpp, triton, torch that can serve the tensors' device.

The choice comes from, most specific first: the op's ``backend=`` argument, the innermost
``use_backend`` block, ``set_backend``, the GANOPS_BACKEND environment variable, ``auto``.
A backend asked for by name that cannot serve raises BackendUnavailableError saying why;
only ``auto`` falls back.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import threading

import torch

from ganops import _ext

BACKENDS = ("auto", "cpp", "triton", "torch")
_CONCRETE = ("cpp", "triton", "torch")

_global_backend: str | None = None
_local = threading.local()


class BackendUnavailableError(RuntimeError):
    """A backend asked for by name cannot serve this call."""


def _check_name(name: str, what: str = "backend") -> str:
    if name not in BACKENDS:
        raise ValueError(f"{what} must be one of {', '.join(map(repr, BACKENDS))}, got {name!r}")
    return name


def set_backend(name: str | None) -> None:
    """Sets the process-wide default backend; None restores GANOPS_BACKEND or 'auto'."""
    global _global_backend
    _global_backend = None if name is None else _check_name(name)


@contextlib.contextmanager
def use_backend(name: str):
    """Within the block, ops on this thread use ``name`` unless a call says otherwise."""
    _check_name(name)
    stack = _local.__dict__.setdefault("stack", [])
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def get_backend() -> str:
    """The backend a call without ``backend=`` asks for right now (possibly 'auto')."""
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    if _global_backend is not None:
        return _global_backend
    env = os.environ.get("GANOPS_BACKEND")
    if env:
        return _check_name(env, "GANOPS_BACKEND")
    return "auto"


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_triton_found: bool | None = None


def _triton_installed() -> bool:
    # find_spec walks sys.path (~60 us): once per process is enough.
    global _triton_found
    if _triton_found is None:
        _triton_found = importlib.util.find_spec("triton") is not None
    return _triton_found


def unavailable_reason(backend: str, device: torch.device | str) -> str | None:
    """Why ``backend`` cannot run on ``device``, or None when it can."""
    device = torch.device(device)
    if backend == "torch":
        return None
    if device.type not in ("cpu", "cuda"):
        return f"ganops kernels run on cpu and cuda tensors, not {device.type}"
    if backend == "cpp":
        if not _ext.load():
            return _ext.load_error()
        if device.type == "cuda" and not _ext.has_cuda_kernels():
            return _ext.cuda_load_error()
        return None
    if backend == "triton":
        if not _triton_installed():
            return "triton is not installed"
        if device.type == "cpu" and not triton_interpret():
            return "Triton kernels run on CPU tensors only in interpreter mode: set TRITON_INTERPRET=1"
        if device.type == "cuda" and triton_interpret():
            return "TRITON_INTERPRET=1 is set: Triton kernels run interpreted, on CPU tensors only"
        return None
    raise ValueError(f"unknown backend {backend!r}")


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The concrete backends that can serve tensors on ``device``, in ``auto``'s order."""
    return [b for b in _CONCRETE if unavailable_reason(b, device) is None]


def resolve(backend: str | None, device: torch.device | str) -> str:
    """The concrete backend for one call on ``device``; raises if a named one cannot serve."""
    name = _check_name(backend) if backend is not None else get_backend()
    if name == "auto":
        for candidate in _CONCRETE:
            if unavailable_reason(candidate, device) is None:
                return candidate
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise BackendUnavailableError(f"ganops backend {name!r} cannot run on {torch.device(device)} tensors: {reason}")
    return name


def build_info() -> dict:
    """Facts of this installation's build (versions, CUDA architectures, whether the compiled
    extension loaded and why not), the runtime torch and triton, and the backends that serve
    each device here."""
    info = _ext.build_facts()
    info["runtime_torch_version"] = torch.__version__
    try:
        import triton
        info["triton_version"] = triton.__version__
    except ImportError:
        info["triton_version"] = None
    info["available_backends"] = {
        "cpu": available_backends("cpu"),
        "cuda": available_backends("cuda") if torch.cuda.is_available() else [],
    }
    return info
