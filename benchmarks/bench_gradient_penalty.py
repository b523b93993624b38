"""WGAN-GP gradient penalty against the formula as training scripts write it.

Three cases: the fused penalty alone, forward and backward, on an input gradient of an image
batch; one whole critic step (Wasserstein loss, penalty, backward into every critic
parameter) for a DCGAN critic at 64x64, where the critic's own double backward dominates; and
StyleGAN's real-image phase, the main loss and R1 from one forward of the reals, with
ganops.input_gradient_penalty against the hand-written version (and ganops.r1_penalty, which
runs a forward of its own, for comparison).
"""

from __future__ import annotations

import torch
from torch import nn

import ganops
from benchmarks.harness import Case, Impl, Target

WEIGHT = 10.0


def eager_penalty(grads: torch.Tensor) -> torch.Tensor:
    """The penalty as written in training scripts (Gulrajani et al.'s reference code)."""
    return WEIGHT * ((grads.reshape(grads.shape[0], -1).norm(2, dim=1) - 1) ** 2).mean()


def _penalty_case(device: str) -> Case:
    g = torch.Generator().manual_seed(0)
    # Per-sample norms near 1, as in a trained critic.
    grads = (torch.randn(64, 3, 64, 64, generator=g) / 110.0).to(device).requires_grad_(True)

    def fwd_bwd(penalty_fn):
        def run():
            p = penalty_fn(grads)
            return p, torch.autograd.grad(p, grads)[0]
        return run

    impls = [Impl(f"ganops {b}", fwd_bwd(lambda x, b=b: ganops.gradient_norm_penalty(x, weight=WEIGHT, backend=b)))
             for b in ganops.available_backends(device)]
    impls.append(Impl("torch.compile(eager)", fwd_bwd(torch.compile(eager_penalty, fullgraph=True))))
    return Case(op="gradient_penalty", name="penalty fwd+bwd, grads (64,3,64,64) fp32", device=device,
                reference=Impl("eager", fwd_bwd(eager_penalty)), impls=impls, rtol=1e-5, atol=1e-7,
                targets=[Target("ganops cpp", ("eager",), 3.0)],
                # Memory-bound: the forward reads grads, the backward reads them and writes
                # their gradient.
                bytes_moved=3 * grads.nbytes)


def dcgan_critic(width: int = 64) -> nn.Module:
    """DCGAN's discriminator at 64x64 with layer norms in place of batch norm, as WGAN-GP
    prescribes (batch norm mixes samples, which the per-sample penalty forbids)."""
    layers = [nn.Conv2d(3, width, 4, 2, 1), nn.LeakyReLU(0.2)]
    size, ch = 32, width
    for _ in range(3):
        size //= 2
        layers += [nn.Conv2d(ch, ch * 2, 4, 2, 1), nn.LayerNorm([ch * 2, size, size]), nn.LeakyReLU(0.2)]
        ch *= 2
    layers += [nn.Conv2d(ch, 1, 4, 1, 0), nn.Flatten()]
    return nn.Sequential(*layers)


def canonical_gp(critic, real, fake, alpha):
    a = alpha.view(-1, 1, 1, 1)
    x_hat = (a * real + (1 - a) * fake).requires_grad_(True)
    out = critic(x_hat)
    grads = torch.autograd.grad(out, x_hat, torch.ones_like(out), create_graph=True)[0]
    return eager_penalty(grads)


def _critic_step_case(device: str, batch: int = 16) -> Case:
    torch.manual_seed(0)
    critic = dcgan_critic().to(device)
    params = list(critic.parameters())
    g = torch.Generator().manual_seed(1)
    real = torch.randn(batch, 3, 64, 64, generator=g).to(device)
    fake = torch.randn(batch, 3, 64, 64, generator=g).to(device)
    alpha = torch.rand(batch, generator=g).to(device)

    def step(penalty_fn):
        def run():
            for p in params:
                p.grad = None
            loss = critic(fake).mean() - critic(real).mean() + penalty_fn(critic, real, fake, alpha)
            loss.backward()
            return (loss.detach(), *[p.grad for p in params])
        return run

    impls = [Impl(f"ganops {b}", step(lambda c, r, f, a, b=b: ganops.gradient_penalty(c, r, f, alpha=a, backend=b)))
             for b in ganops.available_backends(device)]
    # The critic's forward and double backward are the same ATen work on both sides; the fused
    # pieces save well under 1 ms of a ~300 ms step (one thread, this CPU), so the ratio is
    # 1.0 within timing noise: the target says the ganops path is never slower.
    return Case(op="gradient_penalty", name=f"DCGAN critic step + GP, batch {batch} 64x64 fp32", device=device,
                reference=Impl("hand-written GP", step(canonical_gp)), impls=impls, rtol=1e-4, atol=1e-6,
                targets=[Target("ganops cpp", ("hand-written GP",), 1.0)])


GAMMA = 10.0


def _stylegan_real_phase_case(device: str, batch: int = 16) -> Case:
    torch.manual_seed(0)
    critic = dcgan_critic().to(device)
    params = list(critic.parameters())
    real = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(2)).to(device)

    def phase(loss_fn):
        def run():
            for p in params:
                p.grad = None
            loss = loss_fn()
            loss.backward()
            return (loss.detach(), *[p.grad for p in params])
        return run

    def hand_written():
        # StyleGAN2-ADA's Dmain + Dr1 on reals: one forward, R1 from its logits.
        x = real.detach().requires_grad_(True)
        logits = critic(x)
        (r1_grads,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
        r1 = r1_grads.square().sum([1, 2, 3])
        return (torch.nn.functional.softplus(-logits).flatten() + r1 * (GAMMA / 2)).mean()

    def shared_forward(backend):
        def loss():
            x = real.detach().requires_grad_(True)
            logits = critic(x)
            return (torch.nn.functional.softplus(-logits).mean()
                    + ganops.input_gradient_penalty(logits, x, center=0.0, weight=GAMMA / 2, backend=backend))
        return loss

    def second_forward(backend):
        def loss():
            return (torch.nn.functional.softplus(-critic(real)).mean()
                    + ganops.r1_penalty(critic, real, gamma=GAMMA, backend=backend))
        return loss

    impls = [Impl(f"ganops {b}", phase(shared_forward(b))) for b in ganops.available_backends(device)]
    impls += [Impl(f"ganops {b} r1_penalty (own forward)", phase(second_forward(b)))
              for b in ganops.available_backends(device)]
    return Case(op="gradient_penalty", name=f"StyleGAN real phase: loss + R1, one forward, batch {batch} 64x64 fp32",
                device=device, reference=Impl("hand-written R1", phase(hand_written)), impls=impls,
                rtol=1e-4, atol=1e-6, targets=[Target("ganops cpp", ("hand-written R1",), 1.0)])


def cases(device: str) -> list[Case]:
    return [_penalty_case(device), _critic_step_case(device), _stylegan_real_phase_case(device)]
