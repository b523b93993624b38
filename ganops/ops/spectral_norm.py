"""Spectral normalization by power iteration: the functional form behind ganops.spectral_norm.

With W the weight as a matrix (dim first, the rest flattened: rows = size(dim),
cols = numel / rows) and the persistent vectors u (rows), v (cols), one training step runs
``n_power_iterations`` of

    u <- normalize(W v),   v <- normalize(W^T u),     normalize(x) = x / max(|x|, eps)

in place on u and v, then returns W_sn = W / sigma with sigma = u^T W v. Gradients reach W
only (u, v are constants of the step): dW = (G - <G, W_sn> u v^T) / sigma.

The kernels read W twice per power iteration and take sigma from the norm they already
have (with v = normalize(W^T u), u^T W v = |W^T u|^2 / max(|W^T u|, eps)) instead of a third
matrix-vector product; one more pass writes W / sigma. The backward is two passes: <G, W>,
then dW. Half-precision weights accumulate in float32 and their sigma is float32; u and v
keep the weight's dtype, like torch's buffers.

Registered ops (ganops._library): ``spectral_norm_forward_`` (power iteration in place, sigma
and W / sigma in one call) and ``spectral_norm_backward``, each with a CPU, a CUDA and a
Triton kernel; the autograd Function _SpectralNormalize joins them. The ``torch`` backend is
the reference below, torch's own parametrization math.
"""

from __future__ import annotations

import torch

from ganops import _library
from ganops._checks import FLOAT_DTYPES, acc_dtype, check_number, check_tensor
from ganops._distributed import is_dtensor

# Complex weights (torch's parametrization takes them) are served by the reference on every
# backend: the kernels are real.
_COMPLEX_DTYPES = (torch.complex64, torch.complex128)


# ---------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------

def check_dim(dim, ndim: int) -> int:
    """dim normalised to [0, ndim); torch's IndexError when out of range."""
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    if dim >= ndim or dim < -ndim:
        raise IndexError(f"Dimension out of range (expected to be in range of [-{ndim}, {ndim - 1}] but got {dim})")
    return dim + ndim if dim < 0 else dim


def check_n_power_iterations(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n_power_iterations must be an int, got {type(n).__name__}")
    if n <= 0:
        raise ValueError(f"Expected n_power_iterations to be positive, but got n_power_iterations={n}")
    return n


def check_eps(eps) -> float:
    return check_number(eps, "eps", minimum=0.0)


def check_weight(weight, name: str = "weight") -> None:
    check_tensor(weight, name, dtypes=FLOAT_DTYPES + _COMPLEX_DTYPES, what="weights")
    if is_dtensor(weight):
        # A sharded weight (FSDP2's fully_shard registers DTensor parameters) has no power
        # iteration of its own: u and v belong to the whole matrix. Registered before
        # fully_shard, the parametrization sees the weight FSDP2 gathers for each forward and
        # every rank runs the same iteration on replicated u, v (tests/test_distributed.py).
        raise TypeError(f"{name} is a DTensor (sharded, e.g. by FSDP2's fully_shard); ganops' spectral norm "
                        f"needs the full weight: apply ganops.spectral_norm to the module before fully_shard, "
                        f"or pass {name}.full_tensor() to spectral_normalize")
    if weight.dim() == 0:
        raise ValueError(f"{name} must have at least 1 dimension, got a 0-D tensor")
    if weight.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(weight.shape)}")


