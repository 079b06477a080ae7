"""Run directories -> pandas -> ablation tables (markdown / CSV / LaTeX) and learning curves.

    opdx table multirun/2026-11-26/10-00-00              # rows divergence, columns estimator
    opdx table outputs/ --rows divergence --cols estimator --facet benchmark --format latex
    opdx table multirun/supports --rows support --step-time  # sampled, topk K=4, full; seconds per step
    opdx plot multirun/2026-11-26/10-00-00 --out plots/

A run directory is any directory holding `.hydra/config.yaml`. Finished runs have a
`summary.json`; the others (crashed or still running) are reported as incomplete with the last
step they logged. Cells are the mean and the 95% confidence interval over seeds (Student t);
the paired difference OPD+ minus OPD is taken per seed within each row. A finished run is marked
collapsed (†) only by the collapse signature of ``opdx.outcome`` (rollouts that stopped ending,
accuracy fallen to 0, non-finite metrics) and, otherwise, below its start (↓) only when its
final greedy accuracy is below the initial student's beyond eval noise. A run with an early
warning (``opdx.monitor``) is counted (⚠) and listed with the warnings' steps and, where it
collapsed, the step its collapse began.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf

from opdx.config import RENAMED, MonitorConfig, upgrade
from opdx.metrics import nonfinite_names, read_metrics
from opdx.monitor import replay
from opdx.outcome import accuracy_change, collapse_reason, collapse_step, truncation

GROUP_KEYS = ("model", "divergence", "estimator", "benchmark", "logger")
# the two estimators a table compares, by their registry names (opdx.objective.ESTIMATORS; a test checks):
# named here, not imported, so that `opdx table` and `opdx plot` never load torch
ESTIMATOR_PAIR = ("stopgrad", "unbiased")
# t_{0.975, df} for df = 1..30; beyond, 1.96 (at most 4% narrow, at df = 31)
T_975 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)


def find_run_dirs(paths: list[Path]) -> list[Path]:
    """Every directory at or below ``paths`` that holds a Hydra run (``.hydra/config.yaml``)."""
    found = set()
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"no such run or multirun directory: {path}")
        found.update(p.parent.parent for p in path.glob("**/.hydra/config.yaml"))
    # natural order, so a sweep's jobs 0, 1, ..., 10 keep the grid's order
    return sorted(found, key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(p))])


def config_key(name: str) -> str:
    """``divergence`` -> ``divergence.name``; any other dotted config key is kept."""
    return f"{name}.name" if name in GROUP_KEYS else name


def load_runs(paths: list[Path]) -> pd.DataFrame:
    """One row per run: flattened config, status, steps done, initial / final / best eval (a
    mixture's components as ``<stage>/<component>/<metric>``, and a single benchmark's metrics
    also as ``<stage>/<benchmark>/<metric>``, so ``--metric arith/greedy_acc`` compares a
    mixture's arith component with runs on arith alone), and
    for complete runs what happened (``opdx.outcome``): ``collapsed`` with its ``collapse``
    reason, and ``below_start`` (the final greedy accuracy below the initial student's beyond
    eval noise) with the ``change`` and its interval."""
    rows = []
    for run_dir in find_run_dirs(paths):
        saved = OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "config.yaml"), resolve=False)
        config = upgrade(saved, warn=False)  # runs saved with settings' old names read as today's
        row: dict[str, Any] = {"run_dir": str(run_dir), **pd.json_normalize(config, sep=".").iloc[0].to_dict()}
        metrics = read_metrics(run_dir)
        row["steps_done"] = metrics[-1]["step"] if metrics else 0
        row["last_nonfinite"] = nonfinite_names(metrics[-1]) if metrics else ""
        row["support"] = support_label(config)
        row |= {"status": "incomplete", "collapsed": False, "collapse": None, "truncation": None}
        row |= early_warnings(metrics, config)
        row |= {"below_start": False, "change": None}
        summary_path = run_dir / "summary.json"
        if summary_path.exists():
            summary = json.loads(summary_path.read_text())
            row["status"] = "complete"
            benchmark = config.get("benchmark", {}).get("name")
            for stage in ("initial", "final", "best"):
                for key, value in summary[f"{stage}_eval"].items():
                    row[f"{stage}/{key}"] = value
                    if benchmark != "mixture" and "/" not in key and key != "step":  # as a mixture's component
                        row[f"{stage}/{benchmark}/{key}"] = value
            row |= outcome(summary, metrics, config)
            row["step_time_s"] = sum(summary.get("mean_step_time_s", {}).values()) or math.nan
        rows.append(row)
    runs = pd.DataFrame(rows)
    if runs.empty:
        raise FileNotFoundError(f"no run directories (with .hydra/config.yaml) under {', '.join(map(str, paths))}")
    return runs


def early_warnings(
    metrics: list[dict[str, Any]], config: dict[str, Any], override: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A run's early warnings (``opdx.monitor``, replayed over its metrics with its own
    ``monitor`` settings, the defaults for runs saved before they existed, then ``override``):
    ``warnings``, each signal with its step (None if none fired), and ``first_warning``, the
    earliest step. ConfigError for a bad setting."""
    fired = replay(metrics, MonitorConfig(**{**config.get("monitor", {}), **(override or {})}))
    text = ", ".join(f"{warning.signal} at step {warning.step}" for warning in fired) or None
    return {"warnings": text, "first_warning": min((w.step for w in fired), default=None)}


def support_label(config: dict[str, Any]) -> str:
    """Where a run's divergence is taken, as one table key: ``sampled``, ``topk K=<top_k>`` or
    ``full`` (runs saved before ``estimator.support`` existed are ``sampled``)."""
    estimator = config.get("estimator", {})
    support = estimator.get("support", "sampled")
    return f"topk K={estimator['top_k']}" if support == "topk" else support


def outcome(summary: dict[str, Any], metrics: list[dict[str, Any]], config: dict[str, Any]) -> dict[str, Any]:
    """Collapse and accuracy change of a finished run, recomputed from its metrics (runs written
    before ``summary.json`` recorded them are judged the same way)."""
    before, after = summary["initial_eval"]["greedy_acc"], summary["final_eval"]["greedy_acc"]
    n = summary.get("eval_problems") or config.get("eval", {}).get("problems")
    reason = collapse_reason(metrics, config["sampling"]["max_new_tokens"], before, after)
    change = accuracy_change(before, after, n) if n and reason is None else None
    onset = collapse_step(metrics, config["sampling"]["max_new_tokens"], before) if reason else None
    return {
        "collapsed": reason is not None,
        "collapse": reason,
        "collapse_step": onset,
        "truncation": truncation(metrics, config["sampling"]["max_new_tokens"]),
        "below_start": change is not None and change.below_start,
        "change": None if change is None else str(change),
    }


def mean_ci(values: pd.Series) -> tuple[float, float, int]:
    """Mean, half-width of the 95% Student-t interval (nan for one value), and the count."""
    values = values.dropna()
    n = len(values)
    if n == 0:
        return math.nan, math.nan, 0
    if n == 1:
        return float(values.iloc[0]), math.nan, 1
    half = (T_975[n - 2] if n - 1 <= len(T_975) else 1.96) * values.std(ddof=1) / math.sqrt(n)
    return float(values.mean()), float(half), n


def format_cell(mean: float, half: float, n: int, percent: bool = True, flags: str = "") -> str:
    if n == 0:
        return "—"
    scale = 100 if percent else 1
    text = f"{scale * mean:.1f}" if math.isnan(half) else f"{scale * mean:.1f} ± {scale * half:.1f}"
    return f"{text}{flags}"


def ablation_table(
    runs: pd.DataFrame,
    rows: str = "divergence",
    cols: str = "estimator",
    metric: str = "greedy_acc",
    step_time: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(display table of strings, numeric table of means) over complete runs.

    Columns: for each value of ``cols``, the final and the best ``metric`` (mean ± 95% CI over
    seeds; ``†k``: k of the cell's runs collapsed, ``↓k``: k others ended below their initial
    student beyond eval noise, ``⚠k``: k of them had an early warning), with ``step_time`` the
    mean seconds per training step (rollout, teacher and update, evals excluded; ``summary.json``'s
    ``mean_step_time_s``); when ``cols`` is the estimator, the paired OPD+ minus OPD difference of
    the final metric, matched by seed.
    """
    row_key, col_key = config_key(rows), config_key(cols)
    complete = runs[runs["status"] == "complete"]
    display: dict[tuple[str, str], dict[str, str]] = {}
    numeric: dict[tuple[str, str], dict[str, float]] = {}
    for (row_value, col_value), group in complete.groupby([row_key, col_key], sort=False):
        for stage in ("final", "best"):
            mean, half, n = mean_ci(group[f"{stage}/{metric}"])
            collapsed, below = int(group["collapsed"].sum()), int(group["below_start"].sum())
            warned = int(group["first_warning"].notna().sum())
            flags = (f" †{collapsed}" if collapsed else "") + (f" ↓{below}" if below else "")
            flags += f" ⚠{warned}" if warned else ""
            flags = flags if stage == "final" else ""
            display.setdefault((str(col_value), stage), {})[str(row_value)] = format_cell(mean, half, n, flags=flags)
            numeric.setdefault((str(col_value), stage), {})[str(row_value)] = mean
        if step_time:
            seconds = group["step_time_s"].mean()
            display.setdefault((str(col_value), "s/step"), {})[str(row_value)] = f"{seconds:.2f}"
    if col_key == "estimator.name":
        for row_value, group in complete.groupby(row_key, sort=False):
            by_seed = group.pivot_table(index="seed", columns=col_key, values=f"final/{metric}")
            if all(e in by_seed for e in ESTIMATOR_PAIR):
                diff = (by_seed[ESTIMATOR_PAIR[1]] - by_seed[ESTIMATOR_PAIR[0]]).dropna()
                mean, half, n = mean_ci(diff)
                display.setdefault(("OPD+ − OPD", "final"), {})[str(row_value)] = format_cell(mean, half, n)
    table = pd.DataFrame(display)
    table.index.name = rows
    return table, pd.DataFrame(numeric)


def mark_best(table: pd.DataFrame, numeric: pd.DataFrame, bold: tuple[str, str]) -> pd.DataFrame:
    """Wrap the cell with the highest mean final metric in ``bold``."""
    finals = [(row, col) for col in numeric.columns if col[1] == "final" for row in numeric.index]
    finals = [cell for cell in finals if not math.isnan(numeric.at[cell])]
    if not finals:
        return table
    row, col = max(finals, key=lambda cell: numeric.at[cell])
    marked = table.copy()
    marked.at[row, col] = f"{bold[0]}{marked.at[row, col]}{bold[1]}"
    return marked


def render(table: pd.DataFrame, fmt: str) -> str:
    flat = table.copy()
    flat.columns = [f"{col} ({stage})" for col, stage in flat.columns]
    if fmt == "csv":
        return flat.to_csv()
    if fmt == "latex":
        return flat.to_latex(escape=False)
    return flat.to_markdown()


RUN_COLUMNS = (
    *("run_dir", "status", "steps_done", "collapsed", "collapse", "truncation", "below_start", "change", "seed"),
    *("support", "step_time_s", "last_nonfinite", "warnings", "first_warning", "collapse_step"),
)
# what does not change a run's trajectory: where it resumes and runs, what it watches and probes
NOT_A_SETTING = (
    "trainer.resume", "runtime.threads", "runtime.device", "trainer.stop_on_warning", "trainer.probe_every", *RENAMED,
)  # fmt: skip


def pooled_keys(runs: pd.DataFrame, shown: list[str]) -> list[str]:
    """Config keys, besides the shown ones and the seed, on which runs pooled in one cell (the
    same values of the ``shown`` keys) differ."""
    config_columns = [
        c
        for c in runs
        if c not in RUN_COLUMNS + NOT_A_SETTING and "/" not in c and c not in shown and not c.startswith("monitor.")
    ]
    differ = runs.astype(str).groupby(shown, sort=False)[config_columns].nunique().max() > 1
    return [c for c in config_columns if differ[c]]


def stops_on_warning(run: pd.Series) -> bool:
    """Whether the run was set to stop at its first early warning (False for runs saved before
    ``trainer.stop_on_warning`` existed)."""
    value = run.get("trainer.stop_on_warning")
    return bool(value) if pd.notna(value) else False


def status_report(runs: pd.DataFrame) -> str:
    lines = []
    for _, run in runs[runs["status"] != "complete"].iterrows():
        total = run.get("trainer.steps", "?")
        line = f"- incomplete (crashed or running): {run['run_dir']} at step {run['steps_done']} of {total}"
        if run["last_nonfinite"]:  # the trainer stops after trainer.max_bad_steps of these
            line += f", whose last step was skipped for non-finite {run['last_nonfinite']}"
        elif stops_on_warning(run) and run["first_warning"] == run["steps_done"]:
            line = f"- stopped at its early warning (trainer.stop_on_warning): {run['run_dir']} at step "
            line += f"{run['steps_done']} of {total} ({run['warnings']}); resume with trainer.resume=<run dir>"
        lines.append(line)
    for _, run in runs[runs["collapsed"]].iterrows():
        lines.append(f"- collapsed: {run['run_dir']} ({run['collapse']})")
    for _, run in runs[runs["truncation"].notna() & ~runs["collapsed"].astype(bool)].iterrows():
        lines.append(f"- truncated, not collapsed: {run['run_dir']} ({run['truncation']})")
    for _, run in runs[runs["below_start"]].iterrows():
        below = "below the initial student beyond eval noise"
        lines.append(f"- {below}: {run['run_dir']} (greedy accuracy {run['change']})")
    for _, run in runs[runs["first_warning"].notna()].iterrows():
        onset, lead = run.get("collapse_step"), ""
        if onset is not None and not pd.isna(onset):
            steps = int(onset - run["first_warning"])
            after = f"{steps} step{'s' if steps > 1 else ''} after the first warning"
            lead = f"; its collapse began at step {onset:.0f}, " + (
                after if steps > 0 else "at the step of the first warning" if steps == 0 else "before the first warning"
            )
        lines.append(f"- early warnings: {run['run_dir']} ({run['warnings']}{lead})")
    return "\n".join(lines)


def load_with_keys(paths: list[Path], keys: list[str], prog: str) -> pd.DataFrame | None:
    """``load_runs``, or None after saying why: no run directory, or a key no config has."""
    try:
        runs = load_runs(paths)
    except FileNotFoundError as error:
        print(f"{prog}: {error}")
        return None
    missing = [key for key in keys if config_key(key) not in runs]
    if missing:
        examples = "divergence, estimator, seed, support, estimator.gamma, trainer.lr"
        print(f"{prog}: no config key {missing[0]!r}; e.g. {examples}")
        return None
    return runs


def table_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="opdx table", description="Ablation table of opdx runs")
    parser.add_argument("paths", nargs="+", type=Path, help="run or multirun directories")
    parser.add_argument(
        "--rows",
        default="divergence",
        help="config key of the rows, or support: sampled, topk K=<k>, full (default: divergence)",
    )
    parser.add_argument("--cols", default="estimator", help="config key of the columns (default: estimator)")
    parser.add_argument("--facet", default="benchmark", help="one table per value of this key")
    parser.add_argument("--metric", default="greedy_acc", help="eval metric: greedy_acc, avg@4, ...")
    parser.add_argument("--format", default="markdown", choices=("markdown", "csv", "latex"))
    parser.add_argument(
        "--step-time", action="store_true", help="add each cell's mean seconds per training step (evals excluded)"
    )
    args = parser.parse_args(argv)
    runs = load_with_keys(args.paths, [args.rows, args.cols, args.facet], "opdx table")
    if runs is None:
        return 2
    if not (runs["status"] == "complete").any():
        print(f"opdx table: none of the {len(runs)} runs is complete\n\n{status_report(runs)}")
        return 1
    if f"final/{args.metric}" not in runs:
        logged = sorted(c.removeprefix("final/") for c in runs if c.startswith("final/") and c != "final/step")
        print(f"opdx table: no eval metric {args.metric!r} in these runs; logged: {', '.join(logged) or 'none'}")
        return 2
    bold = {"markdown": ("**", "**"), "latex": (r"\textbf{", "}"), "csv": ("", " (best)")}[args.format]
    for facet_value, facet_runs in runs.groupby(config_key(args.facet), sort=False):
        table, numeric = ablation_table(facet_runs, args.rows, args.cols, args.metric, args.step_time)
        if args.format == "markdown":
            n_complete = int((facet_runs["status"] == "complete").sum())
            print(
                f"\n{args.facet} = {facet_value}: {args.metric}, % (mean ± 95% CI over seeds; "
                f"{n_complete} of {len(facet_runs)} runs complete; †k: k runs collapsed, ↓k: k runs below "
                "their initial student beyond eval noise, ⚠k: k runs with an early warning; see the list below)\n"
            )
            pooled = pooled_keys(facet_runs, [config_key(k) for k in (args.rows, args.cols, args.facet)])
            if pooled:
                print(f"warning: cells pool runs that differ in {', '.join(pooled)}\n")
        print(render(mark_best(table, numeric, bold), args.format))
    report = status_report(runs)
    if report:
        print("\n" + report)
    return 0


PLOT_PANELS = (
    ("eval/{benchmark}/greedy_acc", "greedy accuracy (held-out)", 1),
    ("div/reverse_kl", "sampled KL(p‖q) per token, nats", 25),
    ("rollout/len_mean", "response length, tokens", 25),
)


def plot_panels(runs: pd.DataFrame) -> list[tuple[str, str, int]]:
    """``PLOT_PANELS``, and for runs of mixtures the greedy accuracy of each component (which runs
    on that benchmark alone share: both log ``eval/<name>/greedy_acc``)."""
    prefix, suffix = "benchmark.components.", ".weight"
    keys = [key for key in runs if key.startswith(prefix) and key.endswith(suffix)]
    components = [key.removeprefix(prefix).removesuffix(suffix) for key in keys]
    extra = [(f"eval/{name}/greedy_acc", f"{name}: greedy accuracy (held-out)", 1) for name in components]
    return [*PLOT_PANELS, *extra]


def line_label(run: pd.Series, line_keys: list[str]) -> str:
    """The plot line a run belongs to: its values of ``line_keys``, joined by " / "."""
    return " / ".join(str(run[config_key(k)]) for k in line_keys)


def learning_curves(runs: pd.DataFrame, line_keys: list[str]) -> dict[str, pd.DataFrame]:
    """Per panel metric: a long frame of (config label, seed, step, value), train metrics smoothed
    by a rolling mean over ``window`` steps."""
    curves: dict[str, list[pd.DataFrame]] = {}
    for _, run in runs.iterrows():
        records = pd.DataFrame(read_metrics(Path(run["run_dir"])))
        if records.empty:
            continue
        label = line_label(run, line_keys)
        for template, _, window in plot_panels(runs):
            key = template.format(benchmark=run.get("benchmark.name", ""))
            if key not in records:
                continue
            series = records[["step", key]].dropna()
            values = series[key].rolling(window, min_periods=1).mean()
            frame = pd.DataFrame({"label": label, "seed": run.get("seed", 0), "step": series["step"], "value": values})
            curves.setdefault(template, []).append(frame)
    return {key: pd.concat(frames, ignore_index=True) for key, frames in curves.items()}


def run_events(runs: pd.DataFrame, line_keys: list[str]) -> dict[str, dict[str, list[float]]]:
    """Per line label, the steps of its runs' first early warnings and collapse onsets (the ones
    that have them)."""
    events: dict[str, dict[str, list[float]]] = {}
    for _, run in runs.iterrows():
        label = line_label(run, line_keys)
        for key in ("first_warning", "collapse_step"):
            if pd.notna(run.get(key)):
                events.setdefault(label, {}).setdefault(key, []).append(float(run[key]))
    return events


def plot_runs(runs: pd.DataFrame, out_dir: Path, line_keys: list[str]) -> list[Path]:
    """One figure, a panel per metric, a line per config: mean over seeds with a min-max band, and
    in every panel a mark at each run's first early warning (top) and collapse onset (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves, panels = learning_curves(runs, line_keys), plot_panels(runs)
    events = run_events(runs, line_keys)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), constrained_layout=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    labels = sorted({label for frame in curves.values() for label in frame["label"]})
    for ax, (template, title, window) in zip(axes, panels, strict=True):
        frame = curves.get(template)
        ax.set_title(title + (f" (rolling mean, {window} steps)" if window > 1 else ""), fontsize=10)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        if frame is None:
            ax.text(0.5, 0.5, "not logged", ha="center", transform=ax.transAxes)
            continue
        for i, label in enumerate(labels):
            per_step = frame[frame["label"] == label].groupby("step")["value"]
            if per_step.ngroups == 0:
                continue
            mean, low, high = per_step.mean(), per_step.min(), per_step.max()
            color = colors[i % len(colors)]
            seeds = frame[frame["label"] == label]["seed"].nunique()
            ax.plot(mean.index, mean.values, color=color, label=f"{label} (n={seeds})", lw=1.6)
            ax.fill_between(mean.index, low.values, high.values, color=color, alpha=0.18, lw=0)
            marks = events.get(label, {})
            for key, marker, y in (("first_warning", "v", 0.98), ("collapse_step", "x", 0.02)):
                steps = marks.get(key, [])
                ax.scatter(steps, [y] * len(steps), marker=marker, color=color, transform=ax.get_xaxis_transform())
    axes[0].legend(fontsize=8, title=" / ".join(line_keys), title_fontsize=8)
    if events:
        fig.suptitle("▼ a run's first early warning (opdx.monitor)   ✕ the step a run's collapse began", fontsize=9)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "learning_curves.png", out_dir / "learning_curves.svg"]
    for path in paths:
        fig.savefig(path, dpi=130)
    plt.close(fig)
    return paths


def plot_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="opdx plot", description="Learning curves of opdx runs")
    parser.add_argument("paths", nargs="+", type=Path, help="run or multirun directories")
    parser.add_argument("--lines", default="divergence,estimator", help="config keys that make one line")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the first path)")
    args = parser.parse_args(argv)
    line_keys = args.lines.split(",")
    runs = load_with_keys(args.paths, line_keys, "opdx plot")
    if runs is None:
        return 2
    for path in plot_runs(runs, args.out or args.paths[0], line_keys):
        print(f"written {path}")
    return 0
