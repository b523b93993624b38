"""Tests of ganops.nn.utils, the mirror of torch.nn.utils, and above all its hook-API
spectral norm (ganops.nn.utils.spectral_norm / remove_spectral_norm).

torch's own hook API is one reference: from the same seed, ganops' module must give torch's
numbers step after step (u, v, the normalised weight, outputs, gradients). The other is the
update written out here in float64: v <- normalize(M^T u), u <- normalize(M v),
sigma = u^T M v, weight = W / sigma.
"""

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ganops
import ganops.nn.utils as gutils
from conftest import backend_params, tol

CPU_BACKENDS = backend_params(devices=("cpu",))


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------

def hook_reference_step(weight, u, v, dim, n_power_iterations, eps=1e-12, training=True):
    """The hook API's forward in float64, written out: (weight / sigma, u, v)."""
    w = weight.detach().double()
    mat = w.movedim(dim, 0).reshape(w.shape[dim], -1)
    u, v = u.double(), v.double()
    if training:
        for _ in range(n_power_iterations):
            v = mat.t() @ u
            v = v / v.norm().clamp_min(eps)
            u = mat @ v
            u = u / u.norm().clamp_min(eps)
    sigma = u @ (mat @ v)
    return w / sigma, u, v


def twin_modules(make, seed, dtype=torch.float64, backend=None, **kwargs):
    """(torch's hook-API module, ganops' hook-API module), equal weights and equal u, v draws."""
    torch.manual_seed(seed)
    base = make().to(dtype)
    theirs, ours = copy.deepcopy(base), copy.deepcopy(base)
    torch.manual_seed(seed + 1)
    torch.nn.utils.spectral_norm(theirs, **kwargs)
    torch.manual_seed(seed + 1)
    gutils.spectral_norm(ours, backend=backend, **kwargs)
    return theirs, ours


LAYERS = {
    "linear": (lambda: nn.Linear(7, 5), (4, 7), {}),
    "conv2d": (lambda: nn.Conv2d(3, 6, 3), (2, 3, 6, 6), {}),
    "convtranspose2d": (lambda: nn.ConvTranspose2d(4, 3, (2, 3)), (2, 4, 3, 3), {}),  # dim 1 by default
    "linear-dim1-2iters": (lambda: nn.Linear(6, 9), (3, 6), {"dim": 1, "n_power_iterations": 2}),
    "conv1d-dim2": (lambda: nn.Conv1d(2, 4, 5), (3, 2, 9), {"dim": 2}),
}


# ---------------------------------------------------------------------------------------
# The namespace
# ---------------------------------------------------------------------------------------

def test_namespace_mirrors_torch_nn_utils():
    for name in ("clip_grad_norm_", "clip_grad_value_", "get_total_norm", "clip_grads_with_norm_",
                 "spectral_norm", "remove_spectral_norm"):
        assert hasattr(torch.nn.utils, name), name
        assert callable(getattr(gutils, name)), name
    assert gutils.clip_grad_norm_ is ganops.clip_grad_norm_
    assert gutils.clip_grad_value_ is ganops.clip_grad_value_
    assert gutils.get_total_norm is ganops.get_total_norm
    assert gutils.clip_grads_with_norm_ is ganops.clip_grads_with_norm_
    assert gutils.parametrizations.spectral_norm is ganops.spectral_norm
    from ganops.nn.utils.parametrizations import spectral_norm as parametrization
    assert parametrization is ganops.nn.spectral_norm
    # The top-level name stays the parametrization.
    assert ganops.spectral_norm is not gutils.spectral_norm


# ---------------------------------------------------------------------------------------
# Registration: the attributes other GAN code reads
# ---------------------------------------------------------------------------------------

