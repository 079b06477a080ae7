"""`opdx eval`: the teacher and the student side by side on a benchmark, or a trained run's student.

    opdx eval model=smollm2_135m benchmark=bfcl eval.problems=50 eval.n=8
    opdx eval eval.run=outputs/2026-11-26/10-00-00      # a trained run's student

Prints a markdown table (greedy accuracy, avg@n, pass@k, the student's per-token KL(p || q)) and
writes ``eval.json`` into the output directory, with ``samples.jsonl``: ``samples`` (4) greedy and
sampled rollouts of each model as text (``opdx samples <output dir>`` prints them). The trainer's
periodic eval is the same ``opdx.evaluation.evaluate_split`` with the same ``eval.*`` settings.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from opdx.checkpoint import CheckpointError, load_weights, usable_checkpoint
from opdx.config import check
from opdx.evaluation import eval_problem_count, evaluate_split, format_side_by_side
from opdx.files import atomic_write_text
from opdx.lora import has_adapters
from opdx.metrics import SAMPLES_FILE
from opdx.policy import TokenScores
from opdx.run import Setup, start
from opdx.samples import SampleLog
from opdx.summary import components_table, markdown_table

EVAL_FILE = "eval.json"


def student_of_run(run_dir: Path) -> tuple[Path | None, Path | None]:
    """A run's trained student: its saved ``student/`` directory (a model, or a LoRA run's adapters
    on their base), else its last usable checkpoint."""
    if any((run_dir / "student" / name).exists() for name in ("config.json", "adapter_config.json")):
        return run_dir / "student", None
    checkpoint = usable_checkpoint(run_dir)
    if checkpoint is None:
        raise CheckpointError(f"eval.run={run_dir} has neither student/ nor a checkpoint")
    return None, checkpoint


def run_eval(run: Setup, out_dir: Path) -> dict[str, Any]:
    """Teacher and student side by side on the run's benchmark; writes and returns the eval.json record."""
    cfg = run.config
    checkpoint = None
    if cfg.eval.run:
        student_dir, checkpoint = student_of_run(Path(cfg.eval.run))
        if student_dir is not None:
            check(
                cfg.teacher.get("weights") != "initial" or (student_dir / "adapter_config.json").exists(),
                f"teacher.weights=initial: {student_dir} is the trained student, not its initial weights; "
                f"evaluate against them with teacher=hf model.teacher={cfg.model.student}",
            )
            cfg.model.student = str(student_dir)
    began = time.perf_counter()
    parts = start(run)
    student = TokenScores(parts.student)
    if checkpoint is not None:
        load_weights(checkpoint, student)
    if checkpoint is not None or has_adapters(parts.student):
        parts.rollout.update_weights(student, 0)  # a sampler with its own copy (rollout=vllm) takes them, merged
    load_seconds = time.perf_counter() - began
    results, seconds, rows = {}, {}, []
    for role, sampler, teacher in (("teacher", parts.teacher, None), ("student", parts.rollout, parts.teacher)):
        began = time.perf_counter()
        samples = SampleLog(parts.tokenizer, cfg.samples, role) if cfg.samples and parts.ranks.main else None
        results[role] = evaluate_split(
            sampler, parts.tokenizer, run.benchmark, cfg.eval, run.sampling, cfg.sampling.max_new_tokens, teacher,
            parts.ranks.main, parts.ranks, samples,
        )  # fmt: skip
        seconds[role] = round(time.perf_counter() - began, 1)
        rows += [] if samples is None else samples.rows
    record = {
        "model": cfg.model.name,
        "teacher": cfg.model.teacher,
        "student": cfg.model.student,
        "run": cfg.eval.run,
        "benchmark": run.benchmark.name,
        "problems": eval_problem_count(run.benchmark, cfg.eval),
        "n": cfg.eval.n,
        "max_new_tokens": cfg.eval.max_new_tokens or cfg.sampling.max_new_tokens,
        "results": results,
        "seconds": {"load": round(load_seconds, 1), **seconds},
    }
    if not parts.ranks.main:
        return record
    path = out_dir / EVAL_FILE
    path.write_text(json.dumps(record, indent=2) + "\n")
    if rows:
        atomic_write_text(out_dir / SAMPLES_FILE, "".join(json.dumps({"step": 0, **row}) + "\n" for row in rows))
    print(f"\n{record['benchmark']}: {record['problems']} problems, n={record['n']} ({cfg.model.name})")
    per_component = components_table(results)
    if per_component is not None:
        print(markdown_table(per_component) + "\n")
    print(format_side_by_side({role: {k: v for k, v in one.items() if "/" not in k} for role, one in results.items()}))
    print(f"written to {path}" + (f"; sample texts: opdx samples {out_dir}" if rows else ""))
    return record
