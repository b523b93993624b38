"""Train a WGAN-GP with every ganops op, where a practitioner would put each one.

    python examples/train_gan.py --data ring8 --steps 4000 --out runs/ring8
    python examples/train_gan.py --data digits --steps 3000 --out runs/digits
    python examples/train_gan.py --data ring8 --steps 300 --compare    # torch backend vs auto
    python examples/train_gan.py --data digits --mbstd                 # + minibatch stddev
    python examples/train_gan.py --data digits --attention             # + self-attention

The critic's layers are spectral-normalised (ganops.spectral_norm) and it ends in a
minibatch-discrimination layer (ganops.nn.MinibatchDiscrimination) so it sees how diverse a
batch is; with --mbstd the conv critic also has StyleGAN's minibatch standard deviation
(ganops.nn.MinibatchStdDev) before its last convolution, and with --attention a
self-attention block over its 4x4 feature map (ganops.nn.MultiheadAttention), which the
penalties differentiate through twice. Its loss is the Wasserstein estimate plus the
gradient penalty on interpolated samples (ganops.gradient_penalty) or, with --penalty r1,
R1 on the reals. Both networks' gradients are clipped by their global
norm (ganops.clip_grad_norm_), and every layer's gradient norm is recorded every step
(ganops.grad_norm(..., per_tensor=True)) without a host synchronisation per parameter.
Learning rates follow the two time-scale rule (the critic's larger than the generator's).

Data sets that need no download: ``ring8``, the eight Gaussians on a circle from the WGAN-GP
paper's toy experiments (2-D points, an MLP pair), and ``digits``, the 1797 8x8 handwritten
digits scikit-learn ships (a small convolutional pair).

Written to DIR (--out): samples.png (a scatter over the real modes, or a grid of digits),
losses.png, grad_norms.png (one curve per layer) and metrics.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn

import ganops
from ganops.nn import MinibatchDiscrimination

RING_MODES = 8
RING_RADIUS = 2.0
RING_STD = 0.05


# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------

def ring8_centers() -> torch.Tensor:
    angles = torch.arange(RING_MODES, dtype=torch.float64) * (2 * math.pi / RING_MODES)
    return (RING_RADIUS * torch.stack([angles.cos(), angles.sin()], 1)).float()


class Ring8:
    """Eight Gaussians of standard deviation RING_STD on a circle of radius RING_RADIUS."""

    def __init__(self, generator: torch.Generator):
        self.centers = ring8_centers()
        self.generator = generator

    def sample(self, n: int) -> torch.Tensor:
        idx = torch.randint(RING_MODES, (n,), generator=self.generator)
        return self.centers[idx] + RING_STD * torch.randn(n, 2, generator=self.generator)


class Digits:
    """scikit-learn's 8x8 digits, scaled to [-1, 1], shape (N, 1, 8, 8)."""

    def __init__(self, generator: torch.Generator):
        from sklearn.datasets import load_digits
        images = torch.from_numpy(load_digits().images).float()
        self.images = (images / 8.0 - 1.0).unsqueeze(1)
        self.generator = generator

    def sample(self, n: int) -> torch.Tensor:
        return self.images[torch.randint(len(self.images), (n,), generator=self.generator)]


# ---------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------

def minibatch_discrimination(in_features: int) -> MinibatchDiscrimination:
    """16 kernels of dimension 8. T starts at N(0, 0.05^2), the scale the original code gave
    it, not the N(0, 1) of the layer's default: with N(0, 1) every L1 distance is large, the
    similarities start near 0 and the critic's input gradients are in the thousands."""
    layer = MinibatchDiscrimination(in_features, 16, 8)
    nn.init.normal_(layer.T, 0.0, 0.05)
    return layer