def test_registration_layout_and_draws_match_torch():
    theirs, ours = twin_modules(lambda: nn.Conv2d(3, 8, 3), seed=0)
    assert isinstance(ours.weight_orig, nn.Parameter) and "weight_orig" in ours._parameters
    assert "weight_u" in ours._buffers and "weight_v" in ours._buffers
    assert "weight" not in ours._parameters and "weight" not in ours._buffers
    # Before any forward, module.weight is the raw weight's data (no warm-up, no copy).
    assert ours.weight.data_ptr() == ours.weight_orig.data_ptr()
    assert ours.weight_u.shape == (8,) and ours.weight_v.shape == (27,)
    # The same draws as torch from the same seed, bit for bit, and no power iteration yet.
    assert torch.equal(ours.weight_u, theirs.weight_u)
    assert torch.equal(ours.weight_v, theirs.weight_v)
    assert set(ours.state_dict()) == set(theirs.state_dict()) == {"weight_orig", "bias", "weight_u", "weight_v"}


def test_second_registration_raises_either_way():
    m = gutils.spectral_norm(nn.Linear(3, 4))
    with pytest.raises(RuntimeError, match="Cannot register two spectral_norm hooks on the same parameter weight"):
        gutils.spectral_norm(m)
    with pytest.raises(RuntimeError, match="register two spectral_norm hooks"):
        torch.nn.utils.spectral_norm(m)
    t = torch.nn.utils.spectral_norm(nn.Linear(3, 4))
    with pytest.raises(RuntimeError, match="register two spectral_norm hooks"):
        gutils.spectral_norm(t)


def test_bad_arguments_raise_before_any_change():
    m = nn.Linear(3, 4)
    with pytest.raises(ValueError, match="n_power_iterations"):
        gutils.spectral_norm(m, n_power_iterations=0)
    with pytest.raises(IndexError, match="Dimension out of range"):
        gutils.spectral_norm(m, dim=2)
    with pytest.raises(ValueError, match="has no parameter named 'kernel'"):
        gutils.spectral_norm(m, name="kernel")
    with pytest.raises(ValueError, match="eps"):
        gutils.spectral_norm(m, eps=-1.0)
    with pytest.raises(TypeError, match="module must be a torch.nn.Module"):
        gutils.spectral_norm("linear")
    # Nothing was registered by the failed calls.
    assert "weight" in m._parameters and not hasattr(m, "weight_orig") and not m._forward_pre_hooks
    with pytest.raises(ValueError, match="spectral_norm of 'weight' not found"):
        gutils.remove_spectral_norm(m)


# ---------------------------------------------------------------------------------------
# Numbers: torch's hook API and the float64 update written out
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("device,backend", CPU_BACKENDS)
@pytest.mark.parametrize("layer", list(LAYERS))
def test_forward_matches_written_out_update(device, backend, layer):
    make, in_shape, kwargs = LAYERS[layer]
    torch.manual_seed(3)
    m = gutils.spectral_norm(make().double(), backend=backend, **kwargs)
    sn = m._forward_pre_hooks[next(iter(m._forward_pre_hooks))]
    x = torch.randn(in_shape, dtype=torch.float64)
    for _ in range(3):
        expected, u, v = hook_reference_step(m.weight_orig, m.weight_u, m.weight_v, sn.dim, sn.n_power_iterations)
        m(x)
        torch.testing.assert_close(m.weight, expected, **tol(torch.float64))
        torch.testing.assert_close(m.weight_u, u, **tol(torch.float64))
        torch.testing.assert_close(m.weight_v, v, **tol(torch.float64))
    assert sn.dim == kwargs.get("dim", 1 if layer == "convtranspose2d" else 0)


@pytest.mark.parametrize("device,backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layer", list(LAYERS))
def test_training_tracks_torch_hook_api(device, backend, dtype, layer):
    """From one seed, SGD steps with ganops' module give torch's numbers step by step:
    including two forwards before one backward and an eval forward in between."""
    make, in_shape, kwargs = LAYERS[layer]
    theirs, ours = twin_modules(make, seed=5, dtype=dtype, backend=backend, **kwargs)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (theirs, ours)]
    g = torch.Generator().manual_seed(7)
    t = tol(dtype) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    for step in range(6):
        x = torch.randn(in_shape, generator=g, dtype=dtype)
        outs = []
        for m, opt in zip((theirs, ours), opts):
            opt.zero_grad()
            m.train()
            y = m(x)
            if step % 2:
                # Two forwards (two power-iteration updates), then one backward through both.
                y = y + m(x * 0.5)
            m.eval()
            y_eval = m(x)
            (y.square().mean() + y_eval.mean()).backward()
            opt.step()
            outs.append((y.detach(), y_eval.detach(), m.weight.detach(), m.weight_u.clone(), m.weight_v.clone(),
                         m.weight_orig.grad.clone()))
        for name, a, b in zip(("output", "eval output", "weight", "u", "v", "grad"), outs[1], outs[0]):
            torch.testing.assert_close(a, b, **t, msg=lambda m: f"step {step}, {name}: {m}")


