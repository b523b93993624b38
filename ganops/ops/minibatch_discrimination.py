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

Registered ops: ``ganops::minibatch_similarity``, ``ganops::minibatch_similarity_backward``,
``ganops::minibatch_similarity_double_backward`` (cpp: CPU and CUDA kernels) and the same
names with a ``_triton`` suffix. The ``torch`` backend is the broadcast reference below.
"""

from __future__ import annotations

import torch

from ganops import _backend, _ext

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_M(M) -> None:
    if not isinstance(M, torch.Tensor):
        raise TypeError(f"M must be a tensor, got {type(M).__name__}")
    if M.layout != torch.strided:
        raise TypeError(f"M is a {M.layout} tensor; ganops supports dense tensors only")
    if M.dim() != 3:
        raise ValueError(f"M must be 3-D (N samples, B kernels, C kernel dims), got shape {tuple(M.shape)}")
    if M.shape[0] == 0:
        raise ValueError(f"M must hold at least one sample (N = M.shape[0] >= 1), got shape {tuple(M.shape)}")
    if M.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"M has dtype {M.dtype}; ganops supports float16, bfloat16, float32 and float64")


def _check_exclude_self(exclude_self) -> bool:
    if not isinstance(exclude_self, bool):
        raise TypeError(f"exclude_self must be a bool, got {type(exclude_self).__name__}")
    return exclude_self


# ---------------------------------------------------------------------------------------
# The reference (the `torch` backend)
# ---------------------------------------------------------------------------------------

def minibatch_similarity_reference(M: torch.Tensor, exclude_self: bool = True) -> torch.Tensor:
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
        return minibatch_similarity_reference(M.float(), exclude_self).to(M.dtype)
    diff = M.unsqueeze(1) - M.unsqueeze(0)
    eye = torch.eye(M.shape[0], dtype=torch.bool, device=M.device)
    diff = diff.masked_fill(eye[:, :, None, None], 0)
    K = torch.exp(-diff.abs().sum(-1)).masked_fill(eye.unsqueeze(-1), 0)
    o = K.sum(1)
    if not exclude_self:
        o = o + torch.exp(-(M - M).abs().sum(-1)).detach()
    return o


# ---------------------------------------------------------------------------------------
# Registered ops: fake impls, Triton ops around their launchers, autograd
# ---------------------------------------------------------------------------------------

def _similarity_fake(M, exclude_self):
    return M.new_empty(M.shape[:2])


def _backward_fake(grad, M):
    return torch.empty_like(M, memory_format=torch.contiguous_format)


def _double_backward_fake(grad_grad_M, grad, M):
    return (torch.empty_like(grad, memory_format=torch.contiguous_format),
            torch.empty_like(M, memory_format=torch.contiguous_format))


@torch.library.custom_op("ganops::minibatch_similarity_triton", mutates_args=())
def _similarity_triton(M: torch.Tensor, exclude_self: bool) -> torch.Tensor:
    from ganops.triton_kernels import minibatch_discrimination as kernels
    return kernels.similarity(M, exclude_self)


@torch.library.custom_op("ganops::minibatch_similarity_backward_triton", mutates_args=())
def _similarity_backward_triton(grad: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    from ganops.triton_kernels import minibatch_discrimination as kernels
    return kernels.similarity_backward(grad, M)


@torch.library.custom_op("ganops::minibatch_similarity_double_backward_triton", mutates_args=())
def _similarity_double_backward_triton(grad_grad_M: torch.Tensor, grad: torch.Tensor,
                                       M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from ganops.triton_kernels import minibatch_discrimination as kernels
    return kernels.similarity_double_backward(grad_grad_M, grad, M)


def _register(suffix: str, define_fake: bool) -> None:
    """Fake impls and autograd for one backend's three ops: the forward's backward calls the
    backward op, whose own backward calls the double-backward op."""
    fwd = f"ganops::minibatch_similarity{suffix}"
    bwd = f"ganops::minibatch_similarity_backward{suffix}"
    dbwd = f"ganops::minibatch_similarity_double_backward{suffix}"
    if define_fake:
        torch.library.register_fake(fwd)(_similarity_fake)
        torch.library.register_fake(bwd)(_backward_fake)
        torch.library.register_fake(dbwd)(_double_backward_fake)
    backward_op = getattr(torch.ops.ganops, bwd.split("::")[1])
    double_backward_op = getattr(torch.ops.ganops, dbwd.split("::")[1])

    def save_M(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    def similarity_grad(ctx, grad):
        (M,) = ctx.saved_tensors
        return backward_op(grad, M), None

    def save_grad_and_M(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], inputs[1])

    def backward_grad(ctx, grad_grad_M):
        grad, M = ctx.saved_tensors
        return tuple(double_backward_op(grad_grad_M, grad, M))

    torch.library.register_autograd(fwd, similarity_grad, setup_context=save_M)
    torch.library.register_autograd(bwd, backward_grad, setup_context=save_grad_and_M)


if _ext.load():
    _register("", define_fake=True)
_register("_triton", define_fake=True)


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
    exclude_self = _check_exclude_self(exclude_self)
    name = _backend.resolve(backend, M.device)
    if name == "cpp":
        return torch.ops.ganops.minibatch_similarity(M, exclude_self)
    if name == "triton":
        return torch.ops.ganops.minibatch_similarity_triton(M, exclude_self)
    return minibatch_similarity_reference(M, exclude_self)
