"""Tests of ganops.nn.MultiheadAttention, the drop-in for torch.nn.MultiheadAttention whose
attention runs through ganops.scaled_dot_product_attention.

References: torch's module loaded from the same state_dict (its behaviour is the contract:
outputs, gradients, errors), with the math backend of scaled_dot_product_attention, the only
torch path that has a double backward; and multi-head attention written out here in float64
(``written_out_attention``). The op's own math is tests/test_scaled_dot_product_attention.py's.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import ganops
import ganops.nn.multihead_attention as mha_module
from conftest import tol
# Every (device, backend), the Triton one skipped where its attention kernels are not in the tree.
from test_scaled_dot_product_attention import BACKENDS

F64 = tol(torch.float64)


def rand(*shape, seed=0, device="cpu"):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(device)


def module_pair(device, backend, seed=0, **kwargs):
    """(ganops module, torch module) in float64 with the same parameters: torch's initialised
    from ``seed`` (biases made nonzero, so a dropped bias shows), loaded into ganops'."""
    torch.manual_seed(seed)
    theirs = nn.MultiheadAttention(**kwargs, device=device, dtype=torch.float64)
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = ganops.nn.MultiheadAttention(**kwargs, device=device, dtype=torch.float64, backend=backend)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


# (module arguments, query length, key length, self-attention): torch's packed projection on
# self-attention (query is key is value), separate projections with kdim/vdim, a learned key
# bias and a zero key appended, no biases on a cross-attention whose key is its value.
CONFIGS = {
    "packed-self": (dict(embed_dim=8, num_heads=2, batch_first=True), 5, 5, True),
    "kdim-vdim": (dict(embed_dim=8, num_heads=2, kdim=5, vdim=3), 4, 6, False),
    "bias-kv-zero-attn": (dict(embed_dim=8, num_heads=4, add_bias_kv=True, add_zero_attn=True, batch_first=True),
                          6, 6, True),
    "no-bias-cross": (dict(embed_dim=6, num_heads=3, bias=False), 3, 7, False),
}


def inputs(config, batch=3, device="cpu", batched=True):
    """(query, key, value) for ``config``, in its layout; one tensor three times for self-attention."""
    kwargs, tgt_len, src_len, self_attention = CONFIGS[config]
    e = kwargs["embed_dim"]

    def shaped(length, dim, seed):
        if not batched:
            return rand(length, dim, seed=seed, device=device)
        return rand(batch, length, dim, seed=seed, device=device) if kwargs.get("batch_first") \
            else rand(length, batch, dim, seed=seed, device=device)

    query = shaped(tgt_len, e, 1)
    if self_attention:
        return query, query, query
    key = shaped(src_len, kwargs.get("kdim") or e, 2)
    value = key if "kdim" not in kwargs else shaped(src_len, kwargs["vdim"], 3)
    return query, key, value


def masks(kind, config, batch=3, device="cpu"):
    """Forward keyword arguments for each kind of mask torch's module takes."""
    kwargs, tgt_len, src_len, _ = CONFIGS[config]
    g = torch.Generator().manual_seed(4)
    padding = torch.rand(batch, src_len, generator=g) < 0.3
    padding[:, 0] = False  # every query keeps a key: no all-masked row
    causal = torch.ones(tgt_len, src_len, dtype=torch.bool).tril().logical_not()
    if kind == "none":
        return {}
    if kind == "key-padding":
        return dict(key_padding_mask=padding.to(device))
    if kind == "float-2d":
        return dict(attn_mask=rand(tgt_len, src_len, seed=5, device=device))
    if kind == "bool-3d+key-padding":
        per_head = torch.rand(batch * kwargs["num_heads"], tgt_len, src_len, generator=g) < 0.3
        per_head[..., 0] = False
        return dict(attn_mask=per_head.to(device), key_padding_mask=padding.to(device))
    if kind == "causal":
        return dict(attn_mask=causal.to(device), is_causal=True)
    raise ValueError(kind)


MASKS = ["none", "key-padding", "float-2d", "bool-3d+key-padding", "causal"]


