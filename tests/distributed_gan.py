"""A small GAN trained the same way in one process and across ranks (tests/test_distributed.py).

Kept apart from the test module so spawned ranks import only this and ganops.

The critic's layers carry ganops.spectral_norm and its loss ganops.gradient_penalty and
ganops.r1_penalty, in the pattern that data parallelism needs: the penalties are added to
the critic loss and the sum gets one backward, so DDP reduces each gradient once, penalty
parts included (a separate backward for a penalty is not reduced: DDP's reducer serves one
backward per iteration, and the ranks silently drift apart). Lazy R1 (StyleGAN) is the other
pattern: every other step a forward and backward of R1 alone, its own DDP iteration, which
needs every parameter of the forward to receive a gradient (find_unused_parameters=False).
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist

import ganops

STEPS = 4
BATCH = 16
MAX_NORM = 0.5
GP_WEIGHT = 1.0
R1_GAMMA = 0.5

# How each mode wraps the two networks, and which penalty the critic takes: "gp+r1" (both,
# added to the critic loss), "none", or "lazy-r1" (R1 alone, its own step, every other step).
# FSDP2 cannot run a gradient penalty's double backward (ganops.gradient_penalty refuses a
# fully_shard critic), so "fsdp2" trains without the penalty, the spectral-norm critic
# sharded, and "fsdp2-ddp" shards the generator and keeps the penalised critic on DDP: the
# supported way.
MODES = {"ddp": ("ddp", "ddp", "gp+r1"), "fsdp2": ("fsdp2", "fsdp2", "none"),
         "fsdp2-ddp": ("fsdp2", "ddp", "gp+r1"), "ddp-lazy-r1": ("ddp", "ddp", "lazy-r1")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_models(seed: int = 0):
    torch.manual_seed(seed)
    generator = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
    sn = ganops.spectral_norm
    critic = torch.nn.Sequential(sn(torch.nn.Linear(2, 32)), torch.nn.LeakyReLU(0.2), sn(torch.nn.Linear(32, 16)),
                                 torch.nn.LeakyReLU(0.2), sn(torch.nn.Linear(16, 1)))
    return generator, critic


def make_batches(seed: int = 1):
    """(real, z, alpha) per step: alpha drawn for the whole batch so every rank slices the same."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(BATCH, 2, generator=g) * 2 + 1, torch.randn(BATCH, 4, generator=g),
             torch.rand(BATCH, generator=g)) for _ in range(STEPS)]


def _norm_value(total: torch.Tensor) -> torch.Tensor:
    return total.full_tensor() if hasattr(total, "full_tensor") else total


def train(generator, critic, batches, rank: int = 0, world: int = 1, penalty: str = "gp+r1"):
    """WGAN(-GP) steps (critic, then generator) with ganops.clip_grad_norm_ on both networks;
    ``penalty`` as in MODES.

    Each rank takes its slice of every batch; the losses (penalty included) are means, so
    averaging the ranks' gradients gives the whole batch's. Returns the clip norms of every step.
    """
    opt_d = torch.optim.SGD(critic.parameters(), lr=0.05)
    opt_g = torch.optim.SGD(generator.parameters(), lr=0.05)
    norms = []
    for step, (real, z, alpha) in enumerate(batches):
        part = slice(rank * len(real) // world, (rank + 1) * len(real) // world)
        real, z, alpha = real[part], z[part], alpha[part]
        opt_d.zero_grad()
        fake = generator(z).detach()
        # One critic forward for reals and fakes, the penalties' forwards beside it, one backward.
        scores = critic(torch.cat([real, fake]))
        loss_d = scores[len(real):].mean() - scores[:len(real)].mean()
        if penalty == "gp+r1":
            loss_d = (loss_d + ganops.gradient_penalty(critic, real, fake, alpha=alpha, weight=GP_WEIGHT)
                      + ganops.r1_penalty(critic, real, gamma=R1_GAMMA))
        loss_d.backward()
        norms.append(_norm_value(ganops.clip_grad_norm_(critic.parameters(), MAX_NORM)))
        opt_d.step()
        if penalty == "lazy-r1" and step % 2 == 0:
            # R1's own forward and backward: the critic's last bias does not reach the input
            # gradient, and still gets its (zero) gradient, or DDP's next iteration fails.
            opt_d.zero_grad()
            ganops.r1_penalty(critic, real, gamma=R1_GAMMA * 2).backward()
            norms.append(_norm_value(ganops.clip_grad_norm_(critic.parameters(), MAX_NORM)))
            opt_d.step()
        opt_g.zero_grad()
        loss_g = -critic(generator(z)).mean()
        loss_g.backward()
        norms.append(_norm_value(ganops.clip_grad_norm_(generator.parameters(), MAX_NORM)))
        opt_g.step()
    return torch.stack(norms)


def full_state(generator, critic) -> dict[str, torch.Tensor]:
    """Parameters (gathered when sharded) and buffers (spectral norm's u, v) of both networks."""
    state = {}
    for prefix, model in (("generator", generator), ("critic", critic)):
        for name, t in (*model.named_parameters(), *model.named_buffers()):
            value = t.full_tensor() if hasattr(t, "full_tensor") else t
            state[f"{prefix}.{name.removeprefix('module.')}"] = value.detach().clone()
    return state


def _wrap(model, how: str, mesh):
    if how == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(model)
    from torch.distributed.fsdp import fully_shard
    # Spectral norm is already registered: FSDP2 shards its `original` weight and gathers it
    # before each forward, and u, v stay plain buffers, the same on every rank.
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def rank_main(rank: int, world: int, port: int, mode: str, out_path: str):
    """Trains in ``mode`` (a key of MODES); every rank saves its state to ``out_path.<rank>``."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh("cpu", (world,))
        wrap_g, wrap_d, penalty = MODES[mode]
        generator, critic = make_models()
        generator, critic = _wrap(generator, wrap_g, mesh), _wrap(critic, wrap_d, mesh)
        norms = train(generator, critic, make_batches(), rank, world, penalty)
        torch.save({"state": full_state(generator, critic), "norms": norms}, f"{out_path}.{rank}")
        # No rank tears its process group down while the other still talks to it.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _error(fn) -> str:
    try:
        fn()
    except (TypeError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def errors_main(rank: int, world: int, port: int, out_path: str):
    """The unsupported combinations, on one rank: the messages each raises."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.nn.parallel import DistributedDataParallel as DDP
        mesh = init_device_mesh("cpu", (world,))
        real, fake = torch.randn(4, 2), torch.randn(4, 2)
        sharded = fully_shard(torch.nn.Linear(2, 1), mesh=mesh)
        static = DDP(torch.nn.Linear(2, 1), static_graph=True)
        out = {
            "spectral_norm after fully_shard": _error(lambda: ganops.spectral_norm(sharded)),
            "gradient_penalty on fully_shard": _error(lambda: ganops.gradient_penalty(sharded, real, fake)),
            "r1_penalty on fully_shard": _error(lambda: ganops.r1_penalty(sharded, real)),
            "gradient_penalty on static_graph": _error(lambda: ganops.gradient_penalty(static, real, fake)),
        }
        torch.save(out, out_path)
    finally:
        dist.destroy_process_group()
