"""Loading the compiled extensions and the facts of their build (imports nothing else of
ganops: _backend builds on it).

Two modules, both on LibTorch's stable ABI (they load beside any torch from the one they
target, 2.11, up to the next major) and CPython's limited API:

- ``ganops._C``, the C++ CPU kernels: loaded first, beside any torch, a CPU-only one too;
- ``ganops._C_cuda``, the CUDA kernels: loaded only beside a torch built for the CUDA major
  version they were compiled with (a wheel is built per CUDA major, ``+cu13``).

``import ganops`` never fails because of them: when one is missing or does not load, ganops
warns once, says why, and the ``cpp`` backend is unavailable on that device (every device
without ``ganops._C``, CUDA tensors without ``ganops._C_cuda``); ``triton`` and ``torch``
still serve. Importing a module registers its kernels; the ops' schemas are the registry's
(ganops/_library.py), defined once ``load()`` has said the kernels are there.
"""

from __future__ import annotations

import importlib
import re
import warnings

import torch

_loaded: bool | None = None
_load_error: str | None = None
_cuda_error: str | None = None


def _build_info_module():
    try:
        from ganops._build_info import BUILD_INFO
    except ImportError:
        return None
    return dict(BUILD_INFO)


def _release(version: str) -> tuple[int, ...]:
    """(2, 11) from "2.11", "2.11.0+cu130" or "2.12.0a0+git..."."""
    return tuple(int(re.match(r"\d*", piece).group() or 0) for piece in version.split("+")[0].split(".")[:2])


def _warn(message: str) -> None:
    warnings.warn(f"ganops: {message}", RuntimeWarning, stacklevel=4)


def _cuda_problem(info: dict) -> tuple[str | None, bool]:
    """Why ganops._C_cuda is not to be loaded here, or None; and whether to warn about it
    (a mismatch is worth a warning; a CPU-only torch or a build without CUDA kernels is not)."""
    if not info.get("cuda_kernels"):
        return f"ganops was built without its CUDA kernels ({info.get('cuda_kernels_reason')})", False
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build", False
    built_for = info.get("cuda_major")
    runtime = int(torch.version.cuda.split(".")[0])
    if built_for != runtime:
        return (f"the CUDA kernels were built for CUDA {built_for} but torch {torch.__version__} is built for "
                f"CUDA {torch.version.cuda}; install the ganops build for CUDA {runtime} (+cu{runtime}), or "
                f"build ganops from source against this torch"), True
    return None, False


def load() -> bool:
    """Imports ganops._C once, and ganops._C_cuda where it can serve. Returns whether the CPU
    kernels are registered (has_cuda_kernels says whether the CUDA ones are)."""
    global _loaded, _load_error, _cuda_error
    if _loaded is not None:
        return _loaded
    info = _build_info_module()
    min_torch = info.get("min_torch") if info else None
    if min_torch is not None and _release(torch.__version__) < _release(min_torch):
        _load_error = (f"the compiled kernels need torch >= {min_torch} (the stable ABI they were built on), "
                       f"but torch {torch.__version__} is installed")
    else:
        try:
            importlib.import_module("ganops._C")
        except (ImportError, OSError) as exc:
            _load_error = f"the compiled extension ganops._C could not be loaded: {exc}"
    _loaded = _load_error is None
    if not _loaded:
        _cuda_error = _load_error
        _warn(f"{_load_error}. Only the 'triton' and 'torch' backends are available.")
        return _loaded
    _cuda_error, worth_a_warning = _cuda_problem(info or {})
    if _cuda_error is None:
        try:
            importlib.import_module("ganops._C_cuda")
        except (ImportError, OSError) as exc:
            _cuda_error, worth_a_warning = f"the CUDA kernels' extension ganops._C_cuda could not be loaded: {exc}", True
    if _cuda_error is not None and worth_a_warning:
        _warn(f"{_cuda_error}. The 'cpp' backend serves CPU tensors only; on CUDA tensors 'triton' and 'torch' "
              f"serve.")
    return _loaded


def load_error() -> str | None:
    """Why the CPU kernels did not load, or None."""
    load()
    return _load_error


def has_cuda_kernels() -> bool:
    """Whether the CUDA kernels are loaded and serve this torch."""
    return load() and _cuda_error is None


def cuda_load_error() -> str | None:
    """Why the CUDA kernels do not serve here, or None."""
    load()
    return _cuda_error


def build_facts() -> dict:
    """Facts of this installation's build (versions, CUDA architectures) and whether the
    extensions loaded; ganops.build_info adds what can run here."""
    info = _build_info_module() or {"version": None, "torch_version": None, "torch_cuda_version": None,
                                    "cuda_kernels": False, "cuda_kernels_reason": "not built", "cuda_major": None,
                                    "min_torch": None, "nvcc_version": None, "cuda_arch_list": ""}
    info["extension_loaded"] = load()
    info["extension_error"] = _load_error
    info["cuda_kernels_loaded"] = has_cuda_kernels()
    info["cuda_kernels_error"] = _cuda_error
    return info
