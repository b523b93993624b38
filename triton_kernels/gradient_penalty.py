"""Triton kernels of the gradient penalty's fused pieces (ganops.interpolate and
ganops.gradient_norm_penalty).

Parallel in structure to csrc/gradient_penalty/gradient_penalty_cuda.cu: tensors viewed as
(N, M), one program per (sample, chunk) numbered b = sample * n_chunks + chunk on a 1-D grid,
per-program partials for the reductions, and finishing programs that combine each sample's
partials in chunk order. The inverse loss scale and ∂loss/∂penalty are read from device
memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_dtype as _acc_torch
from ._common import acc_tl as _acc
from ._common import div_rn, join_float, on_device, split_float, sqrt_rn

# The work split, written here only: setup.py passes each entry to the C++ and CUDA kernels
# as GANOPS_GRADIENT_PENALTY_<NAME> (gradient_penalty.h's kChunkSize).
WORK_SPLIT = {"CHUNK_SIZE": 16384}
CHUNK_SIZE = WORK_SPLIT["CHUNK_SIZE"]
BLOCK = 1024
FINISH_BLOCK = 256


def _split(t: torch.Tensor) -> tuple[int, int, int]:
    """(N, M, chunks per sample) of a tensor viewed as N samples of M elements."""
    n = t.shape[0]
    m = t.numel() // n
    return n, m, -(-m // CHUNK_SIZE)


@triton.jit
def _chunk(sample_numel, n_chunks, CHUNK: tl.constexpr):
    """This program's sample, its chunk's first element and the chunk's length."""
    b = tl.program_id(0).to(tl.int64)
    sample = b // n_chunks
    c = b % n_chunks
    return sample, sample * sample_numel + c * CHUNK, tl.minimum(sample_numel - c * CHUNK, CHUNK)


