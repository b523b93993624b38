"""Gradient penalties: WGAN-GP on interpolated samples (Gulrajani et al. 2017) and R1 on reals
(Mescheder et al. 2018), with the double backward through the critic.

    x̂_i = α_i · real_i + (1 − α_i) · fake_i,   α_i ~ U[0, 1), one per sample
    g   = ∇_x̂ Σ_i D(x̂)_i                        (create_graph=True)
    GP  = weight · mean_i h(‖g_i‖₂),  h(n) = (n − center)²  or, one-sided, max(0, n − center)²
    R1  = γ / 2 · mean_i ‖∇_x D(real)_i‖₂²

Both are input_gradient_penalty(scores, inputs, ...) on scores the caller may already hold
(StyleGAN's main loss and R1 from one forward); ``reduction`` picks the mean, the sum or the
per-sample penalties.

The norm is per sample over every non-batch dimension. Two fused pieces carry the work, each
a registered op with its own registered backward op, one pass over memory each way:
``interpolate`` (x̂ and its backward into real, fake and α) and ``gradient_norm_penalty``
(per-sample norms and the penalty; its backward scales each sample's gradient by
weight / N · h'(n_i) / n_i, 0 at n_i = 0). The penalty's backward is first-order in g, and g
came from autograd with create_graph=True, so autograd carries the penalty's gradient on
through the critic's double backward into its parameters.

With a ``torch.amp.GradScaler`` the input gradient is taken of the scaled critic output and
unscaled inside the fused kernel by 1 / scale computed on the device: no host read of the
scale. A non-finite gradient gives a non-finite penalty, so the scaler skips the step.

Registered ops: ``ganops::interpolate``, ``ganops::interpolate_backward``,
``ganops::gradient_norm_penalty``, ``ganops::gradient_norm_penalty_backward`` (cpp: CPU and
CUDA kernels) and their ``*_triton`` twins. The ``torch`` backend is the reference below.
"""

from __future__ import annotations


import torch

from ganops import _backend, _ext
from ganops._checks import check_number

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------

def _check_samples(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} is a {t.layout} tensor; ganops supports dense tensors only")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; expected float16, bfloat16, float32 or float64")
    if t.dim() < 1 or t.shape[0] == 0 or t.numel() == 0:
        raise ValueError(f"{name} must have a batch dimension and at least one element per sample, "
                         f"got shape {tuple(t.shape)}")


def _check_pair(real, fake) -> None:
    _check_samples(real, "real")
    _check_samples(fake, "fake")
    if real.shape != fake.shape:
        raise ValueError(f"real and fake must have the same shape, got {tuple(real.shape)} and {tuple(fake.shape)}")
    if real.dtype != fake.dtype:
        raise TypeError(f"real and fake must have the same dtype, got {real.dtype} and {fake.dtype}")
    if real.device != fake.device:
        raise ValueError(f"real and fake must be on the same device, got {real.device} and {fake.device}")


