"""The backend system: how a call picks cpp, triton or torch, what happens when one cannot
serve, and what the installation reports about itself."""

import ast
import inspect
import warnings

import pytest
import torch

import ganops
from ganops import _backend, _ext
from ganops.ops import clip_grad_norm as clip_hub


def make_params(shapes):
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.zeros(shape))
        p.grad = torch.randn(shape)
        params.append(p)
    return params


def _ganops_imports(module) -> set[str]:
    """The ganops modules ``module`` imports, at any depth of its source."""
    tree = ast.parse(inspect.getsource(module))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "ganops":
            out |= {f"ganops.{a.name}" for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ganops."):
            out.add(node.module)
    return out


def test_loading_and_choosing_import_no_other_ganops_module():
    """_ext (loading the extension) builds on nothing of ganops but its build facts, and
    _backend (choosing a backend) on _ext alone: no import circle, every op builds on them."""
    assert _ganops_imports(_ext) == {"ganops._build_info"}
    assert _ganops_imports(_backend) == {"ganops._ext"}


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
    monkeypatch.setattr(clip_hub.MULTI_TENSOR_NORM, "reference",
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


def _reload_extension_state(monkeypatch, **build_info):
    """_ext as on a fresh import, with these build facts changed: load() decides again (the
    modules themselves stay imported)."""
    monkeypatch.setattr(_ext, "_loaded", None)
    monkeypatch.setattr(_ext, "_load_error", None)
    monkeypatch.setattr(_ext, "_cuda_error", None)
    info = dict(_ext._build_info_module() or {}, **build_info)
    monkeypatch.setattr(_ext, "_build_info_module", lambda: dict(info))


def test_missing_extension_warns_once_and_falls_back(monkeypatch):
    # A torch older than the stable ABI the kernels target.
    _reload_extension_state(monkeypatch, min_torch="99.0")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not _ext.load()
        assert not _ext.load()
    assert len(caught) == 1 and "need torch >= 99.0" in str(caught[0].message)
    assert "cpp" not in ganops.available_backends("cpu")
    with pytest.raises(ganops.BackendUnavailableError, match="99.0"):
        ganops.clip_grad_norm_(make_params([(3,)]), 1.0, backend="cpp")
    params = make_params([(3,)])
    ganops.clip_grad_norm_(params, 1.0)  # auto still serves


@pytest.mark.skipif(not _ext.load(), reason="the compiled extension is not built")
def test_cuda_kernels_of_another_cuda_major_warn_and_leave_the_cpu_kernels_serving(monkeypatch):
    """A wheel is built per CUDA major: beside a torch of another one, its CUDA kernels stay
    unloaded, with a warning that names both, and its CPU kernels serve."""
    _reload_extension_state(monkeypatch, cuda_kernels=True, cuda_major=13)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _ext.load()
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "built for CUDA 13" in messages[0] and "CUDA 12.8" in messages[0], messages
    assert not _ext.has_cuda_kernels()
    assert "cpp" in ganops.available_backends("cpu")
    assert "built for CUDA 13" in _backend.unavailable_reason("cpp", "cuda")


@pytest.mark.skipif(not _ext.load(), reason="the compiled extension is not built")
def test_cuda_kernels_are_not_asked_for_beside_a_cpu_torch(monkeypatch):
    """Beside a CPU-only torch there is nothing to warn about: the CUDA kernels simply do not
    serve, and the reason says so."""
    _reload_extension_state(monkeypatch, cuda_kernels=True, cuda_major=13)
    monkeypatch.setattr(torch.version, "cuda", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _ext.load()
    assert not [w for w in caught if "ganops" in str(w.message)]
    assert not _ext.has_cuda_kernels()
    assert "is not a CUDA build" in _ext.cuda_load_error()


def test_build_info():
    info = ganops.build_info()
    for key in ("torch_version", "cuda_kernels", "cuda_arch_list", "available_backends", "extension_loaded"):
        assert key in info
    if info["cuda_kernels"]:
        assert "9.0" in info["cuda_arch_list"]
