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

Registered ops (ganops._library): ``interpolate``, ``interpolate_backward``,
``gradient_norm_penalty``, ``gradient_norm_penalty_backward``, each with a CPU, a CUDA and a
Triton kernel; the ``torch`` backend is the reference below.
"""

from __future__ import annotations

import torch

from ganops import _backend, _distributed, _library
from ganops._checks import FLOAT_DTYPES, acc_dtype, check_bool, check_number, check_tensor


# ---------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------

def _check_samples(t, name: str) -> None:
    check_tensor(t, name)
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
    check_tensor(alpha, "alpha")
    n = real.shape[0]
    if alpha.device != real.device:
        raise ValueError(f"alpha must be on real's device {real.device}, got {alpha.device}")
    if alpha.dim() < 1 or alpha.dim() > real.dim() or alpha.shape[0] != n or alpha.numel() != n:
        raise ValueError(f"alpha must have shape ({n},) or ({n}, 1, ...) with at most {real.dim()} dims, "
                         f"one value per sample; got {tuple(alpha.shape)}")
    return alpha.reshape(n).to(real.dtype)


def _inv_scale_tensor(inv_scale, grads: torch.Tensor) -> torch.Tensor | None:
    """inv_scale as one value in the accumulation dtype on grads' device (no host sync)."""
    if inv_scale is None:
        return None
    if isinstance(inv_scale, torch.Tensor):
        if inv_scale.numel() != 1:
            raise ValueError(f"inv_scale must hold one value, got shape {tuple(inv_scale.shape)}")
        if inv_scale.device != grads.device:
            raise ValueError(f"inv_scale must be on grads' device {grads.device}, got {inv_scale.device}")
        return inv_scale.detach().reshape(()).to(acc_dtype(grads.dtype))
    value = check_number(inv_scale, "inv_scale", minimum=0.0)
    # A fill kernel, not torch.tensor(value, device=...): that stages the value in host
    # memory and copies it with a blocking host-to-device transfer, a sync in the hot path
    # that a CUDA graph could not capture.
    return torch.full((), value, dtype=acc_dtype(grads.dtype), device=grads.device)


# ---------------------------------------------------------------------------------------
# The reference (the `torch` backend)
# ---------------------------------------------------------------------------------------