def _alpha_per_sample(alpha, real: torch.Tensor) -> torch.Tensor:
    """alpha of shape (N,) or (N, 1, ..., 1), as (N,) in real's dtype."""
    if not isinstance(alpha, torch.Tensor):
        raise TypeError(f"alpha must be a tensor, got {type(alpha).__name__}")
    n = real.shape[0]
    if alpha.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"alpha has dtype {alpha.dtype}; expected a floating dtype")
    if alpha.device != real.device:
        raise ValueError(f"alpha must be on real's device {real.device}, got {alpha.device}")
    if alpha.dim() < 1 or alpha.dim() > real.dim() or alpha.shape[0] != n or alpha.numel() != n:
        raise ValueError(f"alpha must have shape ({n},) or ({n}, 1, ...) with at most {real.dim()} dims, "
                         f"one value per sample; got {tuple(alpha.shape)}")
    return alpha.reshape(n).to(real.dtype)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _inv_scale_tensor(inv_scale, grads: torch.Tensor) -> torch.Tensor | None:
    """inv_scale as one value in the accumulation dtype on grads' device (no host sync)."""
    if inv_scale is None:
        return None
    if isinstance(inv_scale, torch.Tensor):
        if inv_scale.numel() != 1:
            raise ValueError(f"inv_scale must hold one value, got shape {tuple(inv_scale.shape)}")
        if inv_scale.device != grads.device:
            raise ValueError(f"inv_scale must be on grads' device {grads.device}, got {inv_scale.device}")
        return inv_scale.detach().reshape(()).to(_acc_dtype(grads.dtype))
    value = check_number(inv_scale, "inv_scale", minimum=0.0)
    # A fill kernel, not torch.tensor(value, device=...): that stages the value in host
    # memory and copies it with a blocking host-to-device transfer, a sync in the hot path
    # that a CUDA graph could not capture.
    return torch.full((), value, dtype=_acc_dtype(grads.dtype), device=grads.device)


# ---------------------------------------------------------------------------------------
# The reference (the `torch` backend)
# ---------------------------------------------------------------------------------------

