"""examples/train_gan.py: a bounded training run reaches the modes, --compare agrees, digits run,
--attention trains through self-attention."""

import importlib.util
import json
import os

import pytest
import torch

import ganops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "train_gan.py")

pytestmark = pytest.mark.skipif(not os.path.exists(EXAMPLE), reason="examples/ is not beside the tests "
                                "(an installed-wheel run copies only tests/)")


@pytest.fixture(scope="module")
def train_gan():
    spec = importlib.util.spec_from_file_location("train_gan", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ring8_covers_the_modes(train_gan, tmp_path):
    # 4000 generator steps, seed 0: 8 of 8 modes and 23% high-quality samples when measured
    # (about 110 s alone on the 2-core machine, 2026-12-03; the same as at this test's first
    # version, 1200 steps 45 s for both). The modes sharpen between 2500 and 3500 steps, so 2500 is a coin toss:
    # after a change in summation order one 2500-step run had 8 modes and the next 3.
    metrics = train_gan.main(["--data", "ring8", "--steps", "4000", "--seed", "0", "--out", str(tmp_path),
                              "--quiet"])
    assert metrics["modes_covered"] >= 6, metrics
    assert metrics["high_quality_fraction"] > 0.1, metrics
    for name in ("samples.png", "losses.png", "grad_norms.png", "metrics.json"):
        assert (tmp_path / name).stat().st_size > 0
    assert json.loads((tmp_path / "metrics.json").read_text())["modes_covered"] == metrics["modes_covered"]


def test_compare_agrees_on_the_first_step(train_gan, tmp_path):
    result = train_gan.main(["--data", "ring8", "--steps", "12", "--compare", "--quiet", "--out", str(tmp_path)])
    agreement = result["agreement"]
    # Measured 1.3e-5: float32 losses whose terms partly cancel (Wasserstein estimate plus
    # penalty), summed in different orders by the two backends.
    assert agreement["step0_relative_difference"] <= 1e-4, agreement
    assert agreement["steps_agreeing"][1e-4] >= 1, agreement
    assert result["torch"]["backend"] == "torch" and result["auto"]["backend"] == "auto"
    assert (tmp_path / "compare.json").exists()


def test_digits_runs(train_gan, tmp_path):
    metrics = train_gan.main(["--data", "digits", "--steps", "5", "--out", str(tmp_path), "--quiet"])
    assert 0 < metrics["diversity_ratio"] < 10 and metrics["nearest_real_ratio"] > 0
    assert (tmp_path / "samples.png").stat().st_size > 0


def test_r1_penalty_flag(train_gan):
    metrics = train_gan.main(["--data", "ring8", "--steps", "3", "--penalty", "r1", "--quiet"])
    assert metrics["steps"] == 3


def test_attention_flag(train_gan):
    """--attention: a self-attention block (ganops.nn.MultiheadAttention) after the conv
    critic's first convolution, which WGAN-GP and R1 train through; R1 reaches its parameters."""
    _, plain = train_gan.conv_pair(8)
    _, critic = train_gan.conv_pair(8, attention=True)
    assert not any(isinstance(m, ganops.nn.MultiheadAttention) for m in plain.modules())
    (attention,) = [m for m in critic.modules() if isinstance(m, ganops.nn.MultiheadAttention)]
    real = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ganops.r1_penalty(critic, real, gamma=10.0).backward()
    assert attention.in_proj_weight.grad.abs().max() > 0
    for penalty in ("gp", "r1"):
        metrics = train_gan.main(["--data", "digits", "--steps", "2", "--attention", "--penalty", penalty, "--quiet"])
        assert metrics["steps"] == 2 and torch.isfinite(torch.tensor(metrics["final_loss_d"]))
    with pytest.raises(SystemExit):
        train_gan.parse_args(["--data", "ring8", "--attention"])