def outputs_and_grads(module, query, key, value, **forward_kwargs):
    """The module's output and the gradients of a fixed random loss of it with respect to
    the distinct inputs and every parameter."""
    leaves = {}
    for t in (query, key, value):
        leaves.setdefault(id(t), t.detach().requires_grad_())
    args = [leaves[id(t)] for t in (query, key, value)]
    out, weights = module(*args, **forward_kwargs)
    cotangent = rand(*out.shape, seed=6, device=out.device)
    grads = torch.autograd.grad((out * cotangent).sum(), [*leaves.values(), *module.parameters()])
    return out, weights, grads


def assert_same_as_torch(ours, theirs, query, key, value, **forward_kwargs):
    with sdpa_kernel(SDPBackend.MATH):
        want_out, want_weights, want_grads = outputs_and_grads(theirs, query, key, value, **forward_kwargs)
    got_out, got_weights, got_grads = outputs_and_grads(ours, query, key, value, **forward_kwargs)
    torch.testing.assert_close(got_out, want_out, **F64)
    if want_weights is None:
        assert got_weights is None
    else:
        torch.testing.assert_close(got_weights, want_weights, **F64)
    assert len(got_grads) == len(want_grads)
    for got, want in zip(got_grads, want_grads):
        torch.testing.assert_close(got, want, **F64)


# ---------------------------------------------------------------------------------------
# Same numbers as torch's module
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_fast_path_matches_torch(device, backend, config, mask):
    """need_weights=False: output, input and parameter gradients equal torch's module's."""
    ours, theirs = module_pair(device, backend, **CONFIGS[config][0])
    assert_same_as_torch(ours, theirs, *inputs(config, device=device), need_weights=False,
                         **masks(mask, config, device=device))


@pytest.mark.parametrize("average", [True, False])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_need_weights_is_torch_computation(config, average):
    """need_weights=True returns torch's weights (averaged over heads or per head)."""
    ours, theirs = module_pair("cpu", "torch", **CONFIGS[config][0])
    assert_same_as_torch(ours, theirs, *inputs(config), need_weights=True, average_attn_weights=average,
                         **masks("key-padding", config))


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_unbatched_input(device, backend, need_weights):
    ours, theirs = module_pair(device, backend, **CONFIGS["kdim-vdim"][0])
    padding = torch.tensor([False, True, False, False, True, False], device=device)
    assert_same_as_torch(ours, theirs, *inputs("kdim-vdim", device=device, batched=False),
                         need_weights=need_weights, key_padding_mask=padding)