def interpolate_reference(real: torch.Tensor, fake: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """α_i · real + (1 − α_i) · fake in the accumulation dtype; alpha of shape (N,)."""
    acc = acc_dtype(real.dtype)
    a = alpha.to(acc).reshape((-1,) + (1,) * (real.dim() - 1))
    return (a * real.to(acc) + (1 - a) * fake.to(acc)).to(real.dtype)


def _per_sample_terms(grads: torch.Tensor, inv_scale: torch.Tensor | None, center: float,
                      one_sided: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(h(n_i), n_i²) for each sample i, n_i = ‖inv_scale · grads_i‖₂, both (N,) in the
    accumulation dtype; h in differentiable torch ops, n² detached (what the kernels save)."""
    g = grads.reshape(grads.shape[0], -1).to(acc_dtype(grads.dtype))
    if inv_scale is not None:
        g = g * inv_scale
    if center == 0:
        terms = (g * g).sum(dim=1)
        return terms, terms.detach()
    # vector_norm's backward is 0 at a zero norm, never NaN.
    norm = torch.linalg.vector_norm(g, dim=1)
    d = norm - center
    if one_sided:
        d = d.clamp(min=0)
    return d * d, norm.detach().square()


def per_sample_penalty_terms(grads: torch.Tensor, inv_scale: torch.Tensor | None, center: float,
                             one_sided: bool) -> torch.Tensor:
    """h(‖inv_scale · grads_i‖₂) for each sample i, shape (N,), in the accumulation dtype
    (differentiable torch ops)."""
    return _per_sample_terms(grads, inv_scale, center, one_sided)[0]


def gradient_norm_penalty_reference(grads: torch.Tensor, inv_scale: torch.Tensor | None, center: float,
                                    one_sided: bool, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight · mean_i h(n_i) in grads' dtype, n_i² in the accumulation dtype), as the op
    returns them; the penalty is computed in the accumulation dtype."""
    terms, sumsq = _per_sample_terms(grads, inv_scale, center, one_sided)
    return (terms.mean() * weight).to(grads.dtype), sumsq


def interpolate_backward_reference(grad, real, fake, alpha, need_real: bool, need_fake: bool, need_alpha: bool):
    """(∂real, ∂fake, ∂alpha) = (α_i · g, (1 − α_i) · g, Σ_j g · (real − fake) per sample) in
    differentiable torch ops; an output not asked for is empty, as the kernels return it."""
    acc = acc_dtype(grad.dtype)
    a = alpha.to(acc).reshape((-1,) + (1,) * (grad.dim() - 1))
    g = grad.to(acc)
    grad_real = (a * g).to(grad.dtype) if need_real else grad.new_empty(0)
    grad_fake = ((1 - a) * g).to(grad.dtype) if need_fake else grad.new_empty(0)
    grad_alpha = ((g * (real.to(acc) - fake.to(acc))).reshape(g.shape[0], -1).sum(1).to(alpha.dtype)
                  if need_alpha else alpha.new_empty(0))
    return grad_real, grad_fake, grad_alpha


def gradient_norm_penalty_backward_reference(grad_penalty, grads, sumsq, inv_scale, center: float, one_sided: bool,
                                             weight: float) -> torch.Tensor:
    """The penalty's backward, go · weight / N · h'(n_i) / n_i · s² · grads_i, in
    differentiable torch ops (so third-order derivatives stay exact); sumsq is not needed."""
    acc = acc_dtype(grads.dtype)
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


# ---------------------------------------------------------------------------------------
# Registered ops
# ---------------------------------------------------------------------------------------

def _like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _interpolate_setup(ctx, inputs, output):
    real, fake, alpha = inputs
    need_alpha = ctx.needs_input_grad[2]
    # alpha serves ∂real and ∂fake; real and fake serve only ∂alpha.
    ctx.save_for_backward(real if need_alpha else None, fake if need_alpha else None, alpha)


def _interpolate_backward(kernels, ctx, grad):
    real, fake, alpha = ctx.saved_tensors
    need_real, need_fake, need_alpha = ctx.needs_input_grad[:3]
    if _library.differentiating(grad, real, fake, alpha):
        backward = interpolate_backward_reference
    else:
        backward = kernels.interpolate_backward
        if real is None:
            # Not read without need_alpha: the kernel takes grad in their place.
            real = fake = grad
    grad_real, grad_fake, grad_alpha = backward(grad, real, fake, alpha, need_real, need_fake, need_alpha)
    return grad_real if need_real else None, grad_fake if need_fake else None, grad_alpha if need_alpha else None


def _pair_examples(device, dtype):
    def pair(*shape):
        real = torch.randn(shape, device=device, dtype=dtype)
        return real, torch.randn(shape, device=device, dtype=dtype), torch.rand(shape[0], device=device, dtype=dtype)
    return [pair(4, 3, 5, 5), pair(3, 40000), pair(1, 1)]


def _interpolate_examples(device, dtype):
    out = []
    for real, fake, alpha in _pair_examples(device, dtype):
        out.append((real.requires_grad_(), fake.requires_grad_(), alpha.requires_grad_()))
    return out


def _interpolate_backward_examples(device, dtype):
    out = []
    for real, fake, alpha in _pair_examples(device, dtype):
        grad = torch.randn_like(real)
        out += [(grad, real, fake, alpha, True, True, True), (grad, real, fake, alpha, False, True, False)]
    return out


def _penalty_examples(device, dtype):
    acc = acc_dtype(dtype)
    inv_scale = torch.full((), 0.25, device=device, dtype=acc)
    grads = [torch.randn(4, 3, 5, 5, device=device, dtype=dtype), torch.randn(3, 40000, device=device, dtype=dtype)]
    return [(g.requires_grad_(), scale, center, one_sided, 10.0)
            for g in grads for scale, center, one_sided in [(None, 1.0, False), (inv_scale, 0.0, False),
                                                           (None, 0.5, True)]]


def _penalty_backward_examples(device, dtype):
    out = []
    for grads, inv_scale, center, one_sided, weight in _penalty_examples(device, dtype):
        grads = grads.detach()
        _, sumsq = gradient_norm_penalty_reference(grads, inv_scale, center, one_sided, weight)
        grad_penalty = torch.full((), 0.75, device=device, dtype=dtype)
        out.append((grad_penalty, grads, sumsq, inv_scale, center, one_sided, weight))
    return out


def _penalty_setup(ctx, inputs, output):
    grads, inv_scale, center, one_sided, weight = inputs
    ctx.save_for_backward(grads, output[1], inv_scale)
    ctx.args = (center, one_sided, weight)
    ctx.mark_non_differentiable(output[1])


def _penalty_backward(kernels, ctx, grad_penalty, grad_sumsq):
    grads, sumsq, inv_scale = ctx.saved_tensors
    backward = (gradient_norm_penalty_backward_reference if _library.differentiating(grad_penalty, grads)
                else kernels.gradient_norm_penalty_backward)
    return backward(grad_penalty, grads, sumsq, inv_scale, *ctx.args), None, None, None, None


INTERPOLATE = _library.define(
    "interpolate", "(Tensor real, Tensor fake, Tensor alpha) -> Tensor",
    fake=lambda real, fake, alpha: _like(real),
    reference=interpolate_reference, triton="gradient_penalty.interpolate",
    backward=_interpolate_backward, setup_context=_interpolate_setup, examples=_interpolate_examples)

INTERPOLATE_BACKWARD = _library.define(
    "interpolate_backward", "(Tensor grad, Tensor real, Tensor fake, Tensor alpha, bool need_real, bool need_fake, "
    "bool need_alpha) -> (Tensor, Tensor, Tensor)",
    fake=lambda grad, real, fake, alpha, need_real, need_fake, need_alpha: (
        _like(grad) if need_real else grad.new_empty(0), _like(grad) if need_fake else grad.new_empty(0),
        alpha.new_empty(alpha.shape[0] if need_alpha else 0)),
    reference=interpolate_backward_reference, triton="gradient_penalty.interpolate_backward",
    examples=_interpolate_backward_examples)

GRADIENT_NORM_PENALTY = _library.define(
    "gradient_norm_penalty", "(Tensor grads, Tensor? inv_scale, float center, bool one_sided, float weight) "
    "-> (Tensor, Tensor)",
    fake=lambda grads, inv_scale, center, one_sided, weight: (
        grads.new_empty(()), grads.new_empty(grads.shape[0], dtype=acc_dtype(grads.dtype))),
    reference=gradient_norm_penalty_reference, triton="gradient_penalty.gradient_norm_penalty",
    backward=_penalty_backward, setup_context=_penalty_setup, examples=_penalty_examples)

GRADIENT_NORM_PENALTY_BACKWARD = _library.define(
    "gradient_norm_penalty_backward", "(Tensor grad_penalty, Tensor grads, Tensor sumsq, Tensor? inv_scale, "
    "float center, bool one_sided, float weight) -> Tensor",
    fake=lambda grad_penalty, grads, sumsq, inv_scale, center, one_sided, weight: _like(grads),
    reference=gradient_norm_penalty_backward_reference, triton="gradient_penalty.gradient_norm_penalty_backward",
    examples=_penalty_backward_examples)


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
    return _library.call(INTERPOLATE, backend, real.device, real, fake, alpha)


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
    one_sided = check_bool(one_sided, "one_sided")
    scale = _inv_scale_tensor(inv_scale, grads)
    return _library.call(GRADIENT_NORM_PENALTY, backend, grads.device, grads, scale, center, one_sided, weight)[0]


def _check_scaler(scaler):
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}")


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
    if scores.dtype not in FLOAT_DTYPES:
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
    one_sided = check_bool(one_sided, "one_sided")
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
    _distributed.check_critic_wrapping(critic)
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
