"""Kill a training run at random moments, resume it, and check it ends exactly as an uninterrupted run.

    python scripts/kill_resume.py                 # 20 kills: prints "N/20 identical"
    python scripts/kill_resume.py --kills 3       # what CI runs (tests/test_kill_resume.py)
    python scripts/kill_resume.py --kills 3 model=tiny_hd32 rollout=server trainer.max_staleness=2
                                                  # an async run: batches in flight when killed

A small tiny-pair job (12 steps of 8 sequences, a checkpoint after every step, an eval every 4
steps) runs once uninterrupted. Then each trial starts the same job afresh and SIGKILLs it at a
moment of one of three kinds, in turn: while a checkpoint is being written (the instant its
temporary file appears), during an eval (a random delay after the eval's progress bar shows), or
at a uniformly random time. The run is then resumed with ``trainer.resume=<dir>`` (started over
when it was killed before its first checkpoint) until it finishes. A trial is identical when
every step is in ``metrics.jsonl`` exactly once with the uninterrupted run's values (wall times
aside), the summary's evals and the sample texts are equal, and the final student's weights are
equal bit for bit.
Exits non-zero unless every trial is identical. Overrides after the options change the job (all
its runs); with ``rollout=server``, ``rollout.url=<a server>`` lets every run share one server
instead of starting its own.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
JOB = [
    "trainer.steps=12",
    "trainer.prompts_per_step=4",
    "trainer.samples_per_prompt=2",
    "trainer.eval_every=4",
    "trainer.checkpoint_every=1",
    "eval.problems=16",
    "eval.n=2",
    "runtime.threads=1",
    "seed=5",
]
KINDS = ("checkpoint write", "eval", "random moment")


def start(run_dir: Path, resume: bool, log: Path, job: list[str]) -> subprocess.Popen:
    args = [f"trainer.resume={run_dir}"] if resume else [*job, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("a") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "opdx", "train", *args], cwd=REPO, stdout=out, stderr=out, env=env
        )


def finish(run_dir: Path, log: Path, job: list[str]) -> None:
    """Resume (or start over, if no checkpoint was written) until the run has its summary."""
    while not (run_dir / "summary.json").exists():
        resume = any((run_dir / "checkpoints").glob("*.sha256"))
        if not resume and run_dir.exists():
            shutil.rmtree(run_dir)
        if start(run_dir, resume, log, job).wait() != 0:
            raise RuntimeError(f"the resumed run failed; see {log}")


def kill_at(kind: str, run_dir: Path, log: Path, job: list[str], rng: random.Random, duration: float) -> str:
    """Start the job and SIGKILL it at a moment of ``kind``; what was hit."""
    process = start(run_dir, resume=False, log=log, job=job)
    began, hit = time.monotonic(), f"at {kind}"
    if kind == "random moment":
        moment = rng.uniform(0.0, duration)
        while process.poll() is None and time.monotonic() - began < moment:
            time.sleep(0.005)
        hit = f"at {time.monotonic() - began:.2f} s"
    elif kind == "checkpoint write":
        target = rng.randint(1, 12)  # the checkpoint of this step or a later one
        while process.poll() is None:
            if (run_dir / "checkpoints").exists():
                names = [p.name for p in os.scandir(run_dir / "checkpoints") if p.name.endswith(".tmp")]
                writing = [name for name in names if int(name.split("_")[1].split(".")[0]) >= target]
                if writing:
                    hit = f"while writing {writing[0]}"
                    break
            time.sleep(0.0005)
    else:
        evals, delay = rng.randint(1, 5), rng.uniform(0.0, 0.3)  # the teacher's, the student's, steps 4, 8, 12
        while process.poll() is None and log.read_text().count("eval arith:   0%") < evals:
            time.sleep(0.002)
        time.sleep(delay)
        hit = f"{delay:.2f} s into eval {evals} of 5"
    if process.poll() is not None:
        return f"{hit}: the run had finished first"
    process.send_signal(signal.SIGKILL)
    process.wait()
    return hit


def outcome(run_dir: Path) -> tuple[list[dict], dict, dict, list[dict]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    records = [{k: v for k, v in r.items() if not k.startswith(("time/", "perf/"))} for r in records]
    summary = json.loads((run_dir / "summary.json").read_text())
    evals = {k: summary[k] for k in ("teacher_eval", "initial_eval", "final_eval", "best_eval")}
    path = run_dir / "samples.jsonl"  # none with logger.samples=0
    samples = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return records, evals, load_file(run_dir / "student" / "model.safetensors"), samples


def same(a: tuple, b: tuple) -> bool:
    (records_a, evals_a, weights_a, samples_a), (records_b, evals_b, weights_b, samples_b) = a, b
    steps_once = [r["step"] for r in records_a] == list(range(len(records_a)))
    equal_weights = weights_a.keys() == weights_b.keys() and all(weights_a[k].equal(weights_b[k]) for k in weights_a)
    return steps_once and records_a == records_b and evals_a == evals_b and equal_weights and samples_a == samples_b


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("overrides", nargs="*", help="opdx train overrides added to the job")
    args = parser.parse_args()
    job = [*JOB, *args.overrides]
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="opdx_kill_resume_"))
    began = time.monotonic()
    if start(work / "whole", resume=False, log=work / "whole.log", job=job).wait() != 0:
        print(f"the uninterrupted run failed; see {work / 'whole.log'}")
        return 1
    duration = time.monotonic() - began
    reference = outcome(work / "whole")
    print(f"uninterrupted run: {len(reference[0]) - 1} steps in {duration:.1f} s ({work / 'whole'})")
    identical = 0
    for trial in range(args.kills):
        kind = KINDS[trial % len(KINDS)]
        run_dir, log = work / f"trial_{trial:02d}", work / f"trial_{trial:02d}.log"
        hit = kill_at(kind, run_dir, log, job, rng, duration)
        finish(run_dir, log, job)
        ok = same(outcome(run_dir), reference)
        identical += ok
        print(f"trial {trial + 1:2d}: killed {hit}; resumed: {'identical' if ok else 'DIFFERENT'}")
    print(f"{identical}/{args.kills} identical")
    if identical == args.kills:
        shutil.rmtree(work)
    return 0 if identical == args.kills else 1


if __name__ == "__main__":
    raise SystemExit(main())
