"""Synchronous against asynchronous rollouts (``rollout=server``, ``trainer.max_staleness``): sampled tokens/s.

    python scripts/bench_async.py                                   # the default job on model=tiny_hd32, 30 steps
    python scripts/bench_async.py --steps 10 --lags 1 2 -- model=smollm2_135m benchmark=gsm8k

Runs ``opdx train rollout=server`` once per setting, one after another, on this machine's cores:
synchronous with the trainer and the server at 2 threads each (they take turns, so each can use
both cores) and at 1 thread each, then ``trainer.max_staleness=k`` for each ``--lags`` k with one
thread each (the server samples on one core while the trainer updates on the other), all with
``estimator.rollout_correction=per_decision``. Each run evaluates only at its end, on ``--eval``
problems. From each run's ``metrics.jsonl``, over its steps after the first ``--warmup``: sampled
response tokens per second of step time (``time/rollout``, the wait for the batch, plus
``time/teacher`` and ``time/update``, which includes the weight push). Prints a table, then
``speedup <x> at max_staleness <k>``: the best asynchronous run against the best synchronous one.
Extra arguments after ``--`` go to every run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tabulate import tabulate


def run(name: str, threads: int, overrides: list[str], out: Path) -> dict[str, float]:
    """One ``opdx train`` run; its steps' throughput figures (after the warm-up)."""
    run_dir = out / name
    command = [
        sys.executable, "-m", "opdx", "train", "rollout=server", f"runtime.threads={threads}",
        f"rollout.threads={threads}", *overrides, f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    print(f"{name}: {' '.join(command[3:])}", flush=True)
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def figures(records: list[dict[str, float]], rows: int, warmup: int) -> dict[str, float]:
    steps = [r for r in records if "rollout/len_mean" in r][warmup:]
    seconds = sum(r["time/rollout"] + r["time/teacher"] + r["time/update"] for r in steps)
    tokens = sum(r["rollout/len_mean"] * rows for r in steps)
    wait = sum(r["time/rollout"] for r in steps)
    staleness = max(r.get("rollout/staleness_max", 0.0) for r in steps)
    return {"tokens/s": tokens / seconds, "s/step": seconds / len(steps), "wait share": wait / seconds,
            "staleness max": staleness}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the figures")
    parser.add_argument("--lags", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--eval", type=int, default=16, help="eval problems at the run's end")
    parser.add_argument("--prompts", type=int, default=64, help="trainer.prompts_per_step")
    parser.add_argument("--samples", type=int, default=4, help="trainer.samples_per_prompt")
    parser.add_argument("overrides", nargs="*", help="more opdx train overrides (default: model=tiny_hd32)")
    args = parser.parse_args()
    overrides = [
        "model=tiny_hd32", f"trainer.steps={args.steps}", f"trainer.eval_every={args.steps}",
        f"trainer.checkpoint_every={args.steps}", f"eval.problems={args.eval}", "eval.n=1",
        f"trainer.prompts_per_step={args.prompts}", f"trainer.samples_per_prompt={args.samples}",
        "estimator.rollout_correction=per_decision", *args.overrides,
    ]  # fmt: skip
    rows = args.prompts * args.samples
    lagged = [(f"max_staleness {k}", 1, [f"trainer.max_staleness={k}"]) for k in args.lags]
    settings = [("sync", 2, []), ("sync", 1, []), *lagged]
    table = []
    with tempfile.TemporaryDirectory(prefix="opdx-bench-async-") as out:
        for name, threads, extra in settings:
            records = run(f"{name.replace(' ', '')}_t{threads}", threads, [*overrides, *extra], Path(out))
            table.append({"setting": name, "threads each": threads, **figures(records, rows, args.warmup)})
    print(tabulate(table, headers="keys", floatfmt=".3g", tablefmt="github"))
    best_sync = max(row["tokens/s"] for row in table if row["setting"] == "sync")
    best = max((row for row in table if row["setting"] != "sync"), key=lambda row: row["tokens/s"])
    print(f"speedup {best['tokens/s'] / best_sync:.2f} at {best['setting']}")


if __name__ == "__main__":
    main()