def mlp_pair(z_dim: int):
    generator = nn.Sequential(
        nn.Linear(z_dim, 256), nn.ReLU(),
        nn.Linear(256, 256), nn.ReLU(),
        nn.Linear(256, 2))
    critic = nn.Sequential(
        ganops.spectral_norm(nn.Linear(2, 256)), nn.LeakyReLU(0.2),
        ganops.spectral_norm(nn.Linear(256, 128)), nn.LeakyReLU(0.2),
        minibatch_discrimination(128),
        ganops.spectral_norm(nn.Linear(128 + 16, 1, bias=False)))
    return generator, critic


class SelfAttention2d(nn.Module):
    """Self-attention over the positions of a feature map, with a residual (SAGAN's block,
    without its learned gate): (N, C, H, W) -> (N, C, H, W), each position a token of C
    features. need_weights=False: the attention runs fused in ganops, R1's double backward
    included."""

    def __init__(self, channels: int, num_heads: int = 4):
        super().__init__()
        self.attention = ganops.nn.MultiheadAttention(channels, num_heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.flatten(2).transpose(1, 2)
        attended, _ = self.attention(tokens, tokens, tokens, need_weights=False)
        return x + attended.transpose(1, 2).reshape(x.shape)


def conv_pair(z_dim: int, mbstd: bool = False, attention: bool = False):
    """With ``mbstd``, StyleGAN's minibatch standard deviation (groups of 4, one channel)
    before the last convolution, which then takes 32 + 1 channels; with ``attention``, a
    self-attention block over the 4x4 feature map of the first convolution (16 tokens of 32
    features, 4 heads)."""
    generator = nn.Sequential(
        nn.Linear(z_dim, 64 * 2 * 2), nn.ReLU(), nn.Unflatten(1, (64, 2, 2)),
        nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.ReLU(),      # 4x4
        nn.ConvTranspose2d(32, 1, 4, 2, 1), nn.Tanh())       # 8x8
    critic = nn.Sequential(
        ganops.spectral_norm(nn.Conv2d(1, 32, 3, 2, 1)), nn.LeakyReLU(0.2),    # 4x4
        *([SelfAttention2d(32)] if attention else []),
        *([ganops.nn.MinibatchStdDev()] if mbstd else []),
        ganops.spectral_norm(nn.Conv2d(32 + int(mbstd), 64, 3, 2, 1)), nn.LeakyReLU(0.2),   # 2x2
        nn.Flatten(),
        minibatch_discrimination(256),
        ganops.spectral_norm(nn.Linear(256 + 16, 1, bias=False)))
    return generator, critic


CONFIGS = {
    # z_dim, batch, critic steps per generator step, learning rates (critic, generator)
    "ring8": dict(pair=mlp_pair, data=Ring8, z_dim=8, batch=128, n_critic=2, lr_d=4e-4, lr_g=1e-4),
    "digits": dict(pair=conv_pair, data=Digits, z_dim=32, batch=64, n_critic=2, lr_d=4e-4, lr_g=1e-4),
}


def layer_names(model: nn.Module) -> list[str]:
    return [name.replace("parametrizations.", "").replace(".original", "") for name, _ in model.named_parameters()]


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------

class Progress:
    """A one-line progress bar with the current losses (reads them only when it redraws)."""

    def __init__(self, total: int, label: str, every: int = 25):
        self.total, self.label, self.every, self.start = total, label, every, time.perf_counter()

    def update(self, step: int, loss_d: torch.Tensor, loss_g: torch.Tensor) -> None:
        if (step + 1) % self.every and step + 1 != self.total:
            return
        done = (step + 1) / self.total
        bar = "#" * int(30 * done) + "." * (30 - int(30 * done))
        rate = (step + 1) / (time.perf_counter() - self.start)
        print(f"\r{self.label} [{bar}] {step + 1}/{self.total}  D {loss_d.item():+.4f}  "
              f"G {loss_g.item():+.4f}  {rate:.0f} it/s", end="", file=sys.stderr, flush=True)
        if step + 1 == self.total:
            print(file=sys.stderr)


def train(data: str, steps: int, seed: int, backend: str, penalty: str = "gp", max_norm: float = 10.0,
          quiet: bool = False, mbstd: bool = False, attention: bool = False) -> dict:
    """Trains one GAN; returns its losses, gradient norms, samples and wall time. ``mbstd``,
    ``attention``: the conv critic with minibatch standard deviation, with self-attention
    (digits only)."""
    cfg = CONFIGS[data]
    torch.manual_seed(seed)
    data_rng = torch.Generator().manual_seed(seed + 1)
    penalty_rng = torch.Generator().manual_seed(seed + 2)
    dataset = cfg["data"](data_rng)
    with ganops.use_backend(backend):
        options = {name: True for name, on in (("mbstd", mbstd), ("attention", attention)) if on}
        generator, critic = cfg["pair"](cfg["z_dim"], **options)
        opt_d = torch.optim.Adam(critic.parameters(), lr=cfg["lr_d"], betas=(0.0, 0.9))
        opt_g = torch.optim.Adam(generator.parameters(), lr=cfg["lr_g"], betas=(0.0, 0.9))
        losses_d, losses_g, norms_d, norms_g = [], [], [], []
        progress = None if quiet else Progress(steps, f"{data} [{backend}]")
        start = time.perf_counter()
        for step in range(steps):
            for _ in range(cfg["n_critic"]):
                real = dataset.sample(cfg["batch"])
                with torch.no_grad():
                    fake = generator(torch.randn(cfg["batch"], cfg["z_dim"]))
                wasserstein = critic(fake).mean() - critic(real).mean()
                if penalty == "gp":
                    reg = ganops.gradient_penalty(critic, real, fake, weight=10.0, generator=penalty_rng)
                else:
                    reg = ganops.r1_penalty(critic, real, gamma=10.0)
                loss_d = wasserstein + reg
                opt_d.zero_grad(set_to_none=True)
                loss_d.backward()
                norms_d.append(ganops.grad_norm(critic.parameters(), per_tensor=True)[1])
                ganops.clip_grad_norm_(critic.parameters(), max_norm)
                opt_d.step()
            loss_g = -critic(generator(torch.randn(cfg["batch"], cfg["z_dim"]))).mean()
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            norms_g.append(ganops.grad_norm(generator.parameters(), per_tensor=True)[1])
            ganops.clip_grad_norm_(generator.parameters(), max_norm)
            opt_g.step()
            # Kept as tensors: read once at the end, not every step.
            losses_d.append(loss_d.detach())
            losses_g.append(loss_g.detach())
            if progress:
                progress.update(step, loss_d, loss_g)
        wall = time.perf_counter() - start
        generator.eval()
        with torch.no_grad():
            samples = generator(torch.randn(2000 if data == "ring8" else 64, cfg["z_dim"],
                                            generator=torch.Generator().manual_seed(seed + 3)))
    return {
        "data": data, "backend": backend, "steps": steps, "seed": seed, "wall_s": wall,
        "loss_d": torch.stack(losses_d), "loss_g": torch.stack(losses_g),
        "grad_norms_d": torch.stack(norms_d), "grad_norms_g": torch.stack(norms_g),
        "layers_d": layer_names(critic), "layers_g": layer_names(generator),
        "samples": samples, "dataset": dataset,
    }


# ---------------------------------------------------------------------------------------
# Metrics and pictures
# ---------------------------------------------------------------------------------------

def ring8_metrics(samples: torch.Tensor) -> dict:
    """Modes covered and the fraction of high-quality samples.

    A sample is high quality when it lies within 3 standard deviations of a mode's centre;
    a mode is covered when at least 1% of the samples are high-quality samples of it.
    """
    dist = torch.cdist(samples.double(), ring8_centers().double())
    nearest_dist, nearest = dist.min(1)
    good = nearest_dist <= 3 * RING_STD
    per_mode = torch.bincount(nearest[good], minlength=RING_MODES)
    return {"modes_covered": int((per_mode >= 0.01 * len(samples)).sum()),
            "high_quality_fraction": float(good.double().mean()),
            "samples_per_mode": per_mode.tolist()}


def digits_metrics(samples: torch.Tensor, images: torch.Tensor) -> dict:
    """Diversity: the mean pairwise L2 distance between generated digits over that between
    as many real digits. Near 1, the samples spread as the data do; far below 1, the
    generator has collapsed onto a few images. Also the mean distance from each sample to its
    nearest real digit over the real digits' mean nearest-neighbour distance (near 1: the
    samples sit as close to the data as the data sit to each other; far above 1: noise)."""
    g = torch.Generator().manual_seed(0)
    real = images[torch.randperm(len(images), generator=g)[: len(samples)]].flatten(1).double()
    fake = samples.flatten(1).double()

    def mean_pairwise(x):
        d = torch.cdist(x, x)
        return d.sum() / (len(x) * (len(x) - 1))

    others = images.flatten(1).double()
    to_real = torch.cdist(fake, others).min(1).values.mean()
    real_nn = torch.cdist(real, others).topk(2, largest=False).values[:, 1].mean()  # skip itself
    return {"diversity_ratio": float(mean_pairwise(fake) / mean_pairwise(real)),
            "nearest_real_ratio": float(to_real / real_nn)}


def metrics_of(run: dict) -> dict:
    if run["data"] == "ring8":
        m = ring8_metrics(run["samples"])
    else:
        m = digits_metrics(run["samples"], run["dataset"].images)
    return {**m, "backend": run["backend"], "steps": run["steps"], "seed": run["seed"],
            "wall_s": round(run["wall_s"], 2),
            "final_loss_d": float(run["loss_d"][-20:].mean()), "final_loss_g": float(run["loss_g"][-20:].mean())}


def save_outputs(run: dict, metrics: dict, out: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)

    fig, ax = plt.subplots(figsize=(5, 5))
    if run["data"] == "ring8":
        real = run["dataset"].sample(2000)
        ax.scatter(real[:, 0], real[:, 1], s=2, c="tab:orange", alpha=0.4, label="real")
        s = run["samples"]
        ax.scatter(s[:, 0], s[:, 1], s=2, c="tab:blue", alpha=0.4, label="generated")
        ax.set_aspect("equal")
        ax.legend(loc="upper right", markerscale=4)
        ax.set_title(f"ring8: {metrics['modes_covered']}/8 modes, "
                     f"{100 * metrics['high_quality_fraction']:.0f}% within 3 std")
    else:
        # 8x8 digits with a 1-pixel grey border each, laid out 8 by 8.
        cells = torch.nn.functional.pad(run["samples"][:64, 0], (1, 1, 1, 1), value=0.0)
        grid = cells.reshape(8, 8, 10, 10).permute(0, 2, 1, 3).reshape(80, 80)
        ax.imshow(grid.numpy(), cmap="gray", vmin=-1, vmax=1)
        ax.axis("off")
        ax.set_title(f"digits: diversity ratio {metrics['diversity_ratio']:.2f}")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "samples.png"), dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(run["loss_d"].numpy(), label="critic (W + penalty)", linewidth=0.8)
    ax.plot(run["loss_g"].numpy(), label="generator", linewidth=0.8)
    ax.set_xlabel("generator step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "losses.png"), dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, key, names, title in ((axes[0], "grad_norms_d", run["layers_d"], "critic (per critic step)"),
                                  (axes[1], "grad_norms_g", run["layers_g"], "generator")):
        norms = run[key].clamp_min(1e-12).numpy()
        for k, name in enumerate(names):
            ax.plot(norms[:, k], linewidth=0.7, label=name)
        ax.set_yscale("log")
        ax.set_title(f"gradient norm per layer: {title}")
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "grad_norms.png"), dpi=110)
    plt.close(fig)