def interpolate_reference(real: torch.Tensor, fake: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """α_i · real + (1 − α_i) · fake in the accumulation dtype; alpha of shape (N,)."""
    acc = _acc_dtype(real.dtype)
    a = alpha.to(acc).reshape((-1,) + (1,) * (real.dim() - 1))
    return (a * real.to(acc) + (1 - a) * fake.to(acc)).to(real.dtype)


def per_sample_penalty_terms(grads: torch.Tensor, inv_scale: torch.Tensor | None, center: float,
                             one_sided: bool) -> torch.Tensor:
    """h(‖inv_scale · grads_i‖₂) for each sample i, shape (N,), in the accumulation dtype
    (differentiable torch ops)."""
    g = grads.reshape(grads.shape[0], -1).to(_acc_dtype(grads.dtype))
    if inv_scale is not None:
        g = g * inv_scale
    if center == 0:
        return (g * g).sum(dim=1)
    # vector_norm's backward is 0 at a zero norm, never NaN.
    d = torch.linalg.vector_norm(g, dim=1) - center
    if one_sided:
        d = d.clamp(min=0)
    return d * d


def gradient_norm_penalty_reference(grads: torch.Tensor, inv_scale: torch.Tensor | None, center: float,
                                    one_sided: bool, weight: float) -> torch.Tensor:
    """weight · mean_i h(‖inv_scale · grads_i‖₂) in the accumulation dtype, returned in grads' dtype."""
    return (per_sample_penalty_terms(grads, inv_scale, center, one_sided).mean() * weight).to(grads.dtype)


# ---------------------------------------------------------------------------------------
# Registered ops: fake impls for the compiled ops, Triton ops around their launchers
# ---------------------------------------------------------------------------------------

def _interpolate_fake(real, fake, alpha):
    return torch.empty_like(real, memory_format=torch.contiguous_format)


def _interpolate_backward_fake(grad, real, fake, alpha, need_real, need_fake, need_alpha):
    def like(flag):
        return torch.empty_like(grad, memory_format=torch.contiguous_format) if flag else grad.new_empty(0)
    return like(need_real), like(need_fake), alpha.new_empty(alpha.shape[0] if need_alpha else 0)


def _penalty_fake(grads, inv_scale, center, one_sided, weight):
    return grads.new_empty(()), grads.new_empty(grads.shape[0], dtype=_acc_dtype(grads.dtype))


def _penalty_backward_fake(grad_penalty, grads, sumsq, inv_scale, center, one_sided, weight):
    return torch.empty_like(grads, memory_format=torch.contiguous_format)


if _ext.load():
    torch.library.register_fake("ganops::interpolate")(_interpolate_fake)
    torch.library.register_fake("ganops::interpolate_backward")(_interpolate_backward_fake)
    torch.library.register_fake("ganops::gradient_norm_penalty")(_penalty_fake)
    torch.library.register_fake("ganops::gradient_norm_penalty_backward")(_penalty_backward_fake)


@torch.library.custom_op("ganops::interpolate_triton", mutates_args=())
def _interpolate_triton(real: torch.Tensor, fake: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    from ganops.triton_kernels import gradient_penalty as kernels
    return kernels.interpolate(real, fake, alpha)


@torch.library.custom_op("ganops::interpolate_backward_triton", mutates_args=())
def _interpolate_backward_triton(grad: torch.Tensor, real: torch.Tensor, fake: torch.Tensor, alpha: torch.Tensor,
                                 need_real: bool, need_fake: bool,
                                 need_alpha: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ganops.triton_kernels import gradient_penalty as kernels
    return kernels.interpolate_backward(grad, real, fake, alpha, need_real, need_fake, need_alpha)


@torch.library.custom_op("ganops::gradient_norm_penalty_triton", mutates_args=())
def _gradient_norm_penalty_triton(grads: torch.Tensor, inv_scale: torch.Tensor | None, center: float,
                                  one_sided: bool, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    from ganops.triton_kernels import gradient_penalty as kernels
    return kernels.gradient_norm_penalty(grads, inv_scale, center, one_sided, weight)


@torch.library.custom_op("ganops::gradient_norm_penalty_backward_triton", mutates_args=())
def _gradient_norm_penalty_backward_triton(grad_penalty: torch.Tensor, grads: torch.Tensor, sumsq: torch.Tensor,
                                           inv_scale: torch.Tensor | None, center: float, one_sided: bool,
                                           weight: float) -> torch.Tensor:
    from ganops.triton_kernels import gradient_penalty as kernels
    return kernels.gradient_norm_penalty_backward(grad_penalty, grads, sumsq, inv_scale, center, one_sided, weight)


_interpolate_triton.register_fake(_interpolate_fake)
_interpolate_backward_triton.register_fake(_interpolate_backward_fake)
_gradient_norm_penalty_triton.register_fake(_penalty_fake)
_gradient_norm_penalty_backward_triton.register_fake(_penalty_backward_fake)


# ---------------------------------------------------------------------------------------
# Autograd: each forward op's backward is its backward op, on the same backend
# ---------------------------------------------------------------------------------------

def _interpolate_setup(ctx, inputs, output):
    real, fake, alpha = inputs
    need_alpha = ctx.needs_input_grad[2]
    # alpha serves ∂real and ∂fake; real and fake serve only ∂alpha.
    ctx.save_for_backward(real if need_alpha else None, fake if need_alpha else None, alpha)


def _penalty_setup(ctx, inputs, output):
    grads, inv_scale, center, one_sided, weight = inputs
    ctx.save_for_backward(grads, output[1], inv_scale)
    ctx.args = (center, one_sided, weight)
    ctx.mark_non_differentiable(output[1])


def _interpolate_backward_composite(grad, real, fake, alpha, need_real, need_fake, need_alpha):
    """interpolate's backward in differentiable torch ops (used under create_graph=True)."""
    acc = _acc_dtype(grad.dtype)
    a = alpha.to(acc).reshape((-1,) + (1,) * (grad.dim() - 1))
    g = grad.to(acc)
    grad_real = (a * g).to(grad.dtype) if need_real else None
    grad_fake = ((1 - a) * g).to(grad.dtype) if need_fake else None
    grad_alpha = ((g * (real.to(acc) - fake.to(acc))).reshape(g.shape[0], -1).sum(1).to(alpha.dtype)
                  if need_alpha else None)
    return grad_real, grad_fake, grad_alpha


def _penalty_backward_composite(grad_penalty, grads, inv_scale, center, one_sided, weight):
    """The penalty's backward, go · weight / N · h'(n_i) / n_i · s² · grads_i, in differentiable
    torch ops (used under create_graph=True, so third-order derivatives stay exact)."""
    acc = _acc_dtype(grads.dtype)
    n = grads.shape[0]
    g = grads.reshape(n, -1).to(acc)
    if inv_scale is not None:
        g = g * inv_scale
    if center == 0:
        factor = 2.0
    else:
        norm = torch.linalg.vector_norm(g, dim=1, keepdim=True)
        d = norm - center
        if one_sided:
            d = d.clamp(min=0)
        zero = norm == 0
        # 0 at a zero norm (the gradient there is the zero vector); a NaN norm stays NaN.
        factor = torch.where(zero, 0.0, 2 * d / torch.where(zero, 1.0, norm))
    out = grad_penalty.to(acc) * (weight / n) * factor * g
    if inv_scale is not None:
        out = out * inv_scale
    return out.reshape(grads.shape).to(grads.dtype)


def _differentiating_backward(*tensors) -> bool:
    """Whether autograd records this backward (create_graph=True through it): then the fused
    backward ops, which have no derivative of their own, give way to differentiable torch ops."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _register_autograd(interpolate_op, interpolate_backward_op, penalty_op, penalty_backward_op):
    def interpolate_backward(ctx, grad):
        real, fake, alpha = ctx.saved_tensors
        need_real, need_fake, need_alpha = ctx.needs_input_grad[:3]
        if _differentiating_backward(grad, real, fake, alpha):
            return _interpolate_backward_composite(grad, real, fake, alpha, need_real, need_fake, need_alpha)
        if real is None:
            # Not read without need_alpha: the kernel takes grad in their place.
            real = fake = grad
        grad_real, grad_fake, grad_alpha = interpolate_backward_op(grad, real, fake, alpha, need_real, need_fake,
                                                                   need_alpha)
        return (grad_real if need_real else None, grad_fake if need_fake else None,
                grad_alpha if need_alpha else None)

    def penalty_backward(ctx, grad_penalty, grad_sumsq):
        grads, sumsq, inv_scale = ctx.saved_tensors
        if _differentiating_backward(grad_penalty, grads):
            return _penalty_backward_composite(grad_penalty, grads, inv_scale, *ctx.args), None, None, None, None
        grad_grads = penalty_backward_op(grad_penalty, grads, sumsq, inv_scale, *ctx.args)
        return grad_grads, None, None, None, None

    torch.library.register_autograd(interpolate_op, interpolate_backward, setup_context=_interpolate_setup)
    torch.library.register_autograd(penalty_op, penalty_backward, setup_context=_penalty_setup)


if _ext.load():
    _register_autograd("ganops::interpolate", torch.ops.ganops.interpolate_backward,
                       "ganops::gradient_norm_penalty", torch.ops.ganops.gradient_norm_penalty_backward)
_register_autograd(_interpolate_triton, torch.ops.ganops.interpolate_backward_triton,
                   _gradient_norm_penalty_triton, torch.ops.ganops.gradient_norm_penalty_backward_triton)


# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------

def interpolate(real: torch.Tensor, fake: torch.Tensor, alpha: torch.Tensor, *,
                backend: str | None = None) -> torch.Tensor:
    """x̂ = α_i · real + (1 − α_i) · fake, one α per sample.

    ``real`` and ``fake``: (N, ...) of one shape, dtype and device; ``alpha``: (N,) or
    (N, 1, ..., 1). Returns a contiguous (N, ...) tensor; differentiable in all three.
    """
    _check_pair(real, fake)
    alpha = _alpha_per_sample(alpha, real)
    name = _backend.resolve(backend, real.device)
    if name == "cpp":
        return torch.ops.ganops.interpolate(real, fake, alpha)
    if name == "triton":
        return torch.ops.ganops.interpolate_triton(real, fake, alpha)
    return interpolate_reference(real, fake, alpha)


def gradient_norm_penalty(grads: torch.Tensor, *, center: float = 1.0, one_sided: bool = False,
                          weight: float = 1.0, inv_scale=None, backend: str | None = None) -> torch.Tensor:
    """weight · mean_i h(‖s · grads_i‖₂), a 0-dim tensor in grads' dtype.

    ``grads``: (N, ...), the norm taken per sample over every non-batch dimension (in float32
    for half types); h(n) = (n − center)², or max(0, n − center)² with ``one_sided``;
    s = ``inv_scale`` (a one-value tensor on grads' device or a number; 1 when None) unscales
    gradients taken of a loss-scaled output. At ‖grads_i‖ = 0 the gradient is 0, never NaN.
    """
    _check_samples(grads, "grads")
    center = check_number(center, "center")
    weight = check_number(weight, "weight")
    if not isinstance(one_sided, bool):
        raise TypeError(f"one_sided must be a bool, got {type(one_sided).__name__}")
    scale = _inv_scale_tensor(inv_scale, grads)
    name = _backend.resolve(backend, grads.device)
    if name == "cpp":
        return torch.ops.ganops.gradient_norm_penalty(grads, scale, center, one_sided, weight)[0]
    if name == "triton":
        return torch.ops.ganops.gradient_norm_penalty_triton(grads, scale, center, one_sided, weight)[0]
    return gradient_norm_penalty_reference(grads, scale, center, one_sided, weight)


def _check_scaler(scaler):
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}")


def _check_distributed_critic(critic) -> None:
    """Refuses the data-parallel wrappings whose double backward goes wrong (tests/test_distributed.py).

    Plain DistributedDataParallel works when the penalty joins the critic loss in one
    backward. Two do not: FSDP2 (fully_shard) reshards after the input-gradient pass and
    frees the gathered weights the second backward reads (pytorch/pytorch#172543; with
    set_reshard_after_backward(False) it runs but reduces the gradients before the penalty's
    part arrives: silently wrong), and DDP's static_graph reduces at the end of the
    input-gradient pass, before any parameter gradient exists (silently wrong too). Only
    modules are scanned, and only with a process group up, so single-process calls pay one
    check.
    """
    if not (isinstance(critic, torch.nn.Module) and torch.distributed.is_available()
            and torch.distributed.is_initialized()):
        return
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel
    for module in critic.modules():
        if isinstance(module, FSDPModule):
            raise ValueError("critic is sharded with FSDP2 (fully_shard), which does not support the double "
                             "backward of a gradient penalty; wrap the critic in DistributedDataParallel instead "
                             "(the generator can stay fully_shard-ed)")
        if isinstance(module, DistributedDataParallel) and module.static_graph:
            raise ValueError("critic is DistributedDataParallel with static_graph=True, which reduces gradients "
                             "at the end of the penalty's input-gradient pass; use static_graph=False (the "
                             "default) and one backward of critic loss + penalty")


_REDUCTIONS = ("mean", "sum", "none")


def _check_reduction(reduction) -> str:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    return reduction


def _check_scores(scores, n: int, name: str) -> None:
    """One score per sample: shape (N,), (N, 1) or (N, 1, ..., 1) (a DCGAN critic's (N, 1, 1, 1))."""
    if not isinstance(scores, torch.Tensor):
        raise ValueError(f"{name} must be a tensor of shape ({n},) or ({n}, 1, ...), one score per sample; "
                         f"got {type(scores).__name__}")
    if scores.dim() < 1 or scores.shape[0] != n or scores.numel() != n:
        raise ValueError(f"{name} must have shape ({n},) or ({n}, 1) (or ({n}, 1, ..., 1)), one score per sample; "
                         f"got {tuple(scores.shape)}")
    if scores.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {scores.dtype}; expected a floating dtype")


def _reduced_penalty(grads: torch.Tensor, inv_scale, center: float, one_sided: bool, weight: float,
                     reduction: str, backend: str | None) -> torch.Tensor:
    """The penalty of grads under ``reduction``: "mean" and "sum" run the fused op (a sum is
    the mean with weight · N), "none" the per-sample terms, shape (N,).

    "none" is differentiable torch ops on every backend: the fused backward op scales every
    sample by one incoming scalar and has no per-sample upstream gradient to take.
    """
    if reduction == "none":
        # A named backend that cannot serve still says so, as with the other reductions.
        _backend.resolve(backend, grads.device)
        terms = per_sample_penalty_terms(grads, _inv_scale_tensor(inv_scale, grads), center, one_sided)
        return (terms * weight).to(grads.dtype)
    if reduction == "sum":
        weight = weight * grads.shape[0]
    return gradient_norm_penalty(grads, center=center, one_sided=one_sided, weight=weight, inv_scale=inv_scale,
                                 backend=backend)


def input_gradient_penalty(scores: torch.Tensor, inputs: torch.Tensor, *, center: float = 1.0,
                           weight: float = 10.0, one_sided: bool = False, reduction: str = "mean",
                           scaler: torch.amp.GradScaler | None = None, backend: str | None = None) -> torch.Tensor:
    """weight · h(‖∇_inputs Σ scores‖₂ per sample), on scores you already computed.

    ``scores``: the critic's output for ``inputs``, one value per sample: (N,), (N, 1) or
    (N, 1, ..., 1). ``inputs``: (N, ...), requiring grad, the tensor the scores were computed
    from (with grad enabled). g = ∇_inputs Σ_i scores_i is taken with create_graph=True, so
    the penalty's gradient reaches the critic's parameters; h(n) = (n − center)², or
    max(0, n − center)² with ``one_sided``. ``center=0.0, weight=γ/2`` is R1 (StyleGAN
    computes D(real) once for the main loss and R1); interpolates as inputs is WGAN-GP.

    ``reduction``: "mean" (a 0-dim tensor), "sum", or "none" (per-sample penalties, (N,)).
    ``scaler``: an enabled torch.amp.GradScaler; the input gradient is then taken of the
    scaled scores and unscaled on the device inside the fused kernel.

    Every parameter that took part in computing ``scores`` receives a gradient from the
    penalty, zero where the penalty does not reach it (a critic's last bias), so a step whose
    only loss is the penalty (lazy R1) runs under DistributedDataParallel with
    find_unused_parameters=False.
    """
    _check_samples(inputs, "inputs")
    n = inputs.shape[0]
    _check_scores(scores, n, "scores")
    center = check_number(center, "center")
    weight = check_number(weight, "weight")
    if not isinstance(one_sided, bool):
        raise TypeError(f"one_sided must be a bool, got {type(one_sided).__name__}")
    _check_reduction(reduction)
    _check_scaler(scaler)
    if not inputs.requires_grad or scores.grad_fn is None:
        raise ValueError("scores must be computed from inputs with grad enabled, and inputs must require grad "
                         "(e.g. inputs = real.detach().requires_grad_(True); scores = critic(inputs))")
    with torch.enable_grad():
        out = scores
        inv_scale = None
        if scaler is not None and scaler.is_enabled():
            out = scaler.scale(scores)
            inv_scale = scaler._scale.reciprocal()
        (grads,) = torch.autograd.grad(out.sum(), inputs, create_graph=True, allow_unused=True)
        if grads is None:
            raise ValueError("scores do not depend on inputs: pass the tensor the critic was called on")
        penalty = _reduced_penalty(grads, inv_scale, center, one_sided, weight, reduction, backend)
        # A sum over no element: exactly 0 whatever the scores hold (no 0 · inf = NaN), and its
        # backward hands every score a zero gradient, so autograd walks the forward graph to
        # every parameter in it. The double backward walks most of that graph already; this
        # adds the top layer's backward on zeros. Without it DDP (find_unused_parameters=False)
        # waits for the parameters the input gradient does not depend on (the last bias).
        return penalty + scores.reshape(-1)[:0].sum().to(penalty.dtype)


def _critic_scores(critic, x: torch.Tensor) -> torch.Tensor:
    """critic(x) with grad enabled, checked to hold one score per sample."""
    if not callable(critic):
        raise TypeError(f"critic must be callable (a module or function), got {type(critic).__name__}")
    _check_distributed_critic(critic)
    with torch.enable_grad():
        scores = critic(x)
    _check_scores(scores, x.shape[0], "critic output")
    return scores


def gradient_penalty(critic, real: torch.Tensor, fake: torch.Tensor, *, weight: float = 10.0, center: float = 1.0,
                     one_sided: bool = False, alpha: torch.Tensor | None = None,
                     generator: torch.Generator | None = None, reduction: str = "mean",
                     scaler: torch.amp.GradScaler | None = None, backend: str | None = None) -> torch.Tensor:
    """WGAN-GP: weight · h(‖∇_x̂ D(x̂)_i‖₂) on x̂ = α_i · real + (1 − α_i) · fake, averaged over i.

    ``critic``: a callable mapping (N, ...) to one score per sample ((N,), (N, 1) or
    (N, 1, ..., 1)). ``real``, ``fake``: (N, ...). ``alpha``: (N,) or (N, 1, ..., 1); when
    None, α ~ U[0, 1) per sample from ``generator``. h(n) = (n − center)², or
    max(0, n − center)² with ``one_sided``. ``reduction``: "mean" (a 0-dim tensor), "sum" or
    "none" (per-sample, (N,)). The gradient reaches the critic's parameters (and real / fake
    when they require grad). With ``scaler`` (an enabled torch.amp.GradScaler) the input
    gradient is taken of the scaled score and unscaled on the device inside the fused kernel.
    Built on input_gradient_penalty.
    """
    _check_pair(real, fake)
    _check_scaler(scaler)
    _check_reduction(reduction)
    n = real.shape[0]
    if alpha is None:
        if generator is not None and generator.device.type != real.device.type:
            raise ValueError(f"generator must be on real's device type {real.device.type}, "
                             f"got {generator.device}")
        alpha = torch.rand(n, generator=generator, device=real.device, dtype=real.dtype)
    with torch.enable_grad():
        x_hat = interpolate(real, fake, alpha, backend=backend)
        if not x_hat.requires_grad:
            x_hat.requires_grad_(True)
        return input_gradient_penalty(_critic_scores(critic, x_hat), x_hat, center=center, weight=weight,
                                      one_sided=one_sided, reduction=reduction, scaler=scaler, backend=backend)


def r1_penalty(critic, real: torch.Tensor, *, gamma: float = 10.0, reduction: str = "mean",
               scaler: torch.amp.GradScaler | None = None, backend: str | None = None) -> torch.Tensor:
    """R1: γ / 2 · ‖∇_x D(real)_i‖₂², zero-centred on real samples (StyleGAN's regulariser),
    averaged over i.

    ``critic``: a callable mapping (N, ...) to one score per sample; ``real``: (N, ...).
    ``reduction`` as in gradient_penalty. The gradient reaches the critic's parameters, and
    ``real`` when it requires grad. ``scaler`` as in gradient_penalty. To share D(real) with
    the main loss, call input_gradient_penalty(scores, real, center=0.0, weight=γ / 2).
    """
    _check_samples(real, "real")
    _check_scaler(scaler)
    _check_reduction(reduction)
    gamma = check_number(gamma, "gamma")
    with torch.enable_grad():
        x = real if real.requires_grad else real.detach().requires_grad_(True)
        return input_gradient_penalty(_critic_scores(critic, x), x, center=0.0, weight=gamma / 2,
                                      reduction=reduction, scaler=scaler, backend=backend)
