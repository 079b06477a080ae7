"""Time OPD steps of a run config through the trainer's own ``train_step``, split into rollout /
teacher / update.

    python scripts/bench_step.py                                  # the default job's config
    python scripts/bench_step.py --steps 20 --threads 1 trainer.prompts_per_step=32 divergence=reverse_kl
    python scripts/bench_step.py model=smollm2_135m benchmark=bfcl trainer.samples_per_prompt=1

Any `opdx train` override works after the flags. Prints the mean seconds per phase over the
timed steps (after warm-up), sampled tokens per second and peak resident memory. No training
outcome is measured here.
"""

from __future__ import annotations

import argparse
import resource
import statistics

import torch
from hydra import compose, initialize_config_dir

from opdx.config import CONF_DIR, register_resolvers, register_schema
from opdx.run import start, validate
from opdx.trainer import build_learner, prompts_for_step, train_step

PHASES = ("rollout", "teacher", "update")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("overrides", nargs="*", help="opdx train overrides, e.g. trainer.prompts_per_step=32")
    args = parser.parse_args()
    register_schema()
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        threads = [f"trainer.threads={args.threads}"] if args.threads else []
        run = validate(compose(config_name="config", overrides=[*args.overrides, *threads]))
    learner = build_learner(run, start(run, train=True))
    t = run.config.trainer
    times: dict[str, list[float]] = {phase: [] for phase in PHASES}
    tokens = []
    for step in range(args.warmup + args.steps):
        metrics = train_step(learner, prompts_for_step(run.benchmark, run.config.seed, step, t.prompts_per_step))
        if step >= args.warmup:
            for phase in PHASES:
                times[phase].append(metrics[f"time/{phase}"])
            tokens.append(metrics["perf/tokens_per_s"] * sum(metrics[f"time/{phase}"] for phase in PHASES))
    means = {phase: statistics.mean(values) for phase, values in times.items()}
    total = sum(means.values())
    setting = (
        f"{run.config.model.name}: {t.prompts_per_step} prompts x {t.samples_per_prompt} samples, "
        f"{t.max_new_tokens} new tokens, {run.divergence.name}/{run.estimator.name}"
    )
    print(f"{setting}, threads {torch.get_num_threads()}")
    for phase, value in means.items():
        print(f"  {phase:<8} {value:.3f} s  ({100 * value / total:.0f}%)")
    print(f"  step     {total:.3f} s, {statistics.mean(tokens) / total:.0f} sampled tokens/s")
    print(f"  peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
