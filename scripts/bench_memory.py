"""The memory planner against measured peaks: each phase's planned peak (``opdx plan``) beside the
peak the second step of ``opdx train`` reached (AdamW makes its state in the first), for several pairs and batch shapes.

    python scripts/bench_memory.py                     # tiny and SmolLM2 pairs, several shapes (CPU, minutes)
    python scripts/bench_memory.py --shapes tiny --limit 1   # one case (tests/test_scripts.py)

Each case is two steps of ``opdx train`` in a subprocess (one thread) with
``runtime.track_memory=true``: the ``memory/<phase>_gib`` metrics, the peak bytes of live tensor
storages in each phase (``opdx.memory_tracking.LiveTensorBytes`` on a CPU; the CUDA allocator's
peak on a GPU). The plan is ``opdx.cli.plan_of`` of the same overrides. ``eval`` is the student's
eval after the step. The ratio is planned / measured: above 1 the plan is on the safe side.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from opdx.cli import plan_of
from opdx.metrics import read_metrics
from opdx.plan import GIB

COMMON = ["trainer.steps=2", "runtime.track_memory=true", "runtime.threads=1", "logger=jsonl"]
SHAPES = {
    "tiny": [
        ["model=tiny", "trainer.prompts_per_step=64", "trainer.micro_batch_size=32", "eval.problems=32"],
        ["model=tiny", "trainer.prompts_per_step=16", "eval.problems=16"],
        ["model=tiny", "trainer.prompts_per_step=64", "sampling.max_new_tokens=40", "eval.problems=64"],
    ],
    "smollm2": [
        [
            "model=smollm2_135m",
            "benchmark=bfcl",
            "trainer.prompts_per_step=2",
            "sampling.max_new_tokens=32",
            "eval.problems=4",
            "trainer.gradient_checkpointing=false",
        ],
        [
            "model=smollm2_135m",
            "benchmark=bfcl",
            "trainer.prompts_per_step=4",
            "sampling.max_new_tokens=32",
            "eval.problems=4",
        ],
    ],  # fmt: skip
}


def measured(overrides: list[str], run_dir: Path) -> dict[str, float]:
    """Each phase's measured peak in bytes, from one step of ``opdx train``."""
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "opdx", "train", *overrides, *COMMON, f"hydra.run.dir={run_dir}"]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode:
        raise SystemExit(f"{' '.join(overrides)} failed:\n{result.stderr[-3000:]}")
    steps = read_metrics(run_dir)
    last = steps[-1]
    return {key[len("memory/") : -len("_gib")]: value * GIB for key, value in last.items() if key.startswith("memory/")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--limit", type=int, default=None, help="the first N cases of each set")
    args = parser.parse_args()
    print(f"{'case':<72} {'phase':<8} {'planned':>10} {'measured':>10} {'ratio':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.shapes:
            for i, overrides in enumerate(SHAPES[name][: args.limit]):
                plan = plan_of([*overrides, *COMMON])
                planned = {phase.name: phase.total for phase in plan.phases}
                peaks = measured(overrides, Path(tmp) / f"{name}{i}")
                case = " ".join(o for o in overrides if not o.startswith("eval."))
                for phase, peak in peaks.items():
                    ratio = planned[phase] / peak if peak else float("nan")
                    figures = f"{planned[phase] / 2**20:8.1f} MiB {peak / 2**20:6.1f} MiB {ratio:6.2f}"
                    print(f"{case:<72} {phase:<8} {figures}", flush=True)


if __name__ == "__main__":
    main()
