"""`tiny_products`: a second tiny teacher, fine-tuned on reasoning-gym products, for the tiny student.

    opdx prepare model=tiny_products        # writes opdx/assets/tiny_products/teacher
    opdx train model=tiny_products benchmark=products sampling.max_new_tokens=32

The teacher has the tiny arith teacher's shape and character tokenizer (so it shares the tiny
student's token ids) and is fine-tuned on the partial-products solutions of 2-digit x 2-digit
multiplications (``opdx.benchmarks.arith.partial_products``), longer than the arith teacher's
because the task is harder. The student is the shipped tiny student (``model.student``), which
never saw a product: with ``benchmark=mixture`` the two teachers distil one student on both tasks.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from opdx.benchmarks import get_benchmark
from opdx.pairs.tiny import TEACHER, train_tiny

PRODUCTS_TEACHER = replace(TEACHER, sft_steps=6000)


def build(out_dir: Path, seed: int = 0) -> dict:
    return {"seed": seed, "teacher": train_tiny("teacher", PRODUCTS_TEACHER, get_benchmark("products"), out_dir, seed)}
