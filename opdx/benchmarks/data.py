"""Benchmark records from a local file or from the hub, one code path for users on either side.

    load_records("gsm8k", path="data/gsm8k_test.jsonl")                  # local JSONL / JSON / parquet
    load_records("gsm8k", hub_id="openai/gsm8k", hub_config="main", split="test")

A local *directory* and a hub id both go through ``datasets.load_dataset``, so the hub path
is tested by pointing it at a directory of parquet / JSONL files.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from opdx.benchmarks.base import Problem

Item = TypeVar("Item")


class BenchmarkDataError(ValueError):
    """Data that cannot be loaded; the message says what to pass instead."""


def read_file(path: Path) -> list[dict[str, Any]]:
    """Records of a .jsonl / .json (a list, or JSON lines as BFCL ships them) / .parquet file."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pandas as pd

        return pd.read_parquet(path).to_dict(orient="records")
    if suffix not in (".json", ".jsonl"):
        raise BenchmarkDataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json or .parquet")
    text = path.read_text(encoding="utf-8")
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # JSON lines under a .json name
        if isinstance(data, list):
            return data
        if isinstance(data, dict):
            return [data]
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def load_records(
    benchmark: str,
    path: str | None = None,
    hub_id: str | None = None,
    hub_config: str | None = None,
    split: str = "test",
    columns: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """The records of ``path`` (a file, or a directory loaded like a hub dataset), else of the
    hub dataset ``hub_id`` / ``hub_config`` / ``split``. Raises BenchmarkDataError saying how to
    pass ``benchmark.path=`` when the hub cannot be reached. ``columns`` keeps only those columns
    of a hub / directory dataset before it becomes Python objects (DeepMath-103K carries three
    long solutions per problem: several GB as dicts)."""
    if path is not None:
        local = Path(path).expanduser()
        if not local.exists():
            raise BenchmarkDataError(f"benchmark {benchmark}: benchmark.path={path} does not exist")
        if local.is_file():
            return read_file(local)
        source, config = str(local), None
    elif hub_id is not None:
        source, config = hub_id, hub_config
    else:
        raise BenchmarkDataError(f"benchmark {benchmark}: give benchmark.path=<file or directory> or a hub id")
    try:
        import datasets
    except ImportError:
        raise BenchmarkDataError(
            f"benchmark {benchmark}: loading {source!r} needs the `datasets` package (pip install datasets), "
            "or pass a local file: benchmark.path=/path/to/data.jsonl|.parquet"
        ) from None
    try:
        dataset = datasets.load_dataset(source, config, split=split)
    except (ConnectionError, OSError) as error:
        where = "the directory" if path is not None else "the hub"
        raise BenchmarkDataError(
            f"benchmark {benchmark}: could not load {source!r} (config {config}, split {split!r}) from {where}: "
            f"{str(error).splitlines()[0] if str(error) else type(error).__name__}. Offline, download it elsewhere "
            f"and pass a local copy: benchmark.path=/path/to/{benchmark}.jsonl (or .parquet, or a directory)"
        ) from None
    except ValueError as error:  # e.g. a split the dataset does not have: its message lists the splits
        raise BenchmarkDataError(
            f"benchmark {benchmark}: {source!r} (config {config}, split {split!r}): {error}"
        ) from None
    if columns is not None:
        dataset = dataset.select_columns([c for c in columns if c in dataset.column_names])
    return dataset.to_list()


def pick_eval(items: list[Item], eval_size: int | None, seed: int, benchmark: str, split: str) -> list[Item]:
    """``eval_size`` of ``items`` chosen by a seeded shuffle, kept in their original order (all of
    them for None); a larger eval_size picks a superset."""
    if eval_size is None:
        return items
    if eval_size > len(items):
        raise BenchmarkDataError(
            f"benchmark {benchmark}: eval_size={eval_size} but split {split!r} has only {len(items)} problems; "
            "lower benchmark.eval_size or set it to null (all)"
        )
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in sorted(order[:eval_size])]


def drop_eval_prompts(train: list[Problem], eval: list[Problem], benchmark: str, split: str) -> list[Problem]:
    """The train problems whose prompt is not an eval prompt; raises when none are left."""
    held_out = {problem.prompt for problem in eval}
    kept = [problem for problem in train if problem.prompt not in held_out]
    if not kept:
        raise ValueError(
            f"benchmark {benchmark}: no train prompts left: all {len(train)} problems of split {split!r} are eval "
            "problems (a single file is one split: set benchmark.eval_size to hold out only part of it, or give "
            "a directory with train and test files)"
        )
    return kept
