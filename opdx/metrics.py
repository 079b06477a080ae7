"""Metrics of a run (config group `logger`): metrics.jsonl always, wandb when asked.

One dict per step with namespaced keys (``train/loss``, ``div/reverse_kl``, ``time/rollout``,
``memory/update_gib``, ``eval/arith/greedy_acc``), filled with ``timed`` blocks and written once
per step.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

from opdx.files import atomic_write_text, read_jsonl

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"  # opdx.samples: rows of sample texts, by step


GIB = 2**30
_track_cpu_memory = False


def nonfinite_names(record: dict[str, Any]) -> str:
    """The parts a skipped step's metrics name as not finite (its ``nonfinite/<part>`` keys),
    comma-separated; "" for a step that was not skipped."""
    return ",".join(key.removeprefix("nonfinite/") for key in record if key.startswith("nonfinite/"))


def track_cpu_memory(on: bool) -> None:
    """``runtime.track_memory``: ``timed`` blocks on a CPU also record their peak memory (slow)."""
    global _track_cpu_memory
    _track_cpu_memory = on


@contextmanager
def timed(metrics: dict[str, float], key: str) -> Iterator[None]:
    """Add the wall time of the block to ``metrics[f"time/{key}"]`` in seconds; where CUDA is in
    use, the GPU work queued in the block counts too (synchronised before and after), not in the
    next block's time. The block's peak memory goes to ``metrics[f"memory/{key}_gib"]`` (the most
    over the step's blocks of that key), where it is measured (``peak_memory``)."""
    synchronize()
    start = time.perf_counter()
    with peak_memory() as peak:
        yield
    synchronize()
    metrics[f"time/{key}"] = metrics.get(f"time/{key}", 0.0) + time.perf_counter() - start
    if peak:
        metrics[f"memory/{key}_gib"] = max(metrics.get(f"memory/{key}_gib", 0.0), peak[0] / GIB)


@contextmanager
def peak_memory() -> Iterator[list[int]]:
    """The block's peak bytes of live tensors, in the list it yields (empty where not measured).
    On CUDA the allocator's peak (``torch.cuda.max_memory_allocated`` of the current device, reset
    at the start). On a CPU with ``track_cpu_memory`` on, ``LiveTensorBytes``; else nothing."""
    torch = sys.modules.get("torch")
    peak: list[int] = []
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
        yield peak
        peak.append(torch.cuda.max_memory_allocated())
    elif torch is not None and _track_cpu_memory:
        from opdx.memory_tracking import LiveTensorBytes  # torch's dispatch mode: only when asked

        with LiveTensorBytes() as live:
            yield peak
        peak.append(live.peak)
    else:
        yield peak


def synchronize() -> None:
    """Wait for queued CUDA work when this process has started CUDA; torch is not imported here
    (``opdx table`` reads metrics without it)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` (``read_jsonl``: a last line cut short by a kill is left out)."""
    return read_jsonl(Path(run_dir) / METRICS_FILE)


def append_lines(path: Path, records: list[dict[str, Any]]) -> None:
    """``records`` appended to ``path`` as JSON lines, flushed to disk before returning."""
    with path.open("a") as handle:
        handle.write("".join(json.dumps(record) + "\n" for record in records))
        handle.flush()
        os.fsync(handle.fileno())


class JsonlLogger:
    """Appends one JSON object per step to ``<run_dir>/metrics.jsonl``, and the step's sample
    texts (``opdx.samples``), one row per line, to ``<run_dir>/samples.jsonl``.

    ``resume_from_step`` drops the records and rows logged after the checkpoint being resumed, so
    a run killed at any moment and resumed has each step exactly once in both.
    """

    def __init__(self, run_dir: Path, config: dict[str, Any], resume_from_step: int | None = None, **_: Any):
        self.path, self.samples_path = Path(run_dir) / METRICS_FILE, Path(run_dir) / SAMPLES_FILE
        for path in (self.path, self.samples_path):
            if resume_from_step is not None:
                kept = [r for r in read_jsonl(path) if r["step"] <= resume_from_step]
                atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
            elif path.exists():
                path.unlink()

    def log(self, metrics: dict[str, float], step: int) -> None:
        append_lines(self.path, [{"step": step, **metrics}])

    def samples(self, rows: list[dict[str, Any]], step: int) -> None:
        """The step's sample rows; logged before the step's metrics (``log``), so a checkpoint of
        the step comes after both."""
        append_lines(self.samples_path, [{"step": step, **row} for row in rows])

    def summary(self, summary: dict[str, Any]) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbLogger(JsonlLogger):
    """metrics.jsonl plus a wandb run: resolved config, metrics, summary; group =
    logger.group (default under -m: the sweep directory name), tags = divergence, estimator,
    model, benchmark. Resumes the same run id.

    wandb is a mirror, never a reason to stop: if it cannot start (online with no network or no
    API key) or fails mid-run (its service process died), the run says so once and goes on with
    metrics.jsonl, which has every step either way."""

    def __init__(
        self,
        run_dir: Path,
        config: dict[str, Any],
        resume_from_step: int | None = None,
        project: str = "opdx",
        group: str | None = None,
        tags: list[str] | None = None,
        name: str | None = None,
    ):
        super().__init__(run_dir, config, resume_from_step)
        id_file = Path(run_dir) / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        self.run, self.service = None, None
        try:
            import wandb

            self.run = wandb.init(
                project=project,
                group=group,
                tags=list(tags or []),
                name=name,
                config=config,
                dir=str(run_dir),
                id=run_id,
                resume="allow",
            )
        except Exception as error:  # wandb's own errors (no network, no key, bad settings) vary by version
            self._down(error)

    def _down(self, error: Exception) -> None:
        """Say once that wandb is down, and stop calling it."""
        reason = f"{type(error).__name__}: {str(error).splitlines()[0]}" if str(error) else type(error).__name__
        print(f"wandb is down ({reason}); training goes on, every step is in {self.path}")
        self.run = None

    def _mirror(self, call: Callable[[Any], Any]) -> None:
        if self.run is not None and not self._service_alive():
            self._down(ConnectionError("its service process (wandb-core) is gone"))
        if self.run is not None:
            try:
                call(self.run)
            except Exception as error:  # whatever the dead service raises
                self._down(error)

    def _service_alive(self) -> bool:
        """Whether wandb's service process, a child of this one, still runs: wandb drops what is
        logged after it dies without raising, so this is how a dead wandb is noticed."""
        if self.service is None:
            self.service = [p for p in psutil.Process().children(recursive=True) if "wandb" in p.name()] or []
        return not self.service or any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in self.service)

    def log(self, metrics: dict[str, float], step: int) -> None:
        super().log(metrics, step)
        self._mirror(lambda run: run.log(metrics, step=step))

    def samples(self, rows: list[dict[str, Any]], step: int) -> None:
        """Also one wandb Table per (split, kind): ``samples/<split>_<kind>``."""
        super().samples(rows, step)

        def tables(run: Any) -> None:
            import wandb

            columns = ["prompt", "response", "reference", "score", "stop", "mean_log_u"]
            by_key: dict[str, list[list[Any]]] = {}
            for row in rows:
                log_u = row["log_u"]
                mean_log_u = sum(log_u) / len(log_u) if log_u else None
                values = [row["prompt"], row["response"], row["reference"], row["score"], row["stop"], mean_log_u]
                by_key.setdefault(f"samples/{row['split']}_{row['kind']}", []).append(values)
            run.log({key: wandb.Table(columns=columns, data=data) for key, data in by_key.items()}, step=step)

        self._mirror(tables)

    def summary(self, summary: dict[str, Any]) -> None:
        self._mirror(lambda run: run.summary.update(summary))

    def finish(self) -> None:
        self._mirror(lambda run: run.finish())


class SilentLogger:
    """What the ranks other than 0 log with: nothing (rank 0 writes every global metric)."""

    def __init__(self, *_: Any, **__: Any) -> None:
        pass

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def samples(self, rows: list[dict[str, Any]], step: int) -> None:
        pass

    def summary(self, summary: dict[str, Any]) -> None:
        pass

    def finish(self) -> None:
        pass


LOGGERS: dict[str, Callable[..., JsonlLogger]] = {"jsonl": JsonlLogger, "wandb": WandbLogger}
