"""Scaled-dot-product attention (torch.nn.functional.scaled_dot_product_attention) whose
backward and double backward are fused too, so R1 and other gradient penalties go through an
attention critic without building the L × S attention matrix at any order.

For q (B, L, E), k (B, S, E), v (B, S, Ev), B folding every batch and head dimension, and
key j masked out for query i where j > i when is_causal (torch's top-left alignment):

    S = scale · Q Kᵀ (masked entries −inf)     lse_i = log Σ_j exp(S_ij)
    P = softmax_rows(S) = exp(S − lse)          O = P V

First backward, given dO = ∂loss/∂O:

    dV = Pᵀ dO            dP = dO Vᵀ            D_i = Σ_j P_ij dP_ij = Σ_e dO_ie O_ie
    dS = P ∘ (dP − D)     dQ = scale · dS K      dK = scale · dSᵀ Q

Second backward, given the cotangents gQ, gK, gV of dQ, dK, dV (reverse mode through the
lines above; D and gD broadcast over j):

    H    = scale · (gQ Kᵀ + Q gKᵀ)                         the cotangent of dS
    gD_i = −Σ_j H_ij P_ij
    g_dP = P ∘ (H + gD)
    g_P  = dO gVᵀ + H ∘ (dP − D) + gD ∘ dP
    g_S  = P ∘ (g_P − R),   R_i = Σ_j P_ij g_P_ij
    ∂dO  = P gV + g_dP V
    ∂Q   = scale · (dS gK + g_S K)
    ∂K   = scale · (dSᵀ gQ + g_Sᵀ Q)
    ∂V   = g_dPᵀ dO

These are total derivatives: O and lse are functions of Q, K and V. D, gD and R are sums over
j of tile quantities (R_i = Σ_j P_ij (dO gVᵀ)_ij + Σ_j P_ij H_ij dP_ij − 2 D_i Σ_j P_ij H_ij),
so every order runs tile by tile: the forward saves O and lse only (an online softmax over key
tiles), and each backward recomputes the tiles of P from lse.

Registered ops (ganops._library), each with a CPU, a CUDA and a Triton kernel; the ``torch``
backend is the reference below, which builds L × S (it is the reference):

- ``scaled_dot_product_attention`` → (O, lse); its backward is
- ``scaled_dot_product_attention_backward`` → (dQ, dK, dV); its backward is
- ``scaled_dot_product_attention_double_backward`` → (∂dO, ∂Q, ∂K, ∂V); its own backward (the
  third order and beyond) is autograd through the differentiable reference: correct, not fused.

What is not fused: a general ``attn_mask``, ``dropout_p > 0`` and grouped-query attention with
fewer key/value heads than query heads (``enable_gqa``) run the differentiable reference in
torch ops, which builds L × S, as torch's math backend does.
"""

from __future__ import annotations

import math

import torch

from ganops import _backend, _library
from ganops._checks import FLOAT_DTYPES, acc_dtype


# ---------------------------------------------------------------------------------------
# Argument checks: torch's exception types (RuntimeError for tensors, TypeError for the
# Python arguments), with messages that name the argument
# ---------------------------------------------------------------------------------------