def test_eval_mode_leaves_vectors_alone_and_reuses_them():
    theirs, ours = twin_modules(lambda: nn.Linear(6, 4), seed=11)
    x = torch.randn(3, 6, dtype=torch.float64)
    ours(x)
    u, v = ours.weight_u.clone(), ours.weight_v.clone()
    ours.eval()
    y0 = ours(x)
    y1 = ours(x)
    assert torch.equal(ours.weight_u, u) and torch.equal(ours.weight_v, v)
    torch.testing.assert_close(y0, y1, rtol=0, atol=0)
    expected, _, _ = hook_reference_step(ours.weight_orig, u, v, 0, 1, training=False)
    torch.testing.assert_close(ours.weight, expected, **tol(torch.float64))


@pytest.mark.parametrize("device,backend", CPU_BACKENDS)
def test_gradcheck_through_the_hook(device, backend):
    """Gradients w.r.t. weight_orig and the input, with u, v reset before each evaluation
    (training mode updates them) and in eval mode."""
    torch.manual_seed(2)
    m = gutils.spectral_norm(nn.Linear(4, 3).double(), backend=backend)
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    saved_u, saved_v = m.weight_u.clone(), m.weight_v.clone()

    def two_forwards(inp):
        m.weight_u.copy_(saved_u)
        m.weight_v.copy_(saved_v)
        return m(inp) + m(inp * 2)

    assert torch.autograd.gradcheck(two_forwards, (x,))
    m.eval()
    assert torch.autograd.gradcheck(lambda w: m(x), (m.weight_orig,))


# ---------------------------------------------------------------------------------------
# Removal, state dicts, copies
# ---------------------------------------------------------------------------------------

def test_remove_restores_a_parameter_holding_the_normalised_weight():
    torch.manual_seed(4)
    m = gutils.spectral_norm(nn.ConvTranspose2d(3, 4, 3).double())
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    for _ in range(3):
        y = m(x)
    expected, _, _ = hook_reference_step(m.weight_orig, m.weight_u, m.weight_v, 1, 1, training=False)
    gutils.remove_spectral_norm(m)
    assert isinstance(m.weight, nn.Parameter) and m.weight.is_contiguous()
    for attr in ("weight_orig", "weight_u", "weight_v"):
        assert not hasattr(m, attr)
    assert not m._forward_pre_hooks and not m._state_dict_hooks and not m._load_state_dict_pre_hooks
    torch.testing.assert_close(m.weight, expected, **tol(torch.float64))
    torch.testing.assert_close(m(x), y, **tol(torch.float64))
    # Registered again, it works again (the error on a second registration is per hook).
    gutils.spectral_norm(m)
    m(x)


def test_torch_and_ganops_remove_each_others_hooks():
    ours = gutils.spectral_norm(nn.Linear(3, 4))
    torch.nn.utils.remove_spectral_norm(ours)
    assert "weight" in ours._parameters and not hasattr(ours, "weight_orig")
    theirs = torch.nn.utils.spectral_norm(nn.Linear(3, 4))
    gutils.remove_spectral_norm(theirs)
    assert "weight" in theirs._parameters and not hasattr(theirs, "weight_u")
    assert not theirs._forward_pre_hooks