def test_dropout_is_applied_in_training_only():
    ours, _ = module_pair("cpu", "torch", embed_dim=8, num_heads=2, dropout=0.5)
    query = rand(5, 2, 8)
    first, _ = ours(query, query, query, need_weights=False)
    second, _ = ours(query, query, query, need_weights=False)
    assert not torch.equal(first, second)
    ours.eval()
    torch.testing.assert_close(ours(query, query, query, need_weights=False)[0],
                               ours(query, query, query, need_weights=False)[0], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------
# Written out in float64
# ---------------------------------------------------------------------------------------

def written_out_attention(module, query, key, value, key_padding_mask, attn_mask):
    """Multi-head attention of a packed module (sequence first, float masks) in float64:
    out = concat_h softmax(Q_h K_hᵀ / sqrt(d) + mask) V_h, projected by out_proj."""
    w_q, w_k, w_v = module.in_proj_weight.detach().double().chunk(3)
    b_q, b_k, b_v = module.in_proj_bias.detach().double().chunk(3)
    heads, d = module.num_heads, module.head_dim
    (tgt_len, batch, _), src_len = query.shape, key.shape[0]

    def split(x, w, b):  # (T, N, E) -> (N, heads, T, d)
        return (x.double() @ w.T + b).reshape(x.shape[0], batch, heads, d).permute(1, 2, 0, 3)

    q, k, v = split(query, w_q, b_q), split(key, w_k, b_k), split(value, w_v, b_v)
    scores = torch.einsum("nhld,nhsd->nhls", q, k) / d ** 0.5 + attn_mask.reshape(1, 1, tgt_len, src_len)
    scores = scores + key_padding_mask.reshape(batch, 1, 1, src_len)
    out = torch.einsum("nhls,nhsd->nhld", scores.softmax(-1), v).permute(2, 0, 1, 3).reshape(tgt_len, batch, -1)
    return out @ module.out_proj.weight.detach().double().T + module.out_proj.bias.detach().double()


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_matches_written_out_attention(device, backend):
    module, _ = module_pair(device, backend, embed_dim=8, num_heads=2)
    query, key = rand(5, 2, 8, seed=1, device=device), rand(7, 2, 8, seed=2, device=device)
    padding = torch.zeros(2, 7, dtype=torch.float64, device=device)
    padding[1, 4:] = float("-inf")
    bias = rand(5, 7, seed=3, device=device)
    got, _ = module(query, key, key, key_padding_mask=padding, attn_mask=bias, need_weights=False)
    torch.testing.assert_close(got, written_out_attention(module, query, key, key, padding, bias), **F64)


# ---------------------------------------------------------------------------------------
# R1 through a critic with attention: the double backward
# ---------------------------------------------------------------------------------------

class AttentionCritic(nn.Module):
    """A small critic over (N, T, C) tokens: LeakyReLU MLP in, self-attention with a residual,
    LeakyReLU MLP out (no last bias: R1 does not reach it), mean over tokens."""

    def __init__(self, attention: nn.Module, channels: int = 3, embed_dim: int = 8, is_causal: bool = False):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(channels, embed_dim), nn.LeakyReLU(0.2))
        self.attention = attention
        self.head = nn.Sequential(nn.Linear(embed_dim, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1, bias=False))
        self.is_causal = is_causal

    def forward(self, x):
        h = self.embed(x)
        causal = nn.Transformer.generate_square_subsequent_mask(h.shape[1], device=h.device, dtype=h.dtype) \
            if self.is_causal else None
        h = h + self.attention(h, h, h, need_weights=False, attn_mask=causal, is_causal=self.is_causal)[0]
        return self.head(h).mean(1)


def r1_and_grads(critic, real):
    x = real.detach().requires_grad_()
    (grad_x,) = torch.autograd.grad(critic(x).sum(), x, create_graph=True)
    r1 = grad_x.square().sum()
    return r1, torch.autograd.grad(r1, list(critic.parameters()))


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_r1_through_an_attention_critic(device, backend, is_causal):
    """R1's value and every parameter's gradient (the double backward through the attention)
    equal those of the same critic with torch's module on the math backend."""
    ours, theirs = module_pair(device, backend, embed_dim=8, num_heads=2, batch_first=True)
    torch.manual_seed(1)
    critic_ours = AttentionCritic(ours, is_causal=is_causal).to(device, torch.float64)
    critic_theirs = AttentionCritic(theirs, is_causal=is_causal).to(device, torch.float64)
    critic_theirs.load_state_dict(critic_ours.state_dict())
    real = rand(2, 6, 3, seed=7, device=device)
    got, got_grads = r1_and_grads(critic_ours, real)
    with sdpa_kernel(SDPBackend.MATH):
        want, want_grads = r1_and_grads(critic_theirs, real)
    torch.testing.assert_close(got, want, **F64)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, **F64)
    assert want > 0


# ---------------------------------------------------------------------------------------
# What goes through the op
# ---------------------------------------------------------------------------------------

