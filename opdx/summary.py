"""A run's loop state and its summary: what the loop carries from step to step (and saves in
every checkpoint), and the ``summary.json`` made from it and the run's metrics at the end.

``LoopState`` is typed; a checkpoint holds it as a plain dict (``to_dict``), and ``from_dict``
reads those of any opdx version (a key it does not know is refused by name, one it lacks takes
its default). The summary puts the initial, final and best evals beside the teacher's, with the
accuracy change and its interval and the collapse verdict of ``opdx.outcome``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from opdx.config import RunConfig
from opdx.metrics import read_metrics
from opdx.outcome import accuracy_change, collapse_reason, truncation

SUMMARY_FILE = "summary.json"


@dataclass
class LoopState:
    """The training loop's state between steps: wall time so far, the non-finite steps skipped
    (in all, and in a row), the evals (the teacher's at step 0, the student's initial, best
    and latest, each a metrics dict with its ``step`` except the teacher's) and the early
    warnings' state (``opdx.monitor.Monitor.to_dict``)."""

    elapsed: float = 0.0
    skipped_steps: int = 0
    bad_streak: int = 0
    teacher_eval: dict[str, float] = field(default_factory=dict)
    initial_eval: dict[str, float] = field(default_factory=dict)
    best_eval: dict[str, float] = field(default_factory=dict)
    final_eval: dict[str, float] | None = None
    monitor: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The state as a checkpoint stores it (plain Python values)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: Mapping[str, Any]) -> LoopState:
        """The state a checkpoint stored; ValueError naming a key this version does not know."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(saved) - known)
        if unknown:
            raise ValueError(f"checkpoint loop state has unknown keys {unknown}; known: {', '.join(sorted(known))}")
        return cls(**saved)


def make_summary(
    config: RunConfig, names: Mapping[str, str], state: LoopState, run_dir: Path, eval_problems: int
) -> dict[str, Any]:
    """Initial / final / best eval beside the teacher's, key choices, the collapse and truncation
    verdicts, the early warnings ({signal: step}), wall time, step-time split.

    ``names``: the built ``divergence``, ``estimator`` and ``benchmark`` names; ``eval_problems``
    the problems each eval graded (a mixture's weighted mean is treated as one pool of them,
    which is exact for equal weights)."""
    records = read_metrics(run_dir)
    steps = [r for r in records if "time/update" in r]
    mean = {k: sum(r[k] for r in steps) / len(steps) for k in ("time/rollout", "time/teacher", "time/update")}
    before, after = state.initial_eval["greedy_acc"], state.final_eval["greedy_acc"]
    change = accuracy_change(before, after, eval_problems)
    return {
        "model": config.model.name,
        "divergence": names["divergence"],
        "divergence_params": {k: v for k, v in config.divergence.items() if k != "name"},
        "estimator": names["estimator"],
        "support": config.estimator.support,
        "gamma": config.estimator.gamma,
        "benchmark": names["benchmark"],
        "seed": config.seed,
        "steps": config.trainer.steps,
        "group": config.logger.group,
        "teacher_eval": state.teacher_eval,
        "initial_eval": state.initial_eval,
        "final_eval": state.final_eval,
        "best_eval": state.best_eval,
        "eval_problems": eval_problems,
        "skipped_steps": state.skipped_steps,
        "greedy_acc_change": {"difference": change.difference, "ci95": [change.low, change.high]},
        "below_start": change.below_start,
        "collapse": collapse_reason(records, config.sampling.max_new_tokens, before, after),
        "truncation": truncation(records, config.sampling.max_new_tokens),
        "early_warnings": state.monitor.get("fired", {}),
        "wall_time_s": round(state.elapsed, 1),
        "mean_step_time_s": {k.removeprefix("time/"): round(v, 4) for k, v in mean.items()},
    }


def print_summary(summary: dict[str, Any]) -> None:
    """The summary as the end of ``opdx train`` prints it: the evals table (per component first,
    for a mixture), the accuracy change with its verdict, collapse, skipped steps, time split."""
    rows = {"teacher": summary["teacher_eval"], "student before": summary["initial_eval"]}
    rows |= {"student after": summary["final_eval"], "student best": summary["best_eval"]}
    table = pd.DataFrame(rows).T.drop(columns="step")
    per_component = components_table(rows)
    support = summary.get("support", "sampled")  # summaries written before estimator.support have none
    estimator = summary["estimator"] + ("" if support == "sampled" else f" ({support} support)")
    print(f"\n{summary['divergence']} / {estimator} on {summary['benchmark']}, {summary['steps']} steps:")
    if per_component is not None:
        print(markdown_table(per_component) + "\n")
    print(markdown_table(table[[key for key in table if "/" not in key]]))  # a mixture's: the weighted means
    change = accuracy_change(
        summary["initial_eval"]["greedy_acc"], summary["final_eval"]["greedy_acc"], summary["eval_problems"]
    )
    verdict = "within eval noise of the initial student"
    if change.below_start or change.low > 0:
        verdict = f"{'below' if change.below_start else 'above'} the initial student beyond eval noise"
    print(f"student greedy accuracy: {change} ({verdict})")
    if summary.get("truncation"):  # summaries written before truncation was told apart have none
        print(f"truncation: {summary['truncation']}")
    print(f"collapse: {summary['collapse'] or 'no (rollouts end, accuracy above 0, metrics finite)'}")
    if "early_warnings" in summary:  # summaries written before opdx.monitor have none
        fired = ", ".join(f"{signal} at step {step}" for signal, step in summary["early_warnings"].items())
        print(f"early warnings: {fired or 'none'}")
    if summary["skipped_steps"]:
        skipped = summary["skipped_steps"]
        print(f"skipped steps: {skipped} (non-finite values, nothing of them applied; see nonfinite/*)")
    split = ", ".join(f"{k} {v:.3f}s" for k, v in summary["mean_step_time_s"].items())
    print(f"wall time {summary['wall_time_s']:.0f}s; mean step: {split}")


def markdown_table(table: pd.DataFrame) -> str:
    """``table`` in markdown with 4 decimals and "-" where a value is missing."""
    return table.astype(object).where(table.notna(), None).to_markdown(floatfmt=".4f", missingval="-")


def components_table(results: dict[str, dict[str, float]], metric: str = "greedy_acc") -> pd.DataFrame | None:
    """Rows: the components of mixture results (keys ``c/<metric>``); columns: the results
    (teacher, student before, ...); None when the results have no component."""
    components = [key.rpartition("/")[0] for key in next(iter(results.values())) if key.endswith(f"/{metric}")]
    if not components:
        return None
    table = pd.DataFrame({role: {c: one.get(f"{c}/{metric}") for c in components} for role, one in results.items()})
    table.index.name = f"component: {metric}"
    return table
