"""Small calls of every ganops op, forward, backward and double backward, for the GPU
scripts: tools/sanitize_ops.py runs each once under compute-sanitizer, tools/graph_check.py
captures each in a CUDA graph and replays it against eager.

A Workload holds its inputs (allocated once, so a captured graph can read them), a
``reset`` that restores the state an op changes in place (power-iteration vectors,
gradients), and ``run``, which returns the tensors to compare.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

import ganops


@dataclasses.dataclass
class Workload:
    name: str
    run: Callable[[], tuple[torch.Tensor, ...]]
    reset: Callable[[], None] = lambda: None


def _restorer(tensors: list[torch.Tensor]) -> Callable[[], None]:
    """Copies the tensors' values now, and returns what puts them back (in place, so a
    graph that reads them sees the restored values)."""
    saved = [t.detach().clone() for t in tensors]

    def reset():
        with torch.no_grad():
            for t, s in zip(tensors, saved):
                t.copy_(s)
    return reset


def small_critic(device: str) -> nn.Module:
    # Two convolutions: the penalty's double backward runs through both.
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(8, 4, 3, stride=2, padding=1),
                         nn.Flatten(), nn.Linear(4 * 4 * 4, 1)).to(device)


def _param_grads(loss, module) -> tuple[torch.Tensor, ...]:
    """The gradient of ``loss`` in each of the module's parameters that it depends on (a
    penalty on the input gradient does not depend on the last layers' biases)."""
    grads = torch.autograd.grad(loss, list(module.parameters()), allow_unused=True)
    return tuple(g for g in grads if g is not None)


def _grad_params(shapes, device, seed):
    g = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = nn.Parameter(torch.randn(shape, generator=g).to(device))
        p.grad = torch.randn(shape, generator=g).to(device)
        params.append(p)
    return params


