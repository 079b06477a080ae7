"""Atomic, verified, resharding checkpoints: the student and optimizer with
``torch.distributed.checkpoint`` (DCP), the schedule and loop state beside them.

    run_dir/checkpoints/step_000012/          DCP files (every rank writes its shard) + extra.pt
    run_dir/checkpoints/step_000012.sha256    the digest of each file, written last by rank 0

Every rank saves into a temporary directory; the ranks then fsync and hash its files, each rank a
share of them (file i on rank i mod the world size: an 8B student with its AdamW state is about
100 GB, which one rank would take minutes to hash while the others wait), and rank 0 renames it
into place and writes the digest file atomically (``opdx.files``). A checkpoint without its digest (killed while
written) or whose files do not match it is reported at resume and the previous one used; the last
``KEEP`` are kept. DCP stores each tensor once with its global shape, so a checkpoint saved on 2
ranks loads on 1 and the other way round (``get_state_dict`` / ``set_state_dict`` handle the DDP
and FSDP2 wrappers). No random-generator state is saved: every draw is a function of
(seed, purpose, step, rank) (``opdx.seeding``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.nn.parallel import DistributedDataParallel

from opdx.dist import ONE_RANK, Ranks, active, barrier, broadcast, gather_dicts
from opdx.files import atomic_write_text, sha256_of

CHECKPOINT_DIR = "checkpoints"
EXTRA_FILE = "extra.pt"
# A checkpoint holds the tensors that train (a LoRA student's adapters alone; ``opdx.lora``): the
# frozen ones are left out at save, and not expected at load (DCP still fails on a missing trainable one).
SAVED = StateDictOptions(ignore_frozen_params=True)
LOADED = StateDictOptions(ignore_frozen_params=True, strict=False)
KEEP = 2
_NAME = re.compile(r"step_(\d+)")


def trained_state(policy: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """The policy's and optimizer's state dicts (``get_state_dict``) without frozen tensors."""
    model_state, optimizer_state = get_state_dict(policy, optimizer, options=SAVED)
    return without_frozen(policy, model_state), optimizer_state


def without_frozen(policy: nn.Module, model_state: dict[str, Any]) -> dict[str, Any]:
    """``model_state`` without the policy's frozen tensors. torch's ``ignore_frozen_params`` drops
    each frozen parameter under one name only, so a frozen tied one (a LoRA student's output layer
    tied to its embeddings) would stay under the other."""
    module = policy.module if isinstance(policy, DistributedDataParallel) else policy
    frozen = {
        name for name, parameter in module.named_parameters(remove_duplicate=False) if not parameter.requires_grad
    }
    return {name: value for name, value in model_state.items() if name not in frozen}


class CheckpointError(Exception):
    """A run has checkpoints but none of them can be read; the message lists what is wrong with each."""


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """The run's checkpoint directories, newest step first."""
    paths = (Path(run_dir) / CHECKPOINT_DIR).glob("step_*")
    found = [(int(m.group(1)), p) for p in paths if p.is_dir() and (m := _NAME.fullmatch(p.name))]
    return [path for _, path in sorted(found, reverse=True)]


def has_checkpoint(run_dir: Path) -> bool:
    return bool(checkpoint_dirs(run_dir))


def _digest_file(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _digests(path: Path, ranks: Ranks, flush: bool = False) -> dict[str, str]:
    """The sha256 of each file in ``path`` by name, on every rank; each rank hashes its share (file
    i of the sorted names on rank i mod world; a collective call) and, with ``flush``, fsyncs it."""
    share = {}
    for file in sorted(path.iterdir())[ranks.rank :: ranks.world]:
        if flush:
            with file.open("rb") as handle:
                os.fsync(handle.fileno())
        share[file.name] = sha256_of(file)
    return gather_dicts(share)


def save_checkpoint(
    run_dir: Path, step: int, policy: nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any], ranks: Ranks
) -> Path:
    """Save the policy and optimizer (every rank its shard) and rank 0's ``extra`` (schedule, loop
    state) as the checkpoint of ``step``; a collective call of every rank."""
    directory = Path(run_dir) / CHECKPOINT_DIR
    path, tmp = directory / f"step_{step:06d}", directory / f".step_{step:06d}.tmp"
    if ranks.main:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    model_state, optimizer_state = trained_state(policy, optimizer)
    with one_process_quiet():
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(tmp), no_dist=not active())
    if ranks.main:
        torch.save({**extra, "step": step}, tmp / EXTRA_FILE)
    barrier()
    digests = _digests(tmp, ranks, flush=True)
    if ranks.main:
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        atomic_write_text(_digest_file(path), json.dumps(digests) + "\n")
        for old in checkpoint_dirs(run_dir)[KEEP:]:
            _digest_file(old).unlink(missing_ok=True)
            shutil.rmtree(old)
    barrier()
    return path


@contextmanager
def one_process_quiet() -> Iterator[None]:
    """DCP warns at every save and load of a one-process run that it assumes one process; it is right."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _problem(path: Path, ranks: Ranks) -> str | None:
    """What makes the checkpoint at ``path`` unusable, or None (a collective call: every rank hashes
    its share of the files)."""
    digest = _digest_file(path)
    if not digest.exists():
        return "unfinished (no digest: the run was killed while writing it)"
    try:
        expected = json.loads(digest.read_text())
    except json.JSONDecodeError:
        return "damaged (its digest file is not readable)"
    if expected != _digests(path, ranks):
        return "damaged (its files do not match their sha256)"
    return None


def usable_checkpoint(run_dir: Path, ranks: Ranks | None = None) -> Path | None:
    """The newest checkpoint whose files match their digest (the ranks hash a share of the files
    each, rank 0's answer goes to every rank); a newer unfinished or damaged one is reported and
    skipped. None when the run has no checkpoint; CheckpointError when it has some and none is
    usable."""
    ranks = ranks or ONE_RANK
    problems = []
    for path in broadcast(checkpoint_dirs(run_dir)):
        problem = broadcast(_problem(path, ranks))  # rank 0's verdict on every rank
        if problem is None:
            for earlier in problems if ranks.main else []:
                print(f"checkpoint {earlier}; resuming from {path.name} instead")
            return path
        problems.append(f"{path.name} is {problem}")
    if problems:
        raise CheckpointError(f"no usable checkpoint in {Path(run_dir) / CHECKPOINT_DIR}: {'; '.join(problems)}")
    return None


def load_checkpoint(path: Path, policy: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load a checkpoint into the policy and optimizer (on any number of ranks); returns its extra state."""
    model_state, optimizer_state = trained_state(policy, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    with one_process_quiet():
        dcp.load(state, checkpoint_id=str(path), no_dist=not active())
    set_state_dict(
        policy, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"], options=LOADED
    )
    return read_extra(path)


def load_weights(path: Path, policy: nn.Module) -> None:
    """Load only a checkpoint's model weights into ``policy`` (``opdx eval`` of an unfinished run)."""
    state = {"model": without_frozen(policy, get_model_state_dict(policy, options=SAVED))}
    with one_process_quiet():
        dcp.load(state, checkpoint_id=str(path), no_dist=not active())
    set_model_state_dict(policy, state["model"], options=LOADED)


def read_extra(path: Path) -> dict[str, Any]:
    """A checkpoint's schedule and loop state, with its ``step``."""
    return torch.load(path / EXTRA_FILE, map_location="cpu", weights_only=False)
