"""Loading the compiled extension ``ganops._C`` and the facts of its build (imports nothing
else of ganops: _backend builds on it).

``import ganops`` never fails because of the extension: when it is missing or does not
load (most often a torch other than the one it was built against), ganops warns once,
says why, and the ``cpp`` backend is unavailable; ``triton`` and ``torch`` still serve.
"""

from __future__ import annotations

import importlib
import warnings

import torch

_loaded: bool | None = None
_load_error: str | None = None


def _build_info_module():
    try:
        from ganops._build_info import BUILD_INFO
    except ImportError:
        return None
    return dict(BUILD_INFO)


def load() -> bool:
    """Imports ganops._C once. Returns whether its kernels are registered."""
    global _loaded, _load_error
    if _loaded is not None:
        return _loaded
    info = _build_info_module()
    built_for = info["torch_version"] if info else None
    if built_for is not None and built_for != torch.__version__:
        _load_error = (f"the compiled kernels were built against torch {built_for} but torch "
                       f"{torch.__version__} is installed; install torch {built_for}, or a ganops "
                       f"built against this torch")
    else:
        try:
            importlib.import_module("ganops._C")
        except (ImportError, OSError) as exc:
            _load_error = f"the compiled extension ganops._C could not be loaded: {exc}"
    _loaded = _load_error is None
    if not _loaded:
        warnings.warn(f"ganops: {_load_error}. Only the 'triton' and 'torch' backends are "
                      f"available.", RuntimeWarning, stacklevel=3)
    return _loaded


def load_error() -> str | None:
    """Why the extension did not load, or None."""
    load()
    return _load_error


def has_cuda_kernels() -> bool:
    info = _build_info_module()
    return bool(load() and info and info["cuda_kernels"])


def build_facts() -> dict:
    """Facts of this installation's build (versions, CUDA architectures) and whether the
    extension loaded; ganops.build_info adds what can run here."""
    info = _build_info_module() or {"version": None, "torch_version": None, "torch_cuda_version": None,
                                    "cuda_kernels": False, "cuda_kernels_reason": "not built",
                                    "nvcc_version": None, "cuda_arch_list": ""}
    info["extension_loaded"] = load()
    info["extension_error"] = _load_error
    return info
