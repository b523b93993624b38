"""ganops under torch.distributed: 2 CPU ranks (gloo) against one process on the whole batch.

The GAN (tests/distributed_gan.py) has a spectral-norm critic trained with a gradient penalty
and clips both networks' gradients. Modes: everything on DDP; everything on FSDP2 (no
penalty: FSDP2 cannot run its double backward); generator on FSDP2 with the penalised
critic on DDP; lazy R1 on DDP (R1 alone every other step, find_unused_parameters=False).
"""

import functools

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import distributed_gan as gan

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

WORLD = 2


@functools.cache
def single_process_result(penalty: str):
    generator, critic = gan.make_models()
    norms = gan.train(generator, critic, gan.make_batches(), penalty=penalty)
    return gan.full_state(generator, critic), norms


@pytest.mark.parametrize("mode", list(gan.MODES))
def test_gan_steps_match_single_process(mode, tmp_path):
    out = str(tmp_path / mode)
    mp.spawn(gan.rank_main, args=(WORLD, gan.free_port(), mode, out), nprocs=WORLD, join=True)
    ranks = [torch.load(f"{out}.{rank}") for rank in range(WORLD)]
    penalty = gan.MODES[mode][2]
    state, norms = single_process_result(penalty)
    # The clip norms are the global ones, step by step: with FSDP2 each rank holds half of
    # every gradient, so a per-rank norm would be visibly smaller.
    torch.testing.assert_close(ranks[0]["norms"], norms, rtol=1e-5, atol=1e-6)
    assert (norms > gan.MAX_NORM).any(), "the test must clip for real"
    assert state.keys() == ranks[0]["state"].keys()
    for name, value in state.items():
        torch.testing.assert_close(ranks[0]["state"][name], value, rtol=1e-5, atol=1e-6, msg=name)
        # Every rank holds the same model, bit for bit: gradients are reduced, and spectral
        # norm's u, v (buffers; DDP broadcasts rank 0's before each forward) are the same.
        assert torch.equal(ranks[1]["state"][name], ranks[0]["state"][name]), name


def test_spectral_norm_vectors_move_and_penalty_counts():
    """What the step test compares is not vacuous: the power iteration moved u and v away
    from their registration values, and the penalty changed the trained parameters."""
    _, critic = gan.make_models()
    initial = gan.full_state(torch.nn.Sequential(), critic)
    with_penalty, _ = single_process_result("gp+r1")
    without, _ = single_process_result("none")
    lazy_r1, _ = single_process_result("lazy-r1")
    # The last layer's u has one element, ±1 whatever the iteration does.
    vectors = [name for name in initial if name.endswith(("._u", "._v")) and initial[name].numel() > 1]
    assert len(vectors) == 5
    assert all(not torch.equal(with_penalty[name], initial[name]) for name in vectors)
    for penalised in (with_penalty, lazy_r1):
        assert not torch.equal(penalised["critic.0.parametrizations.weight.original"],
                               without["critic.0.parametrizations.weight.original"])


def test_unsupported_combinations_raise_naming_the_supported_way(tmp_path):
    out = str(tmp_path / "errors.pt")
    mp.spawn(gan.errors_main, args=(1, gan.free_port(), out), nprocs=1, join=True)
    errors = torch.load(out)
    assert "apply ganops.spectral_norm to the module before fully_shard" in errors["spectral_norm after fully_shard"]
    for name in ("gradient_penalty on fully_shard", "r1_penalty on fully_shard"):
        assert errors[name].startswith("ValueError: critic is sharded with FSDP2"), errors[name]
        assert "wrap the critic in DistributedDataParallel" in errors[name]
    assert "use static_graph=False" in errors["gradient_penalty on static_graph"]
