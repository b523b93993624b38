"""ganops under torch.distributed: 2 CPU ranks (gloo) against one process on the whole batch."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import distributed_gan as gan

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def single_process_result():
    generator, critic = gan.make_models()
    norms = gan.train(generator, critic, gan.make_batches())
    return gan.full_state(generator, critic), norms


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_gan_steps_match_single_process(mode, tmp_path):
    out = tmp_path / f"{mode}.pt"
    mp.spawn(gan.rank_main, args=(2, gan.free_port(), mode, str(out)), nprocs=2, join=True)
    result = torch.load(out)
    state, norms = single_process_result()
    # The clip norms are the global ones, step by step: with FSDP2 each rank holds half of
    # every gradient, so a per-rank norm would be visibly smaller.
    torch.testing.assert_close(result["norms"], norms, rtol=1e-5, atol=1e-6)
    assert (norms > gan.MAX_NORM).any(), "the test must clip for real"
    assert state.keys() == result["state"].keys()
    for name, value in state.items():
        torch.testing.assert_close(result["state"][name], value, rtol=1e-5, atol=1e-6, msg=name)