@triton.jit
def _interpolate_kernel(real_ptr, fake_ptr, alpha_ptr, out_ptr, sample_numel, n_chunks,
                        ACC: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    sample, offset, length = _chunk(sample_numel, n_chunks, CHUNK)
    w = tl.load(alpha_ptr + sample).to(ACC)
    for start in range(0, length, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        mask = idx < length
        r = tl.load(real_ptr + offset + idx, mask=mask, other=0).to(ACC)
        f = tl.load(fake_ptr + offset + idx, mask=mask, other=0).to(ACC)
        tl.store(out_ptr + offset + idx, (w * r + (1 - w) * f).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _interpolate_backward_kernel(grad_ptr, real_ptr, fake_ptr, alpha_ptr, grad_real_ptr, grad_fake_ptr,
                                 partials_ptr, sample_numel, n_chunks, NEED_REAL: tl.constexpr,
                                 NEED_FAKE: tl.constexpr, NEED_ALPHA: tl.constexpr, ACC: tl.constexpr,
                                 CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    sample, offset, length = _chunk(sample_numel, n_chunks, CHUNK)
    w = tl.load(alpha_ptr + sample).to(ACC)
    acc = tl.zeros([BLOCK], ACC)
    for start in range(0, length, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        mask = idx < length
        g = tl.load(grad_ptr + offset + idx, mask=mask, other=0).to(ACC)
        if NEED_REAL:
            tl.store(grad_real_ptr + offset + idx, (w * g).to(grad_real_ptr.dtype.element_ty), mask=mask)
        if NEED_FAKE:
            tl.store(grad_fake_ptr + offset + idx, ((1 - w) * g).to(grad_fake_ptr.dtype.element_ty), mask=mask)
        if NEED_ALPHA:
            r = tl.load(real_ptr + offset + idx, mask=mask, other=0).to(ACC)
            f = tl.load(fake_ptr + offset + idx, mask=mask, other=0).to(ACC)
            acc += g * (r - f)
    if NEED_ALPHA:
        tl.store(partials_ptr + tl.program_id(0), tl.sum(acc, 0))


@triton.jit
def _alpha_finish_kernel(partials_ptr, grad_alpha_ptr, n_samples, n_chunks, ACC: tl.constexpr,
                         BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n_samples
    acc = tl.zeros([BLOCK], ACC)
    for c in range(0, n_chunks):
        acc += tl.load(partials_ptr + i * n_chunks + c, mask=mask, other=0)
    tl.store(grad_alpha_ptr + i, acc.to(grad_alpha_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sumsq_partial_kernel(grads_ptr, inv_scale_ptr, partials_ptr, sample_numel, n_chunks,
                          HAS_SCALE: tl.constexpr, ACC: tl.constexpr, CHUNK: tl.constexpr,
                          BLOCK: tl.constexpr):
    sample, offset, length = _chunk(sample_numel, n_chunks, CHUNK)
    acc = tl.zeros([BLOCK], ACC)
    for start in range(0, length, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        g = tl.load(grads_ptr + offset + idx, mask=idx < length, other=0).to(ACC)
        if HAS_SCALE:
            g = g * tl.load(inv_scale_ptr).to(ACC)
        acc += g * g
    tl.store(partials_ptr + tl.program_id(0), tl.sum(acc, 0))


@triton.jit
def _penalty_term(ss, center, ONE_SIDED: tl.constexpr):
    """h(n) from n² = ss; with center 0 (R1) it is ss itself. A NaN norm fails d < 0 and stays NaN."""
    d = sqrt_rn(ss) - center
    if ONE_SIDED:
        d = tl.where(d < 0, 0, d)
    return tl.where(center == 0, ss, d * d)


@triton.jit
def _penalty_factor(ss, center, ONE_SIDED: tl.constexpr):
    """h'(n) / n; 0 at n = 0 (the gradient there is the zero vector), NaN at n = inf."""
    n = sqrt_rn(ss)
    d = n - center
    if ONE_SIDED:
        d = tl.where(d < 0, 0, d)
    factor = tl.where(n == 0, 0, div_rn(2 * d, tl.where(n == 0, 1, n)))
    return tl.where(center == 0, 2, factor)


@triton.jit
def _penalty_finish_kernel(partials_ptr, sumsq_ptr, penalty_ptr, n_samples, n_chunks, c_hi, c_mid, c_lo, c_e,
                           w_hi, w_mid, w_lo, w_e, ONE_SIDED: tl.constexpr, ACC: tl.constexpr,
                           BLOCK: tl.constexpr):
    center = join_float(c_hi, c_mid, c_lo, c_e, ACC)
    weight = join_float(w_hi, w_mid, w_lo, w_e, ACC)
    total = tl.zeros([BLOCK], ACC)
    for start in range(0, n_samples, BLOCK):
        i = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = i < n_samples
        ss = tl.zeros([BLOCK], ACC)
        for c in range(0, n_chunks):
            ss += tl.load(partials_ptr + i * n_chunks + c, mask=mask, other=0)
        tl.store(sumsq_ptr + i, ss, mask=mask)
        total += tl.where(mask, _penalty_term(ss, center, ONE_SIDED), 0)
    penalty = div_rn(tl.sum(total, 0), tl.cast(n_samples, ACC)) * weight
    tl.store(penalty_ptr, penalty.to(penalty_ptr.dtype.element_ty))


@triton.jit
def _penalty_backward_kernel(grad_penalty_ptr, grads_ptr, sumsq_ptr, inv_scale_ptr, out_ptr, n_samples,
                             sample_numel, n_chunks, c_hi, c_mid, c_lo, c_e, w_hi, w_mid, w_lo, w_e,
                             HAS_SCALE: tl.constexpr, ONE_SIDED: tl.constexpr, ACC: tl.constexpr,
                             CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    sample, offset, length = _chunk(sample_numel, n_chunks, CHUNK)
    center = join_float(c_hi, c_mid, c_lo, c_e, ACC)
    weight = join_float(w_hi, w_mid, w_lo, w_e, ACC)
    go = tl.load(grad_penalty_ptr).to(ACC)
    k = go * div_rn(weight, tl.cast(n_samples, ACC)) * _penalty_factor(tl.load(sumsq_ptr + sample), center, ONE_SIDED)
    if HAS_SCALE:
        s = tl.load(inv_scale_ptr).to(ACC)
        k = k * s * s
    for start in range(0, length, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        mask = idx < length
        g = tl.load(grads_ptr + offset + idx, mask=mask, other=0).to(ACC)
        tl.store(out_ptr + offset + idx, (k * g).to(out_ptr.dtype.element_ty), mask=mask)


@on_device
def interpolate(real: torch.Tensor, fake: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """alpha[i] * real + (1 - alpha[i]) * fake; alpha of shape (N,)."""
    real, fake, alpha = real.contiguous(), fake.contiguous(), alpha.contiguous()
    n, m, n_chunks = _split(real)
    out = torch.empty_like(real)
    _interpolate_kernel[(n * n_chunks,)](real, fake, alpha, out, m, n_chunks, ACC=_acc(real.dtype),
                                         CHUNK=CHUNK_SIZE, BLOCK=BLOCK)
    return out


@on_device
def interpolate_backward(grad, real, fake, alpha, need_real: bool, need_fake: bool, need_alpha: bool):
    """(alpha * grad, (1 - alpha) * grad, Σ grad * (real - fake) per sample); empty where not needed."""
    grad, real, fake, alpha = grad.contiguous(), real.contiguous(), fake.contiguous(), alpha.contiguous()
    n, m, n_chunks = _split(grad)
    grad_real = torch.empty_like(grad) if need_real else grad.new_empty(0)
    grad_fake = torch.empty_like(grad) if need_fake else grad.new_empty(0)
    grad_alpha = alpha.new_empty(n if need_alpha else 0)
    partials = grad.new_empty(n * n_chunks if need_alpha else 1, dtype=_acc_torch(grad.dtype))
    acc = _acc(grad.dtype)
    _interpolate_backward_kernel[(n * n_chunks,)](
        grad, real, fake, alpha, grad_real if need_real else grad, grad_fake if need_fake else grad, partials,
        m, n_chunks, NEED_REAL=need_real, NEED_FAKE=need_fake, NEED_ALPHA=need_alpha, ACC=acc,
        CHUNK=CHUNK_SIZE, BLOCK=BLOCK)
    if need_alpha:
        _alpha_finish_kernel[(triton.cdiv(n, FINISH_BLOCK),)](partials, grad_alpha, n, n_chunks, ACC=acc,
                                                              BLOCK=FINISH_BLOCK)
    return grad_real, grad_fake, grad_alpha


@on_device
def gradient_norm_penalty(grads, inv_scale, center: float, one_sided: bool, weight: float):
    """(penalty in grads' dtype, per-sample ‖inv_scale * grads[i]‖² in the accumulation dtype)."""
    grads = grads.contiguous()
    n, m, n_chunks = _split(grads)
    acc_dtype = _acc_torch(grads.dtype)
    partials = grads.new_empty(n * n_chunks, dtype=acc_dtype)
    sumsq = grads.new_empty(n, dtype=acc_dtype)
    penalty = grads.new_empty(())
    acc = _acc(grads.dtype)
    _sumsq_partial_kernel[(n * n_chunks,)](grads, inv_scale if inv_scale is not None else partials, partials, m,
                                           n_chunks, HAS_SCALE=inv_scale is not None, ACC=acc, CHUNK=CHUNK_SIZE,
                                           BLOCK=BLOCK)
    _penalty_finish_kernel[(1,)](partials, sumsq, penalty, n, n_chunks, *split_float(center), *split_float(weight),
                                 ONE_SIDED=one_sided, ACC=acc, BLOCK=FINISH_BLOCK)
    return penalty, sumsq


@on_device
def gradient_norm_penalty_backward(grad_penalty, grads, sumsq, inv_scale, center: float, one_sided: bool,
                                   weight: float):
    """∂penalty/∂grads given ∂loss/∂penalty (one value on grads' device) and the forward's sumsq."""
    grads, sumsq, grad_penalty = grads.contiguous(), sumsq.contiguous(), grad_penalty.contiguous()
    n, m, n_chunks = _split(grads)
    out = torch.empty_like(grads)
    _penalty_backward_kernel[(n * n_chunks,)](
        grad_penalty, grads, sumsq, inv_scale if inv_scale is not None else sumsq, out, n, m, n_chunks,
        *split_float(center), *split_float(weight), HAS_SCALE=inv_scale is not None, ONE_SIDED=one_sided,
        ACC=_acc(grads.dtype), CHUNK=CHUNK_SIZE, BLOCK=BLOCK)
    return out
