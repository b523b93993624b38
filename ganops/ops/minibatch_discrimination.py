"""Minibatch-discrimination similarity (Salimans et al. 2016, "Improved Techniques for
Training GANs"), with a backward that is itself differentiable.

For M of shape (N, B, C) (N samples, B kernels of C dimensions each):

    o[i, b] = Σ_j exp(−‖M[i,b,:] − M[j,b,:]‖₁)                       o: (N, B)

with j = i left out when ``exclude_self`` (the term is always 1). The kernels never hold
the N×N×B×C differences nor the N×N×B similarities: each (i, b) row loops over j with the
reduction over c in registers, so memory is O(N·B·C). The backward recomputes the
similarities K[i,j,b] instead of storing them:

    dM[i,b,c] = −Σ_j (g[i,b] + g[j,b]) K[i,j,b] sign(M[i,b,c] − M[j,b,c])

and is a registered op with its own autograd formula, so gradient penalties (WGAN-GP, R1),
which differentiate through the critic twice, work through this layer. With h the gradient
flowing into dM and Q[i,j,b] = Σ_c (h[i,b,c] − h[j,b,c]) sign(M[i,b,c] − M[j,b,c]):

    d/dg[i,b]   = −Σ_j K Q
    d/dM[i,b,c] =  Σ_j (g[i,b] + g[j,b]) K Q sign(M[i,b,c] − M[j,b,c])

(sign has derivative 0 almost everywhere). That double backward is one fused op; it is not
differentiable again (third derivatives raise).

Registered ops (ganops._library): ``minibatch_discrimination``, ``minibatch_discrimination_backward``,
``minibatch_discrimination_double_backward``, each with a CPU, a CUDA and a Triton kernel; the
``torch`` backend is the broadcast reference below.
"""

from __future__ import annotations

import torch

from ganops import _library
from ganops._checks import check_bool, check_tensor


def _check_M(M) -> None:
    check_tensor(M, "M")
    if M.dim() != 3:
        raise ValueError(f"M must be 3-D (N samples, B kernels, C kernel dims), got shape {tuple(M.shape)}")
    if M.shape[0] == 0:
        raise ValueError(f"M must hold at least one sample (N = M.shape[0] >= 1), got shape {tuple(M.shape)}")


# ---------------------------------------------------------------------------------------
# The reference (the `torch` backend)
# ---------------------------------------------------------------------------------------

def minibatch_discrimination_reference(M: torch.Tensor, exclude_self: bool = True) -> torch.Tensor:
    """Pure-PyTorch o (N, B) by broadcasting: holds the N×N×B×C differences, computes in
    M's dtype (float32 for half types, as the kernels accumulate), and is differentiable any
    number of times by autograd.

    The self term j = i carries no gradient (its distance is 0 whatever M is), as in the
    kernels: its differences are zeroed before autograd sees them, so an infinite entry's
    NaN self-difference (inf − inf) cannot reach the gradient through 0 · NaN. Its value,
    kept with ``exclude_self=False``, is computed apart and detached: NaN for a non-finite
    row, as the kernels give, else 1."""
    if M.dtype in (torch.float16, torch.bfloat16):
        # Sums of N exponentials and their double backward lose too much in a 8-bit mantissa.
        return minibatch_discrimination_reference(M.float(), exclude_self).to(M.dtype)
    diff = M.unsqueeze(1) - M.unsqueeze(0)
    eye = torch.eye(M.shape[0], dtype=torch.bool, device=M.device)
    diff = diff.masked_fill(eye[:, :, None, None], 0)
    K = torch.exp(-diff.abs().sum(-1)).masked_fill(eye.unsqueeze(-1), 0)
    o = K.sum(1)
    if not exclude_self:
        o = o + torch.exp(-(M - M).abs().sum(-1)).detach()
    return o