AGREEMENT_TOLERANCES = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def loss_agreement(a: dict, b: dict) -> dict:
    """For each relative tolerance, how many steps from the start both runs' critic and
    generator losses agree (relative to max(|loss|, 1)).

    Step 0 agrees to float32 rounding. Then Adam divides each gradient entry by its own
    running magnitude, so entries whose true value is near 0 (sums of large terms that
    cancel) turn rounding differences into whole learning-rate steps of either sign, and the
    runs drift apart: expected of any two float32 implementations, not a bug.
    """
    def rel(x, y):
        return (x - y).abs() / x.abs().clamp_min(1.0)

    worst = torch.maximum(rel(a["loss_d"], b["loss_d"]), rel(a["loss_g"], b["loss_g"]))
    steps = {}
    for tol in AGREEMENT_TOLERANCES:
        bad = (worst > tol).nonzero()
        steps[tol] = int(bad[0]) if len(bad) else len(worst)
    return {"steps_agreeing": steps, "step0_relative_difference": float(worst[0])}


def compare(args) -> dict:
    """The same seed with the pure-PyTorch backend and with auto: metrics, times, agreement."""
    runs = [train(args.data, args.steps, args.seed, backend, args.penalty, quiet=args.quiet, mbstd=args.mbstd,
                  attention=args.attention)
            for backend in ("torch", "auto")]
    metrics = [metrics_of(r) for r in runs]
    agreement = loss_agreement(runs[0], runs[1])
    keys = [k for k in metrics[0] if k not in ("backend", "steps", "seed")]
    print(f"{'':<24}{'torch backend':>18}{'auto (' + ganops.available_backends('cpu')[0] + ')':>18}")
    for k in keys:
        a, b = metrics[0][k], metrics[1][k]
        fmt = (lambda v: f"{v:>18.4f}") if isinstance(a, float) else (lambda v: f"{str(v):>18}")
        print(f"{k:<24}{fmt(a)}{fmt(b)}")
    print(f"speedup of auto over the torch backend: {runs[0]['wall_s'] / runs[1]['wall_s']:.2f}x")
    print("steps from the start on which both losses agree, by relative tolerance: " +
          ", ".join(f"{tol:g}: {n}" for tol, n in agreement["steps_agreeing"].items()) + f" (of {args.steps})")
    result = {"torch": metrics[0], "auto": metrics[1], "agreement": agreement}
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "compare.json"), "w") as f:
            json.dump(result, f, indent=2)
    return result


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=sorted(CONFIGS), default="ring8")
    parser.add_argument("--backend", choices=list(ganops.BACKENDS), default="auto")
    parser.add_argument("--penalty", choices=["gp", "r1"], default="gp",
                        help="WGAN-GP gradient penalty on interpolates, or R1 on reals")
    parser.add_argument("--steps", type=int, default=4000, help="generator steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="directory for pictures and metrics.json")
    parser.add_argument("--compare", action="store_true",
                        help="run the same seed with the torch backend and with auto, side by side")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--mbstd", action="store_true",
                        help="digits: minibatch standard deviation before the conv critic's last convolution")
    parser.add_argument("--attention", action="store_true",
                        help="digits: a self-attention block over the conv critic's 4x4 feature map")
    args = parser.parse_args(argv)
    for flag in ("mbstd", "attention"):
        if getattr(args, flag) and args.data != "digits":
            parser.error(f"--{flag} applies to the conv critic: use it with --data digits")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.compare:
        return compare(args)
    run = train(args.data, args.steps, args.seed, args.backend, args.penalty, quiet=args.quiet, mbstd=args.mbstd,
                attention=args.attention)
    metrics = metrics_of(run)
    print(json.dumps(metrics, indent=2))
    if args.out:
        save_outputs(run, metrics, args.out)
        print(f"wrote {args.out}/samples.png, losses.png, grad_norms.png, metrics.json")
    return metrics


if __name__ == "__main__":
    main()
