"""Atomic, verified checkpoints: student weights, optimizer, scheduler, loop state, step.

    run_dir/checkpoints/step_000012.pt          torch.save of the state
    run_dir/checkpoints/step_000012.pt.sha256   its digest, written after it

Both are written atomically (``opdx.files.atomic_write``), so a kill at any moment leaves
either the old file or the new one. The digest file is the commit mark: a checkpoint without
it, or whose bytes do not match it, is reported at resume and the previous one used. The last
``KEEP`` checkpoints are kept. No random-generator state is saved: every draw is a function of
(seed, purpose, step) (``opdx.seeding``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from opdx.files import atomic_write, atomic_write_text, sha256_of

CHECKPOINT_DIR = "checkpoints"
KEEP = 2
_NAME = re.compile(r"step_(\d+)\.pt")


class CheckpointError(Exception):
    """A run has checkpoints but none of them can be read; the message lists what is wrong with each."""


def checkpoint_paths(run_dir: Path) -> list[Path]:
    """The run's checkpoint files, newest step first."""
    paths = (Path(run_dir) / CHECKPOINT_DIR).glob("step_*.pt")
    found = [(int(m.group(1)), p) for p in paths if (m := _NAME.fullmatch(p.name))]
    return [path for _, path in sorted(found, reverse=True)]


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (with its ``step``) as a verified checkpoint and drop all but the last ``KEEP``."""
    directory = Path(run_dir) / CHECKPOINT_DIR
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step_{state['step']:06d}.pt"
    atomic_write(path, lambda handle: torch.save(state, handle))
    atomic_write_text(path.with_name(path.name + ".sha256"), sha256_of(path) + "\n")
    for old in checkpoint_paths(run_dir)[KEEP:]:
        old.with_name(old.name + ".sha256").unlink(missing_ok=True)
        old.unlink()
    return path


def _problem(path: Path) -> str | None:
    digest = path.with_name(path.name + ".sha256")
    if not digest.exists():
        return "unfinished (no digest: the run was killed while writing it)"
    if digest.read_text().strip() != sha256_of(path):
        return "damaged (its bytes do not match its sha256)"
    return None


def load_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    """The newest checkpoint whose digest matches, None when the run has none; a newer one that
    is unfinished or damaged is reported and skipped. Raises CheckpointError when none can be read."""
    problems = []
    for path in checkpoint_paths(run_dir):
        problem = _problem(path)
        if problem is None:
            try:
                state = torch.load(path, map_location="cpu", weights_only=False)
            except (RuntimeError, EOFError, OSError, ValueError) as error:
                problem = f"unreadable ({type(error).__name__}: {str(error).splitlines()[0]})"
            else:
                for earlier in problems:
                    print(f"checkpoint {earlier}; resuming from {path.name} instead")
                return state
        problems.append(f"{path.name} is {problem}")
    if problems:
        raise CheckpointError(f"no usable checkpoint in {Path(run_dir) / CHECKPOINT_DIR}: {'; '.join(problems)}")
    return None


def has_checkpoint(run_dir: Path) -> bool:
    return bool(checkpoint_paths(run_dir))
