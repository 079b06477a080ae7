import torch

from opdx.seeding import derive_seed, generator, isolated, seed_global


def test_seeds_are_stable_and_distinct_per_purpose_and_step():
    assert derive_seed(0, "rollout", 1) == 8911054625556009685  # sha256-based: the same in every process
    seeds = {derive_seed(s, p, i) for s in (0, 1) for p in ("rollout", "prompts", "eval/student") for i in range(50)}
    assert len(seeds) == 300 and all(0 <= seed < 2**63 for seed in seeds)
    a = torch.rand(3, generator=generator(0, "prompts", 5))
    assert torch.equal(a, torch.rand(3, generator=generator(0, "prompts", 5)))


def test_an_isolated_block_neither_reads_nor_changes_the_outer_stream():
    seed_global(0, "rollout", 3)
    plain = torch.rand(4)
    seed_global(0, "rollout", 3)
    with isolated(0, "eval/student", 3):
        inside = torch.rand(100)
    assert torch.equal(torch.rand(4), plain)
    torch.manual_seed(12345)  # whatever the outer state, the block draws the same
    with isolated(0, "eval/student", 3):
        assert torch.equal(torch.rand(100), inside)