def test_state_dict_moves_both_ways_with_version_metadata():
    theirs, ours = twin_modules(lambda: nn.Linear(5, 3), seed=8)
    x = torch.randn(4, 5, dtype=torch.float64)
    for _ in range(2):
        ours(x)
    state = ours.state_dict()
    assert state._metadata[""]["spectral_norm"] == {"weight.version": 1}
    theirs.load_state_dict(state)
    buffer = io.BytesIO()
    torch.save(theirs.state_dict(), buffer)
    buffer.seek(0)
    fresh = gutils.spectral_norm(nn.Linear(5, 3).double())
    fresh.load_state_dict(torch.load(buffer))
    for m in (theirs, fresh):
        m.eval()
    ours.eval()
    torch.testing.assert_close(fresh(x), theirs(x), **tol(torch.float64))
    torch.testing.assert_close(fresh(x), ours(x), **tol(torch.float64))


@pytest.mark.parametrize("steps", [1, 3])
def test_version_less_checkpoint_migrates(steps):
    """Checkpoints from before the version metadata hold the normalised weight and no v: v is
    solved so that u^T M v gives back the saved sigma, as torch does."""
    theirs, ours = twin_modules(lambda: nn.Linear(4, 6), seed=9)
    x = torch.randn(3, 4, dtype=torch.float64)
    with torch.no_grad():  # training forwards, leaving module.weight a leaf that deepcopy takes
        for _ in range(steps):
            theirs(x)
    old = theirs.state_dict()
    del old._metadata[""]["spectral_norm"]
    del old["weight_v"]
    old["weight"] = theirs.weight.detach().clone()
    sigma = (old["weight_orig"] / old["weight"]).mean()
    ours.load_state_dict(copy.deepcopy(old))
    mat = ours.weight_orig.detach()
    torch.testing.assert_close(ours.weight_u @ (mat @ ours.weight_v), sigma, **tol(torch.float64))
    # The solved v is the least-squares solution of M v = u, up to its scale.
    direction = torch.linalg.lstsq(mat, ours.weight_u.unsqueeze(1)).solution.squeeze(1)
    torch.testing.assert_close(F.normalize(ours.weight_v, dim=0), F.normalize(direction, dim=0), rtol=1e-8, atol=1e-10)
    theirs_loaded = torch.nn.utils.remove_spectral_norm(copy.deepcopy(theirs))
    torch.nn.utils.spectral_norm(theirs_loaded)
    theirs_loaded.load_state_dict(copy.deepcopy(old))
    for m in (ours, theirs_loaded):
        m.eval()
    torch.testing.assert_close(ours(x), theirs_loaded(x), rtol=1e-8, atol=1e-10)
    ours.train()
    theirs_loaded.train()
    torch.testing.assert_close(ours(x), theirs_loaded(x), rtol=1e-8, atol=1e-10)


def test_version_less_checkpoint_missing_keys_are_reported():
    m = gutils.spectral_norm(nn.Linear(4, 6))
    old = m.state_dict()
    del old._metadata[""]["spectral_norm"]
    del old["weight_v"]
    with pytest.raises(RuntimeError, match="Missing key.*weight_v"):
        m.load_state_dict(old)


def test_pickle_and_deepcopy_keep_a_working_hook():
    torch.manual_seed(6)
    m = gutils.spectral_norm(nn.Linear(5, 7).double())
    x = torch.randn(2, 5, dtype=torch.float64)
    with torch.no_grad():
        m(x)
    for clone in (pickle.loads(pickle.dumps(m)), copy.deepcopy(m)):
        assert isinstance(clone, nn.Linear)
        original = copy.deepcopy(m)
        # A training forward on each: the same update from the same state, the same output.
        torch.testing.assert_close(clone(x), original(x), **tol(torch.float64))
        assert torch.equal(clone.weight_u, original.weight_u)
        assert clone.weight_u.data_ptr() != m.weight_u.data_ptr()
        with pytest.raises(RuntimeError, match="register two spectral_norm hooks"):
            gutils.spectral_norm(clone)


def test_deepcopy_after_a_grad_forward_fails_as_in_torch():
    """After a forward with grad enabled, module.weight is a non-leaf tensor, which deepcopy
    refuses: torch's hook API behaves the same, and ganops keeps that contract."""
    theirs, ours = twin_modules(lambda: nn.Linear(5, 7), seed=12)
    x = torch.randn(2, 5, dtype=torch.float64)
    for m in (theirs, ours):
        m(x)
        with pytest.raises(RuntimeError, match="deepcopy"):
            copy.deepcopy(m)
