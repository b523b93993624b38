"""The ops together, as a critic uses them: penalties through spectral-normalised layers and
a minibatch-discrimination layer, against the same critic built from plain PyTorch.

The plain-PyTorch critic uses torch's own spectral_norm (the parametrization, or the hook API
against ganops.nn.utils.spectral_norm), a naive broadcast minibatch discrimination written
here, and the canonical WGAN-GP and R1 formulas.
"""

import pytest
import torch
from torch import nn

import ganops
from ganops.nn import MinibatchDiscrimination
from conftest import backend_params


class NaiveMinibatchDiscrimination(nn.Module):
    """o[i,b] = Σ_{j≠i} exp(−‖M[i,b]−M[j,b]‖₁) by broadcasting the N×N×B×C differences."""

    def __init__(self, in_features, out_features, kernel_dims):
        super().__init__()
        self.T = nn.Parameter(torch.randn(in_features, out_features, kernel_dims))

    def forward(self, x):
        M = (x @ self.T.flatten(1)).view(x.shape[0], self.T.shape[1], self.T.shape[2])
        o = torch.exp(-(M[:, None] - M[None]).abs().sum(-1)).sum(1) - 1
        return torch.cat([x, o], 1)


def paired_critics(spectral_norm, torch_spectral_norm, seed, dtype):
    """(ganops critic, plain-PyTorch critic) with identical parameters and power-iteration
    state: spectral-normalised linear layers around a minibatch-discrimination layer."""
    def build(spectral_norm, mbd):
        torch.manual_seed(seed)
        return nn.Sequential(
            spectral_norm(nn.Linear(6, 16)), nn.LeakyReLU(0.2),
            spectral_norm(nn.Linear(16, 12)), nn.LeakyReLU(0.2),
            mbd(12, 5, 3),
            spectral_norm(nn.Linear(12 + 5, 1))).to(dtype)

    ours = build(spectral_norm, MinibatchDiscrimination)
    ref = build(torch_spectral_norm, NaiveMinibatchDiscrimination)
    with torch.no_grad():
        # Small T keeps the similarities away from 0, so the layer matters to the result.
        ours[4].T.mul_(0.05)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def critics(dtype=torch.float64):
    """The parametrization API on both sides."""
    return paired_critics(ganops.spectral_norm, torch.nn.utils.parametrizations.spectral_norm, 0, dtype)


def canonical_gp(critic, real, fake, alpha, weight=10.0):
    x = (alpha.view(-1, 1) * real + (1 - alpha.view(-1, 1)) * fake).requires_grad_(True)
    (g,) = torch.autograd.grad(critic(x).sum(), x, create_graph=True)
    return weight * ((g.norm(2, dim=1) - 1) ** 2).mean()


def canonical_r1(critic, real, gamma=10.0):
    x = real.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(critic(x).sum(), x, create_graph=True)
    return gamma / 2 * g.pow(2).sum(1).mean()


def assert_same_step(ours, ref, loss_ours, loss_ref):
    torch.testing.assert_close(loss_ours, loss_ref, rtol=1e-9, atol=1e-12)
    loss_ours.backward()
    loss_ref.backward()
    names = [n for n, _ in ref.named_parameters()]
    assert names == [n for n, _ in ours.named_parameters()]
    for (name, p), (_, r) in zip(ours.named_parameters(), ref.named_parameters()):
        # (The last bias cancels out of both losses: its gradient is rightly 0.)
        if name != "5.bias":
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {name}"
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-8, atol=1e-10, msg=name)


@pytest.mark.parametrize("device,backend", [p for p in backend_params(("cpu",))])
def test_wgan_gp_critic_step_through_every_op(device, backend):
    ours, ref = critics()
    g = torch.Generator().manual_seed(1)
    real, fake = torch.randn(9, 6, generator=g, dtype=torch.float64), torch.randn(9, 6, generator=g, dtype=torch.float64)
    alpha = torch.rand(9, generator=g, dtype=torch.float64)
    with ganops.use_backend(backend):
        loss_ours = ours(fake).mean() - ours(real).mean() + ganops.gradient_penalty(ours, real, fake, alpha=alpha)
    loss_ref = ref(fake).mean() - ref(real).mean() + canonical_gp(ref, real, fake, alpha)
    assert_same_step(ours, ref, loss_ours, loss_ref)
    # The power iterations advanced the same way in both.
    for (name, b), (_, rb) in zip(ours.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(b, rb, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("device,backend", [p for p in backend_params(("cpu",))])
def test_r1_critic_step_through_every_op(device, backend):
    ours, ref = critics()
    real = torch.randn(7, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with ganops.use_backend(backend):
        loss_ours = -ours(real).mean() + ganops.r1_penalty(ours, real)
    loss_ref = -ref(real).mean() + canonical_r1(ref, real)
    assert_same_step(ours, ref, loss_ours, loss_ref)


def hook_api_critics(backend, dtype=torch.float64):
    """StudioGAN's style: the hook-API spectral norm (weight_orig, weight_u, weight_v)."""
    return paired_critics(lambda m: ganops.nn.utils.spectral_norm(m, backend=backend), torch.nn.utils.spectral_norm,
                          3, dtype)


@pytest.mark.parametrize("device,backend", [p for p in backend_params(("cpu",))])
def test_stylegan_real_phase_with_hook_api_critic(device, backend):
    """Main loss and R1 from one forward of the reals (input_gradient_penalty), through
    hook-API spectral norm and minibatch discrimination, against torch's hook API and the
    hand-written R1; three steps, so the power iterations must track torch's too."""
    ours, ref = hook_api_critics(backend)
    opts = [torch.optim.SGD(c.parameters(), lr=0.05) for c in (ours, ref)]
    g = torch.Generator().manual_seed(4)
    for _ in range(3):
        real = torch.randn(8, 6, generator=g, dtype=torch.float64)
        for opt in opts:
            opt.zero_grad()
        x = real.detach().requires_grad_(True)
        scores = ours(x)
        with ganops.use_backend(backend):
            loss_ours = (nn.functional.softplus(-scores).mean()
                         + ganops.input_gradient_penalty(scores, x, center=0.0, weight=5.0))
        # The hand-written StyleGAN phase: one forward of the reals too (one power iteration).
        x_ref = real.detach().requires_grad_(True)
        logits = ref(x_ref)
        (r1_grads,) = torch.autograd.grad(logits.sum(), x_ref, create_graph=True)
        loss_ref = (nn.functional.softplus(-logits).flatten() + 5.0 * r1_grads.square().sum(1)).mean()
        assert_same_step(ours, ref, loss_ours, loss_ref)
        for opt in opts:
            opt.step()
        for (name, b), (_, rb) in zip(ours.named_buffers(), ref.named_buffers()):
            torch.testing.assert_close(b, rb, rtol=1e-10, atol=1e-12, msg=name)