def _check_vector(x, name: str, size: int, weight: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.dim() != 1 or x.numel() != size:
        raise ValueError(f"{name} must be 1-D with {size} elements for a weight of shape "
                         f"{tuple(weight.shape)} and this dim, got shape {tuple(x.shape)}")
    if x.dtype != weight.dtype:
        raise TypeError(f"{name} must have the weight's dtype {weight.dtype}, got {x.dtype}")
    if x.device != weight.device:
        raise ValueError(f"{name} must be on the weight's device {weight.device}, got {x.device}")
    if x.requires_grad:
        raise ValueError(f"{name} is updated in place by the power iteration and must not require grad")


def matrix_size(weight: torch.Tensor, dim: int) -> tuple[int, int]:
    """(rows, cols) of the weight as a matrix with ``dim`` first."""
    rows = weight.shape[dim]
    return rows, weight.numel() // rows


# ---------------------------------------------------------------------------------------
# The reference (the `torch` backend): torch.nn.utils.parametrizations.spectral_norm's math
# ---------------------------------------------------------------------------------------

def _dim_first(ndim: int, dim: int) -> list[int]:
    return [dim] + [d for d in range(ndim) if d != dim]


def as_matrix(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """weight.permute(dim, ...).flatten(1), as torch's parametrization builds it."""
    if dim != 0:
        weight = weight.permute(_dim_first(weight.dim(), dim))
    return weight.flatten(1)


def from_matrix(mat: torch.Tensor, shape: torch.Size, dim: int) -> torch.Tensor:
    """The inverse of as_matrix: the (rows, cols) matrix back in a weight of ``shape``."""
    order = _dim_first(len(shape), dim)
    return mat.reshape([shape[d] for d in order]).permute([order.index(d) for d in range(len(shape))])


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype for real weights; complex weights compute in their own."""
    return dtype if dtype in _COMPLEX_DTYPES else acc_dtype(dtype)


def normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / max(|x|, eps), torch.nn.functional.normalize's formula with eps taken in x's
    precision: an eps beyond float32's range is inf there, as in the kernels, where
    F.normalize would refuse to convert it. A NaN norm stays NaN."""
    norm = torch.linalg.vector_norm(x)
    return x / torch.maximum(norm, norm.new_tensor(eps))


def spectral_normalize_reference(weight, u, v, n_power_iterations: int, eps: float, dim: int,
                                 training: bool):
    """Pure-PyTorch spectral normalization: (weight / sigma, sigma), u and v updated in place.

    Half types are computed in float32 (u and v are read from and written to their buffers
    in the weight's dtype each half-step, as the kernels do). Complex weights use the
    conjugate transpose, v <- normalize(W^H u), and sigma = u^H W v (complex, real up to
    rounding), as torch's parametrization.
    """
    acc = _compute_dtype(weight.dtype)
    mat = as_matrix(weight.to(acc), dim)
    if training:
        with torch.no_grad():
            detached = mat.detach()
            for _ in range(n_power_iterations):
                u.copy_(normalize(torch.mv(detached, v.to(acc)), eps))
                v.copy_(normalize(torch.mv(detached.mH, u.to(acc)), eps))
    # Copies, so that a later step's in-place update leaves this step's backward intact.
    u_used = u.to(acc, copy=True)
    v_used = v.to(acc, copy=True)
    sigma = torch.vdot(u_used, torch.mv(mat, v_used))
    return (weight.to(acc) / sigma).to(weight.dtype), sigma


def spectral_norm_forward_reference(weight, u, v, dim: int, n_power_iterations: int, eps: float):
    """The forward op in torch ops: (weight / sigma, sigma, u used, v used), u and v iterated
    in place; n_power_iterations = 0 is eval mode."""
    weight_sn, sigma = spectral_normalize_reference(weight, u, v, n_power_iterations, eps, dim, n_power_iterations > 0)
    return weight_sn, sigma, u.clone(), v.clone()


def spectral_norm_backward_reference(grad, grad_sigma, weight, u, v, sigma, dim: int) -> torch.Tensor:
    """The backward op in torch ops: dW = G / sigma - (<G, W> / sigma^2 - grad_sigma) u v^T, in
    sigma's dtype, on the matrix view and back to the weight's layout."""
    acc = sigma.dtype
    g = as_matrix(grad.to(acc), dim)
    coef = (g * as_matrix(weight.to(acc), dim)).sum() / (sigma * sigma)
    if grad_sigma is not None:
        coef = coef - grad_sigma
    d = g / sigma - coef * torch.outer(u.to(acc), v.to(acc))
    return from_matrix(d, weight.shape, dim).to(weight.dtype).contiguous()


# ---------------------------------------------------------------------------------------
# Registered ops. u and v are updated in place by the forward op, so the differentiable
# function is an autograd.Function (_SpectralNormalize) rather than a registered autograd
# formula: torch.library's autograd registration does not take ops that mutate their inputs.
# ---------------------------------------------------------------------------------------

def _vectors(weight: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = matrix_size(weight, dim)
    u = torch.nn.functional.normalize(torch.randn(rows, dtype=weight.dtype, device=weight.device), dim=0)
    v = torch.nn.functional.normalize(torch.randn(cols, dtype=weight.dtype, device=weight.device), dim=0)
    return u, v


def _weights(device, dtype):
    # 2-D, a conv weight normalised along dim 0 and along dim 1, rows past one row chunk, a
    # weight large enough for the CPU kernels to split every pass across threads, and a 2-D
    # weight read with dim 1 (stored transposed, as the hook API reads every weight) with
    # rows past one CPU row block and columns past one row chunk of the stored matrix.
    shapes_dims = [((8, 6), 0), ((6, 4, 3, 3), 0), ((4, 6, 3, 3), 1), ((130, 5), 0), ((64, 2048), 0),
                   ((300, 600), 1)]
    return [(torch.randn(shape, device=device, dtype=dtype), dim) for shape, dim in shapes_dims]


def _forward_examples(device, dtype):
    return [(w, *_vectors(w, dim), dim, n, 1e-12) for (w, dim), n in zip(_weights(device, dtype), (1, 3, 0, 1, 2, 1))]


def _backward_examples(device, dtype):
    out = []
    for (w, dim), with_grad_sigma in zip(_weights(device, dtype), (False, True, True, False, True, True)):
        u, v = _vectors(w, dim)
        _, sigma, u, v = spectral_norm_forward_reference(w, u, v, dim, 2, 1e-12)
        grad_sigma = torch.randn((), device=device, dtype=sigma.dtype) if with_grad_sigma else None
        out.append((torch.randn_like(w), grad_sigma, w, u, v, sigma, dim))
    return out


FORWARD = _library.define(
    "spectral_norm_forward_", "(Tensor weight, Tensor(a!) u, Tensor(b!) v, int dim, int n_power_iterations, "
    "float eps) -> (Tensor, Tensor, Tensor, Tensor)",
    fake=lambda weight, u, v, dim, n_power_iterations, eps: (
        weight.new_empty(weight.shape), weight.new_empty((), dtype=acc_dtype(weight.dtype)),
        u.new_empty(u.shape), v.new_empty(v.shape)),
    reference=spectral_norm_forward_reference, triton="spectral_norm.spectral_norm_forward_",
    examples=_forward_examples)

BACKWARD = _library.define(
    "spectral_norm_backward", "(Tensor grad, Tensor? grad_sigma, Tensor weight, Tensor u, Tensor v, Tensor sigma, "
    "int dim) -> Tensor",
    fake=lambda grad, grad_sigma, weight, u, v, sigma, dim: weight.new_empty(weight.shape),
    reference=spectral_norm_backward_reference, triton="spectral_norm.spectral_norm_backward",
    examples=_backward_examples)


class _SpectralNormalize(torch.autograd.Function):
    """(W / sigma, sigma) with sigma = u^T W v; u, v updated in place, constants of the gradient.

    One autograd node around one forward op: the module's forward costs one dispatch, which
    is most of the time on small layers (64 x 48: the ops themselves take a few microseconds).
    """

    @staticmethod
    def forward(ctx, weight, u, v, n_power_iterations, eps, dim, kernels):
        weight_sn, sigma, u_used, v_used = kernels.spectral_norm_forward_(weight, u, v, dim, n_power_iterations, eps)
        ctx.save_for_backward(weight, u_used, v_used, sigma)
        ctx.dim = dim
        ctx.backward_op = kernels.spectral_norm_backward
        return weight_sn, sigma

    @staticmethod
    def backward(ctx, grad_weight_sn, grad_sigma):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None, None
        weight, u, v, sigma = ctx.saved_tensors
        if grad_weight_sn is None:
            grad_weight_sn = torch.zeros_like(weight)
        grad_weight = ctx.backward_op(grad_weight_sn, grad_sigma, weight, u, v, sigma, ctx.dim)
        return grad_weight, None, None, None, None, None, None


def power_iteration_(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, n_power_iterations: int,
                     eps: float, dim: int, backend: str | None = None) -> None:
    """n_power_iterations of the power method on u, v in place (the registration warm-up)."""
    with torch.no_grad():
        normalize_unchecked(weight, u, v, n_power_iterations, eps, dim, True, backend)


def normalize_unchecked(weight, u, v, n_power_iterations: int, eps: float, dim: int, training: bool,
                        backend: str | None):
    """spectral_normalize for arguments already checked (the module checks them once)."""
    kernels = _library.kernels(backend, weight.device)
    if kernels is None or weight.is_complex():
        return spectral_normalize_reference(weight, u, v, n_power_iterations, eps, dim, training)
    return _SpectralNormalize.apply(weight, u, v, n_power_iterations if training else 0, eps, dim, kernels)


# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------

def spectral_normalize(weight: torch.Tensor, u: torch.Tensor | None, v: torch.Tensor | None, *,
                       n_power_iterations: int = 1, eps: float = 1e-12, dim: int = 0, training: bool = True,
                       backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Spectral normalization of ``weight`` with caller-held power-iteration vectors.

    Returns ``(weight_sn, sigma)``, weight_sn = weight / sigma with the weight's shape and
    dtype. With W = weight.permute(dim, ...).flatten(1) of shape (rows, cols), ``u`` has
    shape (rows,) and ``v`` (cols,), both of the weight's dtype (torch's ``_u``/``_v``
    buffers). In training, ``n_power_iterations`` of u <- normalize(W v),
    v <- normalize(W^T u) update u and v in place (no autograd through them); then
    sigma = u^T W v, differentiable in W with u, v held constant. ``training=False`` leaves
    u and v alone. sigma is float32 for half weights, else the weight's dtype. A 1-D weight is
    simply normalised: weight_sn = weight / max(|weight|, eps), and u, v are ignored.

    Complex weights (complex64, complex128) work as in torch's parametrization: the power
    iteration uses the conjugate transpose and sigma = u^H W v is complex. They are computed
    by the pure-PyTorch reference whatever ``backend`` says: the kernels are real-only.
    """
    check_weight(weight)
    n = check_n_power_iterations(n_power_iterations)
    eps = check_eps(eps)
    if weight.dim() == 1:
        norm = torch.linalg.vector_norm(weight.to(_compute_dtype(weight.dtype)))
        return normalize(weight, eps), torch.maximum(norm, norm.new_tensor(eps))
    dim = check_dim(dim, weight.dim())
    rows, cols = matrix_size(weight, dim)
    _check_vector(u, "u", rows, weight)
    _check_vector(v, "v", cols, weight)
    return normalize_unchecked(weight, u, v, n, eps, dim, training, backend)
