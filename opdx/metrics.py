"""Metrics of a run (config group `logger`): metrics.jsonl always, wandb when asked.

One dict per step with namespaced keys (``train/loss``, ``div/reverse_kl``, ``time/rollout``,
``eval/arith/greedy_acc``), filled with ``timed`` blocks and written once per step.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


@contextmanager
def timed(metrics: dict[str, float], key: str) -> Iterator[None]:
    """Add the wall time of the block to ``metrics[f"time/{key}"]`` in seconds."""
    start = time.perf_counter()
    yield
    metrics[f"time/{key}"] = metrics.get(f"time/{key}", 0.0) + time.perf_counter() - start


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class JsonlLogger:
    """Appends one JSON object per step to ``<run_dir>/metrics.jsonl``.

    ``resume_from_step`` drops records logged after the checkpoint being resumed, so a run
    killed at any moment and resumed has each step exactly once.
    """

    def __init__(self, run_dir: Path, config: dict[str, Any], resume_from_step: int | None = None, **_: Any):
        self.path = Path(run_dir) / METRICS_FILE
        if resume_from_step is not None:
            kept = [r for r in read_metrics(run_dir) if r["step"] <= resume_from_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        elif self.path.exists():
            self.path.unlink()

    def log(self, metrics: dict[str, float], step: int) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps({"step": step, **metrics}) + "\n")

    def summary(self, summary: dict[str, Any]) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbLogger(JsonlLogger):
    """metrics.jsonl plus a wandb run: resolved config, metrics, summary; group =
    logger.group (default under -m: the sweep directory name), tags = divergence, estimator,
    model, benchmark. Resumes the same run id."""

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
        import wandb

        super().__init__(run_dir, config, resume_from_step)
        id_file = Path(run_dir) / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
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

    def log(self, metrics: dict[str, float], step: int) -> None:
        super().log(metrics, step)
        self.run.log(metrics, step=step)

    def summary(self, summary: dict[str, Any]) -> None:
        for key, value in summary.items():
            self.run.summary[key] = value

    def finish(self) -> None:
        self.run.finish()


LOGGERS: dict[str, Callable[..., JsonlLogger]] = {"jsonl": JsonlLogger, "wandb": WandbLogger}
