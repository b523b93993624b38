"""Scaled-dot-product attention: R1 through an attention critic, and the plain training step.

R1 step: StyleGAN's real phase (softplus loss plus γ/2·‖∇ₓD(x)‖², one forward, backward into
every parameter) through a small attention critic: batch 4, 4 heads of dimension 64 (embed
256), T tokens, a LeakyReLU MLP before and after one self-attention block with a residual.
The critic holds ganops.nn.MultiheadAttention on the ganops side and torch.nn.MultiheadAttention
under sdpa_kernel(SDPBackend.MATH) on torch's: the math backend is the only torch attention
with a double backward (the fast CPU kernel and the flash/memory-efficient CUDA kernels have
none), and it keeps several T × T matrices. Timed and measured for peak memory at T = 2048
and 1024.

Forward + backward with no penalty: the attention alone on (4, 4, 1024, 64) query, key and
value, against F.scaled_dot_product_attention with torch's default choice of kernel (the
flash kernel on CPU and on CUDA), and the math backend for comparison.

A call of the R1 step at T = 2048 takes seconds on a CPU (the math backend builds 4·4·T² =
67 M-entry score matrices): those cases time 3 calls after the verification call. Their peak
memory on the CPU is the growth of the resident set during one call, after the C heap's free
pages are handed back to the OS (harness.release_freed_memory): otherwise tensors under
glibc's 32 MiB mmap threshold reuse pages that earlier calls freed and go uncounted
(measured: 2 MiB shown for 320 MiB of 8 MiB tensors after such calls; 320 MiB with the
release).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import ganops
from benchmarks.harness import Case, Impl, Target, release_freed_memory

BATCH, HEADS, HEAD_DIM = 4, 4, 64
EMBED = HEADS * HEAD_DIM
GAMMA = 10.0


class AttentionCritic(nn.Module):
    """(N, T, EMBED) tokens -> one score per sample: LeakyReLU MLP, self-attention with a
    residual, LeakyReLU MLP, mean over tokens."""

    def __init__(self, attention: nn.MultiheadAttention):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(EMBED, EMBED), nn.LeakyReLU(0.2))
        self.attention = attention
        self.head = nn.Sequential(nn.Linear(EMBED, EMBED), nn.LeakyReLU(0.2), nn.Linear(EMBED, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h + self.attention(h, h, h, need_weights=False)[0]
        return self.head(h).mean((1, 2))


def _critic(attention: nn.MultiheadAttention, device: str) -> AttentionCritic:
    torch.manual_seed(0)  # the same parameters whichever attention module it holds
    attention.load_state_dict(nn.MultiheadAttention(EMBED, HEADS, batch_first=True).state_dict())
    return AttentionCritic(attention).to(device)


def _r1_step(critic: AttentionCritic, real: torch.Tensor, math_backend: bool = False):
    params = list(critic.parameters())

    def run():
        for p in params:
            p.grad = None
        x = real.detach().requires_grad_(True)
        with sdpa_kernel(SDPBackend.MATH) if math_backend else contextlib.nullcontext():
            logits = critic(x)
            (grads,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
            loss = F.softplus(-logits).mean() + GAMMA / 2 * grads.square().sum((1, 2)).mean()
            loss.backward()
        return (loss.detach(), *[p.grad for p in params])
    return run


def _r1_case(tokens: int, device: str) -> Case:
    real = torch.randn(BATCH, tokens, EMBED, generator=torch.Generator().manual_seed(1)).to(device)
    # Seconds a call: 3 timed calls (the verification call before them warms up). Freed heap
    # pages go back to the OS before every call, so the resident-set peak counts all the
    # memory a call touches.
    settings = dict(repeats=(0, 3), reset=release_freed_memory)
    reference = Impl("torch math backend", _r1_step(_critic(nn.MultiheadAttention(EMBED, HEADS, batch_first=True),
                                                            device), real, math_backend=True), **settings)
    impls = [Impl(f"ganops {b}", _r1_step(_critic(ganops.nn.MultiheadAttention(EMBED, HEADS, batch_first=True,
                                                                               backend=b), device), real),
                  **settings)
             for b in ganops.available_backends(device) if b != "torch"]
    # The first ganops backend (cpp where built) holds the targets.
    targets = [Target(impls[0].label, (reference.label,), 1.0, memory_fraction=0.3)] if impls else []
    return Case(op="scaled_dot_product_attention", name=f"R1 step, attention critic T={tokens}, fp32",
                device=device, reference=reference, impls=impls, rtol=1e-4, atol=1e-6, targets=targets,
                measure_memory=True)


def _attention_fwd_bwd(attend, query, key, value, grad):
    def run():
        leaves = [t.detach().requires_grad_() for t in (query, key, value)]
        out = attend(*leaves)
        return (out.detach(), *torch.autograd.grad(out, leaves, grad))
    return run


def _fwd_bwd_case(tokens: int, device: str) -> Case:
    g = torch.Generator().manual_seed(2)
    query, key, value, grad = (torch.randn(BATCH, HEADS, tokens, HEAD_DIM, generator=g).to(device) for _ in range(4))

    def math_attention(*qkv):
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(*qkv)

    ours = [Impl(f"ganops {b}", _attention_fwd_bwd(
                lambda *qkv, b=b: ganops.scaled_dot_product_attention(*qkv, backend=b), query, key, value, grad))
            for b in ganops.available_backends(device) if b != "torch"]
    reference = Impl("F.scaled_dot_product_attention",
                     _attention_fwd_bwd(F.scaled_dot_product_attention, query, key, value, grad))
    targets = [Target(ours[0].label, (reference.label,), 0.8)] if ours else []
    return Case(op="scaled_dot_product_attention",
                name=f"fwd+bwd, no penalty ({BATCH},{HEADS},{tokens},{HEAD_DIM}), fp32", device=device,
                reference=reference,
                impls=[*ours, Impl("torch math backend", _attention_fwd_bwd(math_attention, query, key, value, grad))],
                rtol=1e-4, atol=1e-5, targets=targets)


def cases(device: str) -> list[Case]:
    return [_r1_case(2048, device), _r1_case(1024, device), _fwd_bwd_case(1024, device)]
