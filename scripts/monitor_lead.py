"""How early the early warnings (opdx.monitor) come, over finished runs: per run its collapse (and
the step it began, opdx.outcome.collapse_step), its first warning and the lead in steps; then
the warnings on collapsed runs and the false alarms on the others.

    python scripts/monitor_lead.py multirun/table2                      # the runs' own monitor settings
    python scripts/monitor_lead.py multirun/table2 --set window=5 --set reverse_kl=1.5   # other rules

The rules are replayed over each run's metrics.jsonl, so settings can be tried on a sweep that has
already run (``--set`` takes any field of opdx.config.MonitorConfig).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from opdx.config import ConfigError, MonitorConfig, upgrade
from opdx.metrics import read_metrics
from opdx.tables import early_warnings, load_runs


def settings(pairs: list[str]) -> dict[str, float | int | None]:
    """``key=value`` pairs of MonitorConfig fields (``null`` turns a signal off)."""
    known = {f.name for f in fields(MonitorConfig)}
    parsed = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in known:
            sys.exit(f"monitor_lead.py: no monitor setting {key!r}; valid: {', '.join(sorted(known))}")
        try:
            parsed[key] = None if value == "null" else (int(value) if key == "window" else float(value))
        except ValueError:
            sys.exit(f"monitor_lead.py: --set {pair}: {value!r} is not a number or null")
    return parsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run or multirun directories")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a monitor setting")
    args = parser.parse_args()
    override = settings(args.set)
    runs = load_runs(args.paths)
    complete = runs[runs["status"] == "complete"]
    if complete.empty:
        print(f"monitor_lead.py: none of the {len(runs)} runs is complete")
        return 1
    rows = []
    for _, run in complete.iterrows():
        run_dir = Path(run["run_dir"])
        config = upgrade(OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "config.yaml")), warn=False)
        try:
            warned = early_warnings(read_metrics(run_dir), config, override)
        except ConfigError as error:
            sys.exit(f"monitor_lead.py: {error}")
        onset, first = run.get("collapse_step"), warned["first_warning"]
        rows.append({
            "run": f"{run['divergence.name']} / {run['estimator.name']} / s{run['seed']}",
            "collapsed": bool(run["collapsed"]),
            "collapse began": onset,
            "first warning": first,
            "lead, steps": None if pd.isna(onset) or first is None else onset - first,
            "warnings": warned["warnings"] or "-",
        })  # fmt: skip
    table = pd.DataFrame(rows)
    print(table.to_markdown(index=False, floatfmt=".0f"))
    collapsed, healthy = table[table["collapsed"]], table[~table["collapsed"]]
    warned_first = int((collapsed["lead, steps"] > 0).sum())
    print(f"\ncollapsed runs: {len(collapsed)}, warned before the collapse began: {warned_first}")
    false_alarms = int(healthy["first warning"].notna().sum())
    print(f"runs that did not collapse: {len(healthy)}, with a warning (false alarms): {false_alarms}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
