"""`opdx eval`: the teacher and the student side by side on a benchmark, or a trained run's student.

    opdx eval model=smollm2_135m benchmark=bfcl eval.problems=50 eval.n=8
    opdx eval eval.run=outputs/2026-11-26/10-00-00      # a trained run's student

Prints a markdown table (greedy accuracy, avg@n, pass@k, the student's per-token KL(p || q)) and
writes ``eval.json`` into the output directory. The trainer's periodic eval is the same
``opdx.evaluation.evaluate_split`` with the same ``eval.*`` settings.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from opdx.checkpoint import load_checkpoint
from opdx.evaluation import evaluate_split, format_side_by_side
from opdx.run import Run, start

EVAL_FILE = "eval.json"


def student_of_run(run_dir: Path) -> tuple[Path | None, dict[str, torch.Tensor] | None]:
    """A run's trained student: its saved ``student/`` directory, else the last checkpoint's weights."""
    if (run_dir / "student" / "config.json").exists():
        return run_dir / "student", None
    checkpoint = load_checkpoint(run_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"eval.run={run_dir} has neither student/ nor checkpoint.pt")
    return None, checkpoint["student"]


def run_eval(run: Run, out_dir: Path) -> dict[str, Any]:
    """Teacher and student side by side on the run's benchmark; writes and returns the eval.json record."""
    cfg = run.config
    state_dict = None
    if cfg.eval.run:
        student_dir, state_dict = student_of_run(Path(cfg.eval.run))
        if student_dir is not None:
            cfg.model.student = str(student_dir)
    began = time.perf_counter()
    parts = start(run, train=False)
    if state_dict is not None:
        parts.student.load_state_dict(state_dict)
    load_seconds = time.perf_counter() - began
    results, seconds = {}, {}
    for role, sampler, teacher in (("teacher", parts.teacher, None), ("student", parts.rollout, parts.teacher)):
        began = time.perf_counter()
        results[role] = evaluate_split(
            sampler, parts.tokenizer, run.benchmark, cfg.eval, run.sampling, cfg.trainer.max_new_tokens, teacher, True
        )
        seconds[role] = round(time.perf_counter() - began, 1)
    record = {
        "model": cfg.model.name,
        "teacher": cfg.model.teacher,
        "student": cfg.model.student,
        "run": cfg.eval.run,
        "benchmark": run.benchmark.name,
        "problems": min(cfg.eval.problems, len(run.benchmark.eval)),
        "n": cfg.eval.n,
        "max_new_tokens": cfg.eval.max_new_tokens or cfg.trainer.max_new_tokens,
        "results": results,
        "seconds": {"load": round(load_seconds, 1), **seconds},
    }
    path = out_dir / EVAL_FILE
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\n{record['benchmark']}: {record['problems']} problems, n={record['n']} ({cfg.model.name})")
    print(format_side_by_side(results))
    print(f"written to {path}")
    return record