@pytest.fixture
def op_calls(monkeypatch):
    """The keyword arguments of every call the module makes to ganops' op."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return ganops.scaled_dot_product_attention(*args, **kwargs)

    monkeypatch.setattr(mha_module, "scaled_dot_product_attention", spy)
    return calls


@pytest.mark.parametrize("mask,fused", [("none", True), ("causal", True), ("key-padding", False)])
def test_fast_path_calls_the_op(op_calls, mask, fused):
    """need_weights=False calls ganops' op, with no mask where it can run fused (no mask, or
    the causal hint without padding) and with the folded float mask otherwise."""
    module, _ = module_pair("cpu", "torch", **CONFIGS["packed-self"][0])
    query, key, value = inputs("packed-self")
    module(query, key, value, need_weights=False, **masks(mask, "packed-self"))
    assert len(op_calls) == 1 and op_calls[0]["backend"] == "torch"
    assert (op_calls[0]["attn_mask"] is None) == fused
    assert op_calls[0]["is_causal"] == (mask == "causal")
    if not fused:
        assert op_calls[0]["attn_mask"].dtype == torch.float64
    module(query, key, value, need_weights=True)
    assert len(op_calls) == 1


def test_swaps_into_a_transformer_layer(op_calls):
    """nn.TransformerEncoderLayer calls its self_attn with need_weights=False: a ganops module
    put in its place runs the op and gives the layer's numbers."""
    torch.manual_seed(0)
    theirs = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True, dtype=torch.float64)
    ours = copy.deepcopy(theirs)
    ours.self_attn = ganops.nn.MultiheadAttention(8, 2, batch_first=True, dtype=torch.float64, backend="torch")
    ours.self_attn.load_state_dict(theirs.self_attn.state_dict())
    x = rand(2, 5, 8)
    with sdpa_kernel(SDPBackend.MATH):
        want = theirs(x, is_causal=True, src_mask=nn.Transformer.generate_square_subsequent_mask(5, dtype=x.dtype))
    got = ours(x, is_causal=True, src_mask=nn.Transformer.generate_square_subsequent_mask(5, dtype=x.dtype))
    torch.testing.assert_close(got, want, **F64)
    assert len(op_calls) == 1 and op_calls[0]["is_causal"] and op_calls[0]["attn_mask"] is None


# ---------------------------------------------------------------------------------------
# Checkpoints move both ways
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", ["packed-self", "kdim-vdim", "bias-kv-zero-attn"])
def test_state_dict_round_trip(config):
    kwargs = CONFIGS[config][0]
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(**kwargs, dtype=torch.float64)
    ours = ganops.nn.MultiheadAttention(**kwargs, dtype=torch.float64)
    assert isinstance(ours, nn.MultiheadAttention)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    query, key, value = inputs(config)
    torch.testing.assert_close(ours(query, key, value, need_weights=False)[0],
                               theirs(query, key, value, need_weights=False)[0], **F64)
    back = nn.MultiheadAttention(**kwargs, dtype=torch.float64)
    back.load_state_dict(ours.state_dict(), strict=True)
    for name, tensor in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_same_initialisation_as_torch():
    torch.manual_seed(3)
    theirs = nn.MultiheadAttention(8, 2, kdim=5, vdim=3, add_bias_kv=True)
    torch.manual_seed(3)
    ours = ganops.nn.MultiheadAttention(8, 2, kdim=5, vdim=3, add_bias_kv=True)
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------------------------------
# Bad input: torch's errors
# ---------------------------------------------------------------------------------------

def raised(fn):
    with pytest.raises(Exception) as info:
        fn()
    return info.value


@pytest.mark.parametrize("case", ["query-embed-dim", "attn-mask-shape", "attn-mask-rank", "causal-without-mask",
                                  "integer-padding-mask", "query-rank", "key-value-lengths"])
def test_bad_input_gets_torch_errors(case):
    ours, theirs = module_pair("cpu", "torch", embed_dim=8, num_heads=2)
    x = rand(5, 2, 8)
    args, kwargs = (x, x, x), {}
    if case == "query-embed-dim":
        args = (rand(5, 2, 7), x, x)
    elif case == "attn-mask-shape":
        kwargs = dict(attn_mask=torch.zeros(5, 4, dtype=torch.float64))
    elif case == "attn-mask-rank":
        kwargs = dict(attn_mask=torch.zeros(1, 1, 5, 5, dtype=torch.float64))
    elif case == "causal-without-mask":
        kwargs = dict(is_causal=True)
    elif case == "integer-padding-mask":
        kwargs = dict(key_padding_mask=torch.zeros(2, 5, dtype=torch.int64))
    elif case == "query-rank":
        args = (rand(5, 2, 8, 1), x, x)
    elif case == "key-value-lengths":
        args = (x, rand(6, 2, 8), x)
    want = raised(lambda: theirs(*args, need_weights=False, **kwargs))
    got = raised(lambda: ours(*args, need_weights=False, **kwargs))
    assert type(got) is type(want)
    assert str(got) == str(want)
