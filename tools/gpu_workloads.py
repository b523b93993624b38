"""The calls the GPU scripts make: tools/sanitize_ops.py runs each once under
compute-sanitizer, tools/graph_check.py captures each in a CUDA graph and replays it against
eager.

Derived from the op registry (ganops._library.REGISTRY), so a new op is covered when its hub
declares it, with no edit here: one workload per registered op and argument tuple of its
``examples`` (and of its ``gpu_examples``, where the hub declares sizes that reach kernel
variants the small examples do not), forward and, where the op has a backward and an
argument requires grad, the backward into those arguments. Arguments the schema marks as
mutated (``Tensor(a!)``) are restored before every call. Backward ops are registered ops of
their own with their own examples, so double backward kernels are covered the same way.
Beside them, a few calls of the public API that compose ops (the spectral-norm module, the
penalties through a critic's double backward), and the whole WGAN-GP training step.

A Workload holds its inputs (allocated once, so a captured graph can read them), a
``reset`` that restores the state an op changes in place, and ``run``, which returns the
tensors to compare.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

import ganops
from ganops import _library

# Every dtype's kernels are instantiated apart: the sanitizer sees each once.
ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclasses.dataclass
class Workload:
    name: str
    run: Callable[[], tuple[torch.Tensor, ...]]
    reset: Callable[[], None] = lambda: None
    op: str | None = None  # the registered op it calls, if it is one op's workload


def _restorer(tensors: list[torch.Tensor]) -> Callable[[], None]:
    """Copies the tensors' values now, and returns what puts them back (in place, so a
    graph that reads them sees the restored values)."""
    saved = [t.detach().clone() for t in tensors]

    def reset():
        with torch.no_grad():
            for t, s in zip(tensors, saved):
                t.copy_(s)
    return reset


def _tensors(value) -> list[torch.Tensor]:
    """The tensors of an argument or a result: a tensor, a list or tuple of them, or none."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def op_workload(op: _library.Op, backend: str, device: str, name: str, args: tuple) -> Workload:
    """``op(*args)`` on ``backend``, then its backward (fixed random weights on the outputs)
    into every argument that requires grad."""
    mutated = [t for arg in op.mutated_args for t in _tensors(args[op.arg_names.index(arg)])]
    reset = _restorer(mutated)
    inputs = [t for t in _tensors(args) if t.requires_grad]

    def forward() -> list[torch.Tensor]:
        return _tensors(_library.call(op, backend, device, *args))

    # The outputs' shapes for the weights of the backward: one eager call, undone.
    outs = forward()
    reset()
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(device, o.dtype) if o.requires_grad
               else None for o in outs]
    differentiable = op.backward is not None and inputs and any(w is not None for w in weights)

    def run() -> tuple[torch.Tensor, ...]:
        outs = forward()
        if not differentiable:
            return (*outs, *mutated)
        loss = sum((o * w).sum() for o, w in zip(outs, weights) if w is not None)
        grads = torch.autograd.grad(loss, inputs, allow_unused=True)
        return (*outs, *mutated, *(g for g in grads if g is not None))
    return Workload(name, run, reset, op.name)


def op_workloads(device: str, backend: str, dtypes=(torch.float32,)) -> list[Workload]:
    """Every registered op's workloads: all its argument tuples in the first dtype, the
    first one in each other dtype."""
    out = []
    for op in _library.REGISTRY.values():
        for k, dtype in enumerate(dtypes):
            torch.manual_seed(0)
            cases = list(op.examples(device, dtype) if op.examples else [])
            cases += list(op.gpu_examples(device, dtype) if op.gpu_examples else [])
            for i, args in enumerate(cases if k == 0 else cases[:1]):
                out.append(op_workload(op, backend, device, f"{op.name}[{i}] {str(dtype).split('.')[1]}", args))
    return out


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


def api_workloads(device: str, backend: str) -> list[Workload]:
    """The public calls that compose registered ops: the spectral-norm module's forward and
    backward, and the penalties differentiated twice through a critic."""
    g = torch.Generator().manual_seed(0)
    out: list[Workload] = []

    torch.manual_seed(1)
    conv = ganops.spectral_norm(nn.Conv2d(4, 8, 3), backend=backend).to(device)
    x_conv = torch.randn(2, 4, 6, 6, generator=g).to(device)

    def spectral_module():
        y = conv(x_conv)
        grads = torch.autograd.grad(y.square().sum(), list(conv.parameters()))
        return (y, *grads)
    out.append(Workload("spectral_norm module fwd+bwd", spectral_module, _restorer(list(conv.buffers()))))

    critic = small_critic(device)
    real, fake = torch.randn(4, 3, 8, 8, generator=g).to(device), torch.randn(4, 3, 8, 8, generator=g).to(device)
    alpha = torch.rand(4, generator=g).to(device)

    def wgan_gp():
        p = ganops.gradient_penalty(critic, real, fake, alpha=alpha, backend=backend)
        return (p, *_param_grads(p, critic))
    out.append(Workload("gradient_penalty (double backward)", wgan_gp))

    def r1():
        p = ganops.r1_penalty(critic, real, gamma=10.0, backend=backend)
        return (p, *_param_grads(p, critic))
    out.append(Workload("r1_penalty (double backward)", r1))
    return out


def workloads(device: str, backend: str, dtypes=(torch.float32,)) -> list[Workload]:
    """Every registered op's workloads, then the public API's."""
    return op_workloads(device, backend, dtypes) + api_workloads(device, backend)


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
