"""A small GAN trained the same way in one process and across ranks (tests/test_distributed.py).

Kept apart from the test module so spawned ranks import only this and ganops.
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_models(seed: int = 0):
    torch.manual_seed(seed)
    generator = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
    critic = torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.LeakyReLU(0.2), torch.nn.Linear(32, 16),
                                 torch.nn.LeakyReLU(0.2), torch.nn.Linear(16, 1))
    return generator, critic


def make_batches(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(BATCH, 2, generator=g) * 2 + 1, torch.randn(BATCH, 4, generator=g)) for _ in range(STEPS)]


def _norm_value(total: torch.Tensor) -> torch.Tensor:
    return total.full_tensor() if hasattr(total, "full_tensor") else total


def train(generator, critic, batches, rank: int = 0, world: int = 1):
    """WGAN steps (critic, then generator) with ganops.clip_grad_norm_ on both networks.

    Each rank takes its slice of every batch; the losses are means, so averaging the
    ranks' gradients gives the whole batch's. Returns the clip norms of every step.
    """
    opt_d = torch.optim.SGD(critic.parameters(), lr=0.05)
    opt_g = torch.optim.SGD(generator.parameters(), lr=0.05)
    norms = []
    for real, z in batches:
        part = slice(rank * len(real) // world, (rank + 1) * len(real) // world)
        real, z = real[part], z[part]
        opt_d.zero_grad()
        fake = generator(z).detach()
        # One critic forward for reals and fakes: DDP expects one forward per backward.
        scores = critic(torch.cat([real, fake]))
        loss_d = scores[len(real):].mean() - scores[:len(real)].mean()
        loss_d.backward()
        norms.append(_norm_value(ganops.clip_grad_norm_(critic.parameters(), MAX_NORM)))
        opt_d.step()
        opt_g.zero_grad()
        loss_g = -critic(generator(z)).mean()
        loss_g.backward()
        norms.append(_norm_value(ganops.clip_grad_norm_(generator.parameters(), MAX_NORM)))
        opt_g.step()
    return torch.stack(norms)


def full_state(generator, critic) -> dict[str, torch.Tensor]:
    state = {}
    for prefix, model in (("generator", generator), ("critic", critic)):
        for name, p in model.named_parameters():
            value = p.full_tensor() if hasattr(p, "full_tensor") else p
            state[f"{prefix}.{name.removeprefix('module.')}"] = value.detach().clone()
    return state


def rank_main(rank: int, world: int, port: int, mode: str, out_path: str):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        generator, critic = make_models()
        if mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP
            generator, critic = DDP(generator), DDP(critic)
        elif mode == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
            mesh = init_device_mesh("cpu", (world,))
            for model in (generator, critic):
                for layer in model:
                    if isinstance(layer, torch.nn.Linear):
                        fully_shard(layer, mesh=mesh)
                fully_shard(model, mesh=mesh)
        else:
            raise ValueError(mode)
        norms = train(generator, critic, make_batches(), rank, world)
        state = full_state(generator, critic)
        if rank == 0:
            torch.save({"state": state, "norms": norms}, out_path)
    finally:
        dist.destroy_process_group()