def workloads(device: str, backend: str) -> list[Workload]:
    """One workload per op (and per kernel variant worth its own launch), on ``device``."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape, grad=False):
        t = torch.randn(*shape, generator=g).to(device)
        return t.requires_grad_(grad)

    out: list[Workload] = []

    # Spectral normalization: power iteration (u, v updated in place), sigma, and the
    # backward into the weight.
    w, u, v, w_out = randn(16, 4, 3, 3, grad=True), randn(16), randn(36), randn(16, 4, 3, 3)

    def spectral():
        w_sn, sigma = ganops.spectral_normalize(w, u, v, n_power_iterations=2, backend=backend)
        (gw,) = torch.autograd.grad((w_sn * w_out).sum(), w)
        return w_sn, sigma, u, v, gw
    out.append(Workload("spectral_normalize fwd+bwd", spectral, _restorer([u, v])))

    torch.manual_seed(1)
    conv = ganops.spectral_norm(nn.Conv2d(4, 8, 3), backend=backend).to(device)
    x_conv = randn(2, 4, 6, 6)

    def spectral_module():
        y = conv(x_conv)
        grads = torch.autograd.grad(y.square().sum(), list(conv.parameters()))
        return (y, *grads)
    out.append(Workload("spectral_norm module fwd+bwd", spectral_module, _restorer(list(conv.buffers()))))

    # Gradient penalty: interpolation, the fused norm penalty, and both through a critic
    # (double backward into the critic's parameters).
    real, fake, alpha, g_interp = randn(4, 3, 8, 8, grad=True), randn(4, 3, 8, 8, grad=True), randn(4, grad=True), randn(4, 3, 8, 8)

    def interp():
        x_hat = ganops.interpolate(real, fake, alpha, backend=backend)
        return (x_hat, *torch.autograd.grad((x_hat * g_interp).sum(), (real, fake, alpha)))
    out.append(Workload("interpolate fwd+bwd", interp))

    grads_in, scale = randn(4, 3, 8, 8, grad=True), torch.tensor(0.5, device=device)
    for one_sided in (False, True):
        def norm_penalty(one_sided=one_sided):
            p = ganops.gradient_norm_penalty(grads_in, weight=10.0, one_sided=one_sided, inv_scale=scale,
                                             backend=backend)
            return (p, *torch.autograd.grad(p, grads_in))
        out.append(Workload(f"gradient_norm_penalty fwd+bwd one_sided={one_sided}", norm_penalty))

    critic = small_critic(device)
    alpha_fixed = torch.rand(4, generator=g).to(device)
    real_d, fake_d = real.detach(), fake.detach()

    def wgan_gp():
        p = ganops.gradient_penalty(critic, real_d, fake_d, alpha=alpha_fixed, backend=backend)
        return (p, *_param_grads(p, critic))
    out.append(Workload("gradient_penalty (double backward)", wgan_gp))

    def r1():
        p = ganops.r1_penalty(critic, real_d, gamma=10.0, backend=backend)
        return (p, *_param_grads(p, critic))
    out.append(Workload("r1_penalty (double backward)", r1))

    # Minibatch discrimination: forward, backward and the backward of the backward.
    M, w_o, w_g = randn(6, 5, 4, grad=True), randn(6, 5), randn(6, 5, 4)
    for exclude_self in (True, False):
        def similarity(exclude_self=exclude_self):
            o = ganops.minibatch_similarity(M, exclude_self=exclude_self, backend=backend)
            (gM,) = torch.autograd.grad((o * w_o).sum(), M, create_graph=True)
            (ggM,) = torch.autograd.grad((gM * w_g).sum(), M)
            return o, gM, ggM
        out.append(Workload(f"minibatch_similarity gradgrad exclude_self={exclude_self}", similarity))

    # Clipping: multi-tensor norms of several orders, the in-place scale.
    params = _grad_params([(33,), (7, 5), (2, 3, 4), (1,)], device, seed=5)
    grads = [p.grad for p in params]
    reset_grads = _restorer(grads)
    for norm_type in (2.0, 1.0, float("inf")):
        def total(norm_type=norm_type):
            return (ganops.get_total_norm(grads, norm_type, backend=backend),)
        out.append(Workload(f"get_total_norm p={norm_type:g}", total))

    def clip():
        return (ganops.clip_grad_norm_(params, 0.5, backend=backend), *grads)
    out.append(Workload("clip_grad_norm_", clip, reset_grads))

    fixed_total = torch.tensor(4.0, device=device)

    def clip_with_norm():
        ganops.clip_grads_with_norm_(params, 0.5, fixed_total, backend=backend)
        return tuple(grads)
    out.append(Workload("clip_grads_with_norm_", clip_with_norm, reset_grads))

    def norms():
        total_norm, per_tensor = ganops.grad_norm(params, per_tensor=True, backend=backend)
        return (total_norm, *per_tensor)
    out.append(Workload("grad_norm per_tensor", norms))

    if hasattr(ganops, "clip_grad_value_"):
        def clip_value():
            ganops.clip_grad_value_(params, 0.3, backend=backend)
            return tuple(grads)
        out.append(Workload("clip_grad_value_", clip_value, reset_grads))
    return out


class Generator(nn.Module):
    def __init__(self, nz: int = 8, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(nz, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                 nn.Linear(width, 2))

    def forward(self, z):
        return self.net(z)


class Critic(nn.Module):
    """Spectral norm on every linear layer and a minibatch-discrimination layer: the WGAN-GP
    step differentiates through all of them twice."""

    def __init__(self, backend: str, width: int = 32):
        super().__init__()
        sn = lambda m: ganops.spectral_norm(m, backend=backend)  # noqa: E731
        self.features = nn.Sequential(sn(nn.Linear(2, width)), nn.LeakyReLU(0.2), sn(nn.Linear(width, width)),
                                      nn.LeakyReLU(0.2))
        self.mbd = ganops.nn.MinibatchDiscrimination(width, 4, 3, backend=backend)
        self.head = sn(nn.Linear(width + 4, 1))

    def forward(self, x):
        return self.head(self.mbd(self.features(x)))


class WganGpTrainer:
    """One critic step (Wasserstein loss + gradient penalty, clipped, Adam) then one
    generator step (clipped, Adam), with capturable optimizers: nothing reads the device
    on the host, so the whole step can be captured in one CUDA graph."""

    def __init__(self, device: str, backend: str, batch: int = 32, nz: int = 8, seed: int = 0):
        torch.manual_seed(seed)
        self.backend = backend
        self.G, self.D = Generator(nz).to(device), Critic(backend).to(device)
        adam = dict(lr=1e-3, betas=(0.5, 0.9), capturable=device.startswith("cuda"))
        self.opt_g = torch.optim.Adam(self.G.parameters(), **adam)
        self.opt_d = torch.optim.Adam(self.D.parameters(), **adam)
        g = torch.Generator().manual_seed(seed + 1)
        # Fixed batches: the captured step reads them, the eager twin gets the same.
        self.real = torch.randn(batch, 2, generator=g).to(device)
        self.z = torch.randn(batch, nz, generator=g).to(device)
        self.alpha = torch.rand(batch, generator=g).to(device)

    def step(self) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.backend
        self.opt_d.zero_grad(set_to_none=False)
        fake = self.G(self.z).detach()
        d_loss = (self.D(fake).mean() - self.D(self.real).mean()
                  + ganops.gradient_penalty(self.D, self.real, fake, alpha=self.alpha, backend=b))
        d_loss.backward()
        ganops.clip_grad_norm_(self.D.parameters(), 1.0, backend=b)
        self.opt_d.step()

        self.opt_g.zero_grad(set_to_none=False)
        g_loss = -self.D(self.G(self.z)).mean()
        g_loss.backward()
        ganops.clip_grad_norm_(self.G.parameters(), 1.0, backend=b)
        self.opt_g.step()
        return d_loss.detach(), g_loss.detach()

    def state(self) -> list[torch.Tensor]:
        """Everything a step changes: parameters and buffers (u, v) of both networks."""
        return [t.detach() for m in (self.G, self.D) for t in (*m.parameters(), *m.buffers())]


def no_gpu_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU visible"
    return None
