"""Multi-head attention whose attention gradient penalties can go through: a drop-in for
torch.nn.MultiheadAttention over ganops.scaled_dot_product_attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ganops.ops.scaled_dot_product_attention import scaled_dot_product_attention


class MultiheadAttention(nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` with its attention computed by
    ``ganops.scaled_dot_product_attention``, so R1 and WGAN-GP differentiate through it
    without the math backend's L×S attention matrices.

    The same constructor, parameters (``in_proj_weight`` or ``q/k/v_proj_weight``,
    ``in_proj_bias``, ``out_proj``, ``bias_k``, ``bias_v``), initialisation and state_dict
    keys as torch's module, which it subclasses: a torch checkpoint loads into it and the
    other way round, and ``isinstance(m, torch.nn.MultiheadAttention)`` holds. The forward
    takes torch's arguments and returns ``(attn_output, attn_weights)``:

        out = concat_h(softmax(Q_h K_hᵀ / sqrt(head_dim) + mask) V_h) W_oᵀ + b_o,
        Q = query W_qᵀ + b_q,  K = key W_kᵀ + b_k,  V = value W_vᵀ + b_v,

    query (L, N, E) or (N, L, E) with ``batch_first``, or unbatched (L, E); key (S, N, kdim),
    value (S, N, vdim) likewise; attn_output the shape of query.

    - ``need_weights=False`` (the fast path; ``attn_weights`` is None): the projections and
      masks as torch computes them, then the attention through the ganops op on
      (N, num_heads, L, head_dim). Without masks, or with ``is_causal=True`` and the causal
      ``attn_mask`` but no ``key_padding_mask`` (torch passes the hint on as ``is_causal``
      there), the op runs its fused kernels: no L×S tensor at any order of derivative.
      A ``key_padding_mask`` or a general ``attn_mask`` is folded into one float mask, as
      torch does; the op takes that, and dropout in training, on its differentiable
      reference: correct, not fused.
    - ``need_weights=True`` (torch's default): torch's own computation, which must build the
      L×S weights it returns.

    Args: those of torch.nn.MultiheadAttention, plus
        backend: ganops backend of the attention (None: the current default).
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False, device=None, dtype=None, *,
                 backend: str | None = None):
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, add_bias_kv=add_bias_kv,
                         add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim, batch_first=batch_first,
                         device=device, dtype=dtype)
        self.backend = backend

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if need_weights:
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=True,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        # torch's own checks and mask conversions, so bad input gets torch's errors.
        is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, self.num_heads)
        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                             target_type=query.dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                               "module method `generate_square_subsequent_mask` to create this mask.")
        if is_causal and key_padding_mask is None:
            # The hint stands for the mask: the op's fused causal path.
            attn_mask = None
        else:
            attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                          target_type=query.dtype, check_other=False)
            # Either not causal, or the causal mask merged with the padding mask, which is no
            # longer causal: the merged mask says it all.
            is_causal = False
        query, key, value = _sequence_first(query, key, value, is_batched, self.batch_first)
        if key_padding_mask is not None and not is_batched:
            key_padding_mask = key_padding_mask.unsqueeze(0)
        out = self._attention(query, key, value, key_padding_mask, attn_mask, is_causal)
        if not is_batched:
            return out.squeeze(1), None
        return (out.transpose(0, 1) if self.batch_first else out), None

    def _attention(self, query, key, value, key_padding_mask, attn_mask, is_causal):
        """torch's multi-head attention without the weights, sequence first: query (L, N, E),
        key (S, N, kdim), value (S, N, vdim), masks float or None -> (L, N, E)."""
        tgt_len, bsz, embed_dim = query.shape
        if embed_dim != self.embed_dim:
            raise AssertionError(f"was expecting embedding dimension of {self.embed_dim}, but got {embed_dim}")
        heads, head_dim = self.num_heads, self.head_dim
        if self._qkv_same_embed_dim:
            if key.shape != value.shape:
                raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")
            q, k, v = F._in_projection_packed(query, key, value, self.in_proj_weight, self.in_proj_bias)
        else:
            if key.shape[:2] != value.shape[:2]:
                raise AssertionError(f"key's sequence and batch dims {key.shape[:2]} do not match value's "
                                     f"{value.shape[:2]}")
            biases = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
            q, k, v = F._in_projection(query, key, value, self.q_proj_weight, self.k_proj_weight,
                                       self.v_proj_weight, *biases)
        if attn_mask is not None:
            attn_mask = _batched_attn_mask(attn_mask, bsz * heads, tgt_len, key.shape[0])
        # Appended key/value positions (a learned bias, then a zero): every mask gets a column
        # of 0 (attend) for each, as in torch.
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            attn_mask, key_padding_mask = _pad_key_axis(attn_mask, key_padding_mask)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(1, bsz, embed_dim)])
            v = torch.cat([v, v.new_zeros(1, bsz, embed_dim)])
            attn_mask, key_padding_mask = _pad_key_axis(attn_mask, key_padding_mask)
        src_len = k.shape[0]
        # (T, N, E) -> (N, heads, T, head_dim), views of the projections.
        q, k, v = (t.view(t.shape[0], bsz, heads, head_dim).permute(1, 2, 0, 3) for t in (q, k, v))
        if attn_mask is not None:
            attn_mask = attn_mask.view(-1, heads, tgt_len, src_len) if attn_mask.shape[0] > 1 \
                else attn_mask.unsqueeze(0)
        if key_padding_mask is not None:
            if key_padding_mask.shape != (bsz, src_len):
                raise AssertionError(f"expecting key_padding_mask shape of {(bsz, src_len)}, but got "
                                     f"{tuple(key_padding_mask.shape)}")
            padding = key_padding_mask.view(bsz, 1, 1, src_len)
            attn_mask = padding if attn_mask is None else attn_mask + padding
        out = scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=is_causal, backend=self.backend)
        out = out.permute(2, 0, 1, 3).reshape(tgt_len * bsz, embed_dim)
        return F.linear(out, self.out_proj.weight, self.out_proj.bias).view(tgt_len, bsz, embed_dim)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}" if self.backend else ""


def _sequence_first(query, key, value, is_batched, batch_first):
    """(L, N, E) views of the inputs, keeping ``query is key is value`` where it held (torch's
    packed projection runs one matmul for self-attention)."""
    if is_batched and not batch_first:
        return query, key, value

    def move(t):
        return t.transpose(0, 1) if is_batched else t.unsqueeze(1)

    moved_key = move(key)
    moved_value = moved_key if value is key else move(value)
    return (moved_key if query is key else move(query)), moved_key, moved_value


def _batched_attn_mask(attn_mask, batch_heads, tgt_len, src_len):
    """attn_mask of torch's shapes (L, S) or (N·heads, L, S) as a 3-D mask, or torch's error."""
    if attn_mask.dim() == 2:
        if attn_mask.shape != (tgt_len, src_len):
            raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be "
                               f"{(tgt_len, src_len)}.")
        return attn_mask.unsqueeze(0)
    if attn_mask.dim() == 3:
        if attn_mask.shape != (batch_heads, tgt_len, src_len):
            raise RuntimeError(f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                               f"{(batch_heads, tgt_len, src_len)}.")
        return attn_mask
    raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")


def _pad_key_axis(*masks):
    """Each mask (or None) with one more key position, unmasked."""
    return tuple(None if m is None else F.pad(m, (0, 1)) for m in masks)