def minibatch_discrimination_backward_reference(grad: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """dM: the vector-Jacobian product of the reference with ``grad`` (either exclude_self)."""
    with torch.enable_grad():
        M = M.detach().requires_grad_(True)
        (dM,) = torch.autograd.grad(minibatch_discrimination_reference(M), M, grad)
    return dM


def minibatch_discrimination_double_backward_reference(grad_grad_M: torch.Tensor, grad: torch.Tensor,
                                                   M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d/d grad, d/d M) of <grad_grad_M, dM(grad, M)>, by autograd through the reference."""
    with torch.enable_grad():
        M = M.detach().requires_grad_(True)
        grad = grad.detach().requires_grad_(True)
        (dM,) = torch.autograd.grad(minibatch_discrimination_reference(M), M, grad, create_graph=True)
        d_grad, d_M = torch.autograd.grad(dM, (grad, M), grad_grad_M, allow_unused=True)
    return d_grad, torch.zeros_like(M) if d_M is None else d_M


# ---------------------------------------------------------------------------------------
# Registered ops: the forward's backward is the backward op, whose own backward is the
# double-backward op, each on the backend being differentiated
# ---------------------------------------------------------------------------------------

def _contiguous_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*(t for t in inputs if isinstance(t, torch.Tensor)))


def _forward_grad(kernels, ctx, grad):
    (M,) = ctx.saved_tensors
    return kernels.minibatch_discrimination_backward(grad, M), None


def _backward_grad(kernels, ctx, grad_grad_M):
    grad, M = ctx.saved_tensors
    return tuple(kernels.minibatch_discrimination_double_backward(grad_grad_M, grad, M))


def _M_examples(device, dtype):
    # N = 70 spans several of the CPU kernel's row blocks; (1, 3, 2) a single sample.
    return [torch.randn(shape, device=device, dtype=dtype) for shape in [(6, 5, 4), (70, 3, 5), (1, 3, 2)]]


MINIBATCH_DISCRIMINATION = _library.define(
    "minibatch_discrimination", "(Tensor M, bool exclude_self) -> Tensor",
    fake=lambda M, exclude_self: M.new_empty(M.shape[:2]),
    reference=minibatch_discrimination_reference, triton="minibatch_discrimination.minibatch_discrimination",
    backward=_forward_grad, setup_context=_save_inputs,
    examples=lambda device, dtype: [(M.requires_grad_(), exclude_self) for M in _M_examples(device, dtype)
                                    for exclude_self in (True, False)])

MINIBATCH_DISCRIMINATION_BACKWARD = _library.define(
    "minibatch_discrimination_backward", "(Tensor grad, Tensor M) -> Tensor",
    fake=lambda grad, M: _contiguous_like(M),
    reference=minibatch_discrimination_backward_reference, triton="minibatch_discrimination.minibatch_discrimination_backward",
    backward=_backward_grad, setup_context=_save_inputs,
    examples=lambda device, dtype: [(torch.randn(M.shape[:2], device=device, dtype=dtype).requires_grad_(),
                                     M.requires_grad_()) for M in _M_examples(device, dtype)])

MINIBATCH_DISCRIMINATION_DOUBLE_BACKWARD = _library.define(
    "minibatch_discrimination_double_backward", "(Tensor grad_grad_M, Tensor grad, Tensor M) -> (Tensor, Tensor)",
    fake=lambda grad_grad_M, grad, M: (_contiguous_like(grad), _contiguous_like(M)),
    reference=minibatch_discrimination_double_backward_reference,
    triton="minibatch_discrimination.minibatch_discrimination_double_backward",
    examples=lambda device, dtype: [(torch.randn_like(M), torch.randn(M.shape[:2], device=device, dtype=dtype), M)
                                    for M in _M_examples(device, dtype)])


# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------

def minibatch_similarity(M: torch.Tensor, *, exclude_self: bool = True, backend: str | None = None) -> torch.Tensor:
    """o[i, b] = Σ_j exp(−‖M[i,b,:] − M[j,b,:]‖₁) for M of shape (N, B, C); returns (N, B).

    ``exclude_self=True`` leaves out j = i (equal to subtracting the constant 1, the usual
    modern choice and torchgan's); ``False`` keeps it, as the paper writes it. Gradients are
    the same either way, and differentiable twice (gradient penalties through the critic).
    Half types accumulate in float32. Memory O(N·B·C) on the ``cpp`` and ``triton``
    backends; ``backend`` picks the implementation (see ganops.use_backend).
    """
    _check_M(M)
    exclude_self = check_bool(exclude_self, "exclude_self")
    return _library.call(MINIBATCH_DISCRIMINATION, backend, M.device, M, exclude_self)