def _check_qkv(query, key, value) -> None:
    for t, name in ((query, "query"), (key, "key"), (value, "value")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.layout != torch.strided:
            raise RuntimeError(f"{name} is a {t.layout} tensor; scaled_dot_product_attention takes dense tensors")
        if t.dtype not in FLOAT_DTYPES:
            raise RuntimeError(f"{name} has dtype {t.dtype}; scaled_dot_product_attention takes float16, "
                               f"bfloat16, float32 or float64 tensors")
        if t.dim() < 2:
            raise RuntimeError(f"{name} must be at least 2-D (..., sequence, features), got shape {tuple(t.shape)}")
    if not query.dtype == key.dtype == value.dtype:
        raise RuntimeError(f"query, key and value must have the same dtype, got {query.dtype}, {key.dtype} "
                           f"and {value.dtype}")
    if not query.device == key.device == value.device:
        raise RuntimeError(f"query, key and value must be on the same device, got {query.device}, {key.device} "
                           f"and {value.device}")
    if key.shape[-1] != query.shape[-1]:
        raise RuntimeError(f"key's last dimension (E = {key.shape[-1]}) must equal query's (E = {query.shape[-1]}), "
                           f"got query {tuple(query.shape)} and key {tuple(key.shape)}")
    if value.shape[-2] != key.shape[-2]:
        raise RuntimeError(f"value's sequence length ({value.shape[-2]}) must equal key's ({key.shape[-2]}), "
                           f"got key {tuple(key.shape)} and value {tuple(value.shape)}")


def _check_gqa_heads(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    """enable_gqa: key and value have the same number of heads (dim −3), which divides query's."""
    if query.dim() < 3 or key.dim() < 3 or value.dim() < 3:
        raise RuntimeError("enable_gqa needs query, key and value with a head dimension (..., heads, sequence, "
                           f"features), got shapes {tuple(query.shape)}, {tuple(key.shape)} and {tuple(value.shape)}")
    hq, hk, hv = query.shape[-3], key.shape[-3], value.shape[-3]
    if hk != hv or hk == 0 or hq % hk != 0:
        raise RuntimeError(f"enable_gqa: the number of heads of key ({hk}) and of value ({hv}) must be equal and "
                           f"divide query's ({hq})")


def _batch_shape(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, enable_gqa: bool) -> torch.Size:
    """The broadcast batch shape; with enable_gqa, key's and value's heads count as query's."""
    def batch(t):
        return (*t.shape[:-3], query.shape[-3]) if enable_gqa else t.shape[:-2]
    try:
        return torch.broadcast_shapes(query.shape[:-2], batch(key), batch(value))
    except RuntimeError:
        raise RuntimeError(f"the batch dimensions of query {tuple(query.shape[:-2])}, key {tuple(key.shape[:-2])} "
                           f"and value {tuple(value.shape[:-2])} do not broadcast") from None


def _check_mask(attn_mask, query: torch.Tensor, batch: torch.Size, length: int, is_causal: bool) -> None:
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a tensor or None, got {type(attn_mask).__name__}")
    if is_causal:
        raise RuntimeError("attn_mask must be None when is_causal=True (the causal mask is the mask)")
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise RuntimeError(f"attn_mask must be bool or floating, got dtype {attn_mask.dtype}")
    if attn_mask.device != query.device:
        raise RuntimeError(f"attn_mask must be on query's device {query.device}, got {attn_mask.device}")
    want = (*batch, query.shape[-2], length)
    try:
        torch.broadcast_shapes(attn_mask.shape, want)
    except RuntimeError:
        raise RuntimeError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to the attention "
                           f"shape {want}") from None


def _check_options(dropout_p, is_causal, scale, enable_gqa) -> tuple[float, float | None]:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p <= 1.0:
        raise RuntimeError(f"dropout_p must be between 0 and 1, got {dropout_p}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    for value, name in ((is_causal, "is_causal"), (enable_gqa, "enable_gqa")):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return float(dropout_p), None if scale is None else float(scale)


# ---------------------------------------------------------------------------------------
# The references (the `torch` backend), in the accumulation dtype; they build L × S
# ---------------------------------------------------------------------------------------

def _scores(query: torch.Tensor, key: torch.Tensor, scale: float, is_causal: bool) -> torch.Tensor:
    """S = (scale · Q) Kᵀ in the accumulation dtype (scale on Q, as the kernels do: E = 0 with
    scale = inf gives S = 0, as torch's math path does), −inf where key j > query i when
    is_causal."""
    acc = acc_dtype(query.dtype)
    s = torch.matmul(query.to(acc) * scale, key.to(acc).transpose(-2, -1))
    if is_causal:
        length, keys = s.shape[-2:]
        kept = torch.ones(length, keys, dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~kept, -math.inf)
    return s


def scaled_dot_product_attention_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                           scale: float, is_causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, lse): O = softmax(S) V in query's dtype, lse = logsumexp_j S (acc dtype). S = 0 keys
    give O = 0 and lse = −inf, as torch's math path does. Differentiable any number of times."""
    s = _scores(query, key, scale, is_causal)
    out = torch.matmul(torch.softmax(s, dim=-1), value.to(s.dtype))
    return out.to(query.dtype), torch.logsumexp(s, dim=-1)


def _probabilities(query, key, logsumexp, scale, is_causal) -> torch.Tensor:
    """P = exp(S − lse) from the forward's lse, as the kernels recompute it."""
    return torch.exp(_scores(query, key, scale, is_causal) - logsumexp.unsqueeze(-1))


def scaled_dot_product_attention_backward_reference(grad_out, query, key, value, out, logsumexp, scale: float,
                                                    is_causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dQ, dK, dV) by the first-backward formulas of the module docstring, with P from the
    forward's lse and D = rowsum(dO ∘ O) from its O, as the kernels take them."""
    p = _probabilities(query, key, logsumexp, scale, is_causal)
    acc = p.dtype
    do, q, k, v = grad_out.to(acc), query.to(acc), key.to(acc), value.to(acc)
    d = (do * out.to(acc)).sum(-1, keepdim=True)
    ds = p * (torch.matmul(do, v.transpose(-2, -1)) - d)
    dq = scale * torch.matmul(ds, k)
    dk = scale * torch.matmul(ds.transpose(-2, -1), q)
    dv = torch.matmul(p.transpose(-2, -1), do)
    return dq.to(query.dtype), dk.to(key.dtype), dv.to(value.dtype)


def scaled_dot_product_attention_double_backward_reference(
        grad_grad_query, grad_grad_key, grad_grad_value, grad_out, query, key, value, out, logsumexp,
        scale: float, is_causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(∂dO, ∂Q, ∂K, ∂V) by the second-backward formulas of the module docstring (None
    cotangents are zero), with P from the forward's lse and D from its O."""
    p = _probabilities(query, key, logsumexp, scale, is_causal)
    acc = p.dtype
    do, q, k, v = grad_out.to(acc), query.to(acc), key.to(acc), value.to(acc)
    dp = torch.matmul(do, v.transpose(-2, -1))
    d = (do * out.to(acc)).sum(-1, keepdim=True)
    ds = p * (dp - d)
    h = torch.zeros_like(p)
    if grad_grad_query is not None:
        h = h + scale * torch.matmul(grad_grad_query.to(acc), k.transpose(-2, -1))
    if grad_grad_key is not None:
        h = h + scale * torch.matmul(q, grad_grad_key.to(acc).transpose(-2, -1))
    g_d = -(h * p).sum(-1, keepdim=True)
    g_dp = p * (h + g_d)
    g_p = h * (dp - d) + g_d * dp
    grad_grad_out = torch.matmul(g_dp, v)
    if grad_grad_value is not None:
        g_p = g_p + torch.matmul(do, grad_grad_value.to(acc).transpose(-2, -1))
        grad_grad_out = grad_grad_out + torch.matmul(p, grad_grad_value.to(acc))
    g_s = p * (g_p - (p * g_p).sum(-1, keepdim=True))
    grad_query = scale * torch.matmul(g_s, k)
    grad_key = scale * torch.matmul(g_s.transpose(-2, -1), q)
    if grad_grad_key is not None:
        grad_query = grad_query + scale * torch.matmul(ds, grad_grad_key.to(acc))
    if grad_grad_query is not None:
        grad_key = grad_key + scale * torch.matmul(ds.transpose(-2, -1), grad_grad_query.to(acc))
    grad_value = torch.matmul(g_dp.transpose(-2, -1), do)
    return (grad_grad_out.to(grad_out.dtype), grad_query.to(query.dtype), grad_key.to(key.dtype),
            grad_value.to(value.dtype))


def _double_backward_of_inputs(grad_grad_query, grad_grad_key, grad_grad_value, grad_out, query, key, value,
                               scale: float, is_causal: bool):
    """The double backward as a function of its inputs alone: O and lse recomputed from Q, K
    and V, so autograd through it gives total derivatives (the third order)."""
    out, logsumexp = scaled_dot_product_attention_reference(query, key, value, scale, is_causal)
    return scaled_dot_product_attention_double_backward_reference(
        grad_grad_query, grad_grad_key, grad_grad_value, grad_out, query, key, value, out, logsumexp, scale,
        is_causal)


def attention_unfused_reference(query, key, value, attn_mask, dropout_p: float, is_causal: bool, scale: float,
                                enable_gqa: bool) -> torch.Tensor:
    """torch's math backend, in the accumulation dtype, for the arguments the kernels do not
    take: a general attn_mask (bool: True takes part; float: added to S), dropout on P, and
    grouped-query attention (key and value heads repeated to query's). Builds L × S."""
    if enable_gqa:
        key = key.repeat_interleave(query.shape[-3] // key.shape[-3], dim=-3)
        value = value.repeat_interleave(query.shape[-3] // value.shape[-3], dim=-3)
    s = _scores(query, key, scale, is_causal)
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, -math.inf) if attn_mask.dtype == torch.bool else s + attn_mask.to(s.dtype)
    p = torch.softmax(s, dim=-1)
    if dropout_p > 0:
        p = torch.dropout(p, dropout_p, train=True)
    return torch.matmul(p, value.to(s.dtype)).to(query.dtype)


# ---------------------------------------------------------------------------------------
# Registered ops: the forward's backward is the backward op, whose own backward is the
# double-backward op, each on the backend being differentiated; the double backward's
# backward is autograd through the reference
# ---------------------------------------------------------------------------------------

def _attention_setup(ctx, inputs, output):
    query, key, value, scale, is_causal = inputs
    out, logsumexp = output
    ctx.save_for_backward(query, key, value, out, logsumexp)
    ctx.args = (scale, is_causal)
    # lse is the kernels' saved statistic, not a result the public function returns.
    ctx.mark_non_differentiable(logsumexp)


def _attention_grad(kernels, ctx, grad_out, grad_logsumexp):
    query, key, value, out, logsumexp = ctx.saved_tensors
    grads = kernels.scaled_dot_product_attention_backward(grad_out, query, key, value, out, logsumexp, *ctx.args)
    return (*grads, None, None)


def _attention_backward_setup(ctx, inputs, output):
    grad_out, query, key, value, out, logsumexp, scale, is_causal = inputs
    ctx.save_for_backward(grad_out, query, key, value, out, logsumexp)
    ctx.args = (scale, is_causal)
    # A cotangent autograd does not need stays None, and the kernel skips its terms (R1
    # through q alone leaves grad_key's and grad_value's unset).
    ctx.set_materialize_grads(False)


def _attention_backward_grad(kernels, ctx, grad_grad_query, grad_grad_key, grad_grad_value):
    if grad_grad_query is None and grad_grad_key is None and grad_grad_value is None:
        return (None,) * 8
    grads = kernels.scaled_dot_product_attention_double_backward(
        grad_grad_query, grad_grad_key, grad_grad_value, *ctx.saved_tensors, *ctx.args)
    # O and lse are functions of Q, K and V: the grads above are total, they get none of their own.
    return (*grads, None, None, None, None)


def _double_backward_setup(ctx, inputs, output):
    *tensors, out, logsumexp, scale, is_causal = inputs
    ctx.present = tuple(t is not None for t in tensors)
    ctx.save_for_backward(*(t for t in tensors if t is not None))
    ctx.args = (scale, is_causal)


def _double_backward_grad(kernels, ctx, *cotangents):
    saved = iter(ctx.saved_tensors)
    tensors = [next(saved) if present else None for present in ctx.present]
    given = [i for i, t in enumerate(tensors) if t is not None]

    def of_present(*present):
        args = list(tensors)
        for i, t in zip(given, present):
            args[i] = t
        return _double_backward_of_inputs(*args, *ctx.args)

    # torch.func.vjp composes with the autograd recording this backward (a fourth order).
    outputs, vjp = torch.func.vjp(of_present, *(tensors[i] for i in given))
    grads = vjp(tuple(torch.zeros_like(o) if c is None else c for o, c in zip(outputs, cotangents)))
    full = [None] * len(tensors)
    for i, g in zip(given, grads):
        full[i] = g
    return (*full, None, None, None, None)


def _contiguous_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _attention_fake(query, key, value, scale, is_causal):
    out = query.new_empty((query.shape[0], query.shape[1], value.shape[2]))
    return out, query.new_empty(query.shape[:2], dtype=acc_dtype(query.dtype))


def _qkv_examples(device, dtype):
    """(q, k, v, scale, is_causal): causal with L < S and L > S; E ≠ Ev; 70 queries over 67
    keys (a 64-row tile and its tail each way); E = 128 with few rows; a non-contiguous q
    (a (L, B, E) buffer's permute) and a k sliced from a wider buffer; one query, one key."""
    def t(*shape):
        return torch.randn(shape, device=device, dtype=dtype)
    return [
        (t(2, 5, 8), t(2, 7, 8), t(2, 7, 6), 0.3, True),
        (t(1, 9, 4), t(1, 5, 4), t(1, 5, 4), 0.5, True),
        (t(2, 70, 16), t(2, 67, 16), t(2, 67, 12), 0.25, False),
        (t(1, 3, 128), t(1, 4, 128), t(1, 4, 64), 128 ** -0.5, False),
        (t(6, 3, 8).permute(1, 0, 2), t(3, 5, 16)[..., ::2], t(3, 5, 5), 0.35, True),
        (t(1, 1, 3), t(1, 1, 3), t(1, 1, 2), 1.0, False),
    ]


def _backward_examples(device, dtype, requires_grad: bool = True):
    """(dO, q, k, v, O, lse, scale, is_causal) over _qkv_examples, O and lse the reference's."""
    examples = []
    for q, k, v, scale, is_causal in _qkv_examples(device, dtype):
        with torch.no_grad():
            out, logsumexp = scaled_dot_product_attention_reference(q, k, v, scale, is_causal)
        grad_out = torch.randn_like(out)
        if requires_grad:
            for t in (grad_out, q, k, v):
                t.requires_grad_()
        examples.append((grad_out, q, k, v, out, logsumexp, scale, is_causal))
    return examples


def _double_backward_examples(device, dtype):
    """(gQ, gK, gV, dO, q, k, v, O, lse, scale, is_causal): all three cotangents, then one of
    them None in turn (R1 through the query alone leaves gK and gV None)."""
    examples = []
    for i, (grad_out, q, k, v, out, logsumexp, scale, is_causal) in enumerate(
            _backward_examples(device, dtype, requires_grad=False)):
        cotangents = [torch.randn_like(q), torch.randn_like(k), torch.randn_like(v)]
        if i % 4:
            cotangents[i % 4 - 1] = None
        examples.append((*cotangents, grad_out, q, k, v, out, logsumexp, scale, is_causal))
    return examples


SCALED_DOT_PRODUCT_ATTENTION = _library.define(
    "scaled_dot_product_attention",
    "(Tensor query, Tensor key, Tensor value, float scale, bool is_causal) -> (Tensor, Tensor)",
    fake=_attention_fake, reference=scaled_dot_product_attention_reference,
    triton="scaled_dot_product_attention.scaled_dot_product_attention",
    backward=_attention_grad, setup_context=_attention_setup,
    examples=lambda device, dtype: [(q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), scale, causal)
                                    for q, k, v, scale, causal in _qkv_examples(device, dtype)])

SCALED_DOT_PRODUCT_ATTENTION_BACKWARD = _library.define(
    "scaled_dot_product_attention_backward",
    "(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor out, Tensor logsumexp, float scale, "
    "bool is_causal) -> (Tensor, Tensor, Tensor)",
    fake=lambda grad_out, query, key, value, out, logsumexp, scale, is_causal: (
        _contiguous_like(query), _contiguous_like(key), _contiguous_like(value)),
    reference=scaled_dot_product_attention_backward_reference,
    triton="scaled_dot_product_attention.scaled_dot_product_attention_backward",
    backward=_attention_backward_grad, setup_context=_attention_backward_setup,
    examples=_backward_examples)

SCALED_DOT_PRODUCT_ATTENTION_DOUBLE_BACKWARD = _library.define(
    "scaled_dot_product_attention_double_backward",
    "(Tensor? grad_grad_query, Tensor? grad_grad_key, Tensor? grad_grad_value, Tensor grad_out, Tensor query, "
    "Tensor key, Tensor value, Tensor out, Tensor logsumexp, float scale, bool is_causal) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
    fake=lambda ggq, ggk, ggv, grad_out, query, key, value, out, logsumexp, scale, is_causal: (
        _contiguous_like(grad_out), _contiguous_like(query), _contiguous_like(key), _contiguous_like(value)),
    reference=scaled_dot_product_attention_double_backward_reference,
    triton="scaled_dot_product_attention.scaled_dot_product_attention_double_backward",
    backward=_double_backward_grad, setup_context=_double_backward_setup,
    examples=_double_backward_examples)


# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------

def _fold(t: torch.Tensor, batch: torch.Size) -> torch.Tensor:
    """(…, n, f) broadcast to (*batch, n, f), then (B, n, f): a view where the strides allow."""
    return t.expand(*batch, *t.shape[-2:]).reshape(math.prod(batch), *t.shape[-2:])


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False, *,
                                 backend: str | None = None) -> torch.Tensor:
    """softmax(scale · Q Kᵀ + mask) V, as torch.nn.functional.scaled_dot_product_attention,
    differentiable any number of times (R1 through an attention critic).

    ``query`` (…, L, E), ``key`` (…, S, E), ``value`` (…, S, Ev): one float dtype, one
    device, batch dimensions that broadcast; returns (…, L, Ev). ``scale`` defaults to
    1 / sqrt(E); ``is_causal`` masks key j for query i where j > i (top-left aligned).

    Fused (no L × S tensor at any order of derivative, see the module docstring for the
    formulas): no ``attn_mask``, ``dropout_p == 0``, and key and value with as many heads as
    query (``enable_gqa`` or not). Half types accumulate in float32. ``backend`` picks the
    implementation (see ganops.use_backend).

    Not fused: a general ``attn_mask`` (bool: True takes part; float: added to the scores),
    ``dropout_p > 0`` and grouped-query attention with fewer key/value heads than query heads
    (``enable_gqa=True``) run the differentiable reference in torch ops: correct, and
    differentiable twice, but it builds L × S, as torch's math backend does.
    """
    _check_qkv(query, key, value)
    dropout_p, scale = _check_options(dropout_p, is_causal, scale, enable_gqa)
    if enable_gqa:
        _check_gqa_heads(query, key, value)
    batch = _batch_shape(query, key, value, enable_gqa)
    if attn_mask is not None:
        _check_mask(attn_mask, query, batch, key.shape[-2], is_causal)
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1]) if query.shape[-1] else math.inf
    grouped = enable_gqa and key.shape[-3] != query.shape[-3]
    if attn_mask is not None or dropout_p > 0 or grouped:
        _backend.resolve(backend, query.device)  # a backend named that cannot serve raises here too
        return attention_unfused_reference(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    length, value_features = query.shape[-2], value.shape[-1]
    out, _ = _library.call(SCALED_DOT_PRODUCT_ATTENTION, backend, query.device, _fold(query, batch),
                           _fold(key, batch), _fold(value, batch), scale, is_causal)
    return out.reshape(*batch, length, value_features)
