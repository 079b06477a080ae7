"""Random streams, one per purpose: a draw is a function of (seed, purpose, step) alone.

The training rollout of step n samples with the global generator seeded from
(seed, "rollout", n); the step's prompts come from (seed, "prompts", n); an eval at step n
samples from (seed, "eval", n) inside ``torch.random.fork_rng``, so it leaves the training
stream untouched. Eval settings therefore cannot change a training trajectory, and a run
resumed from any checkpoint, or with a larger ``trainer.steps``, draws exactly what the
uninterrupted run drew, with no generator state to save.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def derive_seed(seed: int, purpose: str, *indices: int) -> int:
    """A 63-bit seed from (seed, purpose, indices), stable across processes and Python versions
    (sha256, not ``hash``)."""
    key = "/".join([str(seed), purpose, *map(str, indices)])
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") >> 1


def generator(seed: int, purpose: str, *indices: int) -> torch.Generator:
    """A CPU generator of its own for (seed, purpose, indices)."""
    return torch.Generator().manual_seed(derive_seed(seed, purpose, *indices))


def seed_global(seed: int, purpose: str, *indices: int) -> None:
    """Seed the global generators (CPU and CUDA: what ``generate`` samples with) for this purpose."""
    torch.manual_seed(derive_seed(seed, purpose, *indices))


ISOLATED = threading.RLock()  # the generators are the process's: one isolated block at a time


@contextmanager
def isolated(seed: int, purpose: str, *indices: int) -> Iterator[None]:
    """Run the block on the global generators seeded for (seed, purpose, indices), then restore
    their state: the block's draws neither depend on nor change anything outside it. Blocks in
    several threads (a rollout sampled ahead, ``opdx.pipeline``, and an eval) run one at a time."""
    with ISOLATED, torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        seed_global(seed, purpose, *indices)
        yield
