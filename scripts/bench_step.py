"""Time one OPD step of a model config, split into rollout / teacher / update.

    python scripts/bench_step.py                      # tiny default, 64 prompts x 4 samples
    python scripts/bench_step.py --prompts 32 --samples 4 --steps 20 --threads 1

Prints mean seconds per phase over the timed steps (after warm-up), sampled tokens per
second and peak resident memory. No training outcome is measured here.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from opdx.benchmarks import get_benchmark
from opdx.config import EstimatorConfig, ModelConfig, RunConfig
from opdx.divergences import get_divergence
from opdx.models import asset_path, load_pair
from opdx.objective import LossOptions
from opdx.rollout import PLAIN_SAMPLING, sample
from opdx.trainer import distillation_loss, prompts_for_step, score_with_teacher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--divergence", default="reverse_kl")
    parser.add_argument("--estimator", default="unbiased")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model_cfg = ModelConfig(name="tiny", teacher=asset_path("tiny/teacher"), student=asset_path("tiny/student"))
    cfg = RunConfig(model=model_cfg, estimator=EstimatorConfig(name=args.estimator))
    student, teacher, tokenizer = load_pair(model_cfg, torch.device("cpu"))
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    benchmark = get_benchmark("arith")
    div = get_divergence(args.divergence)
    times: dict[str, list[float]] = {"rollout": [], "teacher": [], "update": []}
    tokens = []
    for step in range(args.warmup + args.steps):
        prompts = [p.prompt for p in prompts_for_step(benchmark, 0, step, args.prompts)]
        t0 = time.perf_counter()
        rollout = sample(student, tokenizer, prompts, args.samples, args.max_new_tokens)
        t1 = time.perf_counter()
        with torch.no_grad():
            scores = score_with_teacher(teacher, rollout, args.estimator, 128)
        t2 = time.perf_counter()
        loss = distillation_loss(student, rollout, scores, div, cfg, PLAIN_SAMPLING, LossOptions())[0]
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        t3 = time.perf_counter()
        if step >= args.warmup:
            for key, seconds in zip(times, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                times[key].append(seconds)
            tokens.append(int(rollout.response_mask_B_T.sum()))
    means = {k: statistics.mean(v) for k, v in times.items()}
    total = sum(means.values())
    setting = f"{args.prompts} prompts x {args.samples} samples, {args.divergence}/{args.estimator}"
    print(f"{setting}, threads {torch.get_num_threads()}")
    for key, value in means.items():
        print(f"  {key:<8} {value:.3f} s  ({100 * value / total:.0f}%)")
    print(f"  step     {total:.3f} s, {statistics.mean(tokens) / total:.0f} sampled tokens/s")
    print(f"  peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
