"""Supervised fine-tuning baseline for the tiny student, to report beside OPD.

    python scripts/sft_baseline.py                 # 200 SFT steps on worked solutions
    python scripts/sft_baseline.py --steps 1000

Continues the shipped student's SFT on the arith train split's worked solutions (the data the
teacher learned from: SFT sees correct solutions, OPD only the teacher's token scores) and
prints greedy accuracy on the same 1000 held-out problems the default `opdx train` evaluates.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opdx.backends.hf import HFModel
from opdx.benchmarks import get_benchmark
from opdx.config import asset_path
from opdx.evaluation import evaluate
from opdx.pairs.tiny import STUDENT, supervised_finetune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    benchmark = get_benchmark("arith")
    tokenizer = AutoTokenizer.from_pretrained(asset_path("tiny/student"))
    student = AutoModelForCausalLM.from_pretrained(asset_path("tiny/student"))
    before = evaluate(HFModel(student, tokenizer), tokenizer, benchmark, benchmark.eval)["greedy_acc"]
    spec = dataclasses.replace(STUDENT, sft_steps=args.steps, sft_lr=args.lr, sft_batch=args.batch)
    supervised_finetune(student, tokenizer, benchmark, spec, seed=args.seed + 100, desc="SFT baseline")
    after = evaluate(HFModel(student, tokenizer), tokenizer, benchmark, benchmark.eval)["greedy_acc"]
    print(
        f"student greedy accuracy on {len(benchmark.eval)} eval problems: {before:.3f} -> {after:.3f} "
        f"after {args.steps} SFT steps (batch {args.batch}, lr {args.lr:g})"
    )


if __name__ == "__main__":
    main()
