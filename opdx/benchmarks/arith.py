"""`arith` and `products`: integer arithmetic from reasoning-gym's procedural generators.

Problems come from ``reasoning_gym.create_dataset(generator, seed=..., ...)``: chain_sum for
``arith`` (2-3 terms of 1-2 digits joined by + and -), products for ``products`` (two 2-digit
factors). Item i of a dataset uses Random(seed + i), so the train and eval seeds are kept far
apart and eval expressions are removed from train. Prompts are the compact expression
(``98+93-77=``, ``15*43=``); a worked response (``worked_solution``, what the tiny teachers are
fine-tuned on) writes the running partial sums (``98+93=191;191-77=114``) or the partial
products and their sum (``15*4=60;15*3=45;600+45=645``), and the final answer is the number
after the last ``=``, graded by the generator's own ``score_answer``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

import reasoning_gym

from opdx.benchmarks.base import Problem, SingleComponent

EVAL_SEED_OFFSET = 10_000_000


def compact(expression: str) -> str:
    return expression.replace(" ", "")


def final_answer(response: str) -> str:
    """The text after the last '=' (the whole response if there is none), stripped."""
    return response.rsplit("=", 1)[-1].strip()


def running_sums(expression: str) -> str:
    """Left-to-right worked solution of a +/- chain: '98+93-77' -> '98+93=191;191-77=114'."""
    terms = re.findall(r"[+-]?\d+", compact(expression))
    total = int(terms[0])
    steps = []
    for term in terms[1:]:
        new_total = total + int(term)
        steps.append(f"{total}{term[0]}{term[1:]}={new_total}")
        total = new_total
    return ";".join(steps)


def partial_products(expression: str) -> str:
    """Long multiplication of two factors by the digits of the second, tens then ones:
    '15 * 43' -> '15*4=60;15*3=45;600+45=645'; a one-digit second factor: '7 * 8' -> '7*8=56'."""
    a, b = (int(term) for term in compact(expression).split("*"))
    if b < 10:
        return f"{a}*{b}={a * b}"
    tens, ones = divmod(b, 10)
    steps = [f"{a}*{tens}={a * tens}", f"{a}*{ones}={a * ones}", f"{a * tens}0+{a * ones}={a * b}"]
    return ";".join(steps)


# generator -> the worked solution of its expression (the supervised targets of the tiny teachers)
WORKED_SOLUTIONS = {"chain_sum": running_sums, "products": partial_products}


@dataclass
class ArithBenchmark(SingleComponent):
    """Options as in conf/benchmark/arith.yaml: the generator, split sizes, the train seed (eval
    uses seed + EVAL_SEED_OFFSET) and the expression's number of terms and digits."""

    name: str
    generator: str
    train_size: int
    eval_size: int
    seed: int
    min_terms: int
    max_terms: int
    min_digits: int
    max_digits: int

    def __post_init__(self) -> None:
        counts = ("train_size", "eval_size", "seed", "min_terms", "max_terms", "min_digits", "max_digits")
        for key in counts:
            if getattr(self, key) < 0:
                raise ValueError(
                    f"benchmark.{key}={getattr(self, key)!r} is invalid; it must be a non-negative integer"
                )
        if not (self.min_terms <= self.max_terms and self.min_digits <= self.max_digits):
            raise ValueError(f"benchmark: min_terms/min_digits must not exceed max_terms/max_digits, got {self}")
        if self.generator not in reasoning_gym.factory.DATASETS:
            raise ValueError(
                f"benchmark.generator={self.generator!r} is not a reasoning-gym dataset; "
                f"e.g. chain_sum, basic_arithmetic, products (all: {len(reasoning_gym.factory.DATASETS)})"
            )
        self._datasets: dict = {}

    def _dataset(self, split: str):
        if split not in self._datasets:
            size, seed = (
                (self.train_size, self.seed) if split == "train" else (self.eval_size, self.seed + EVAL_SEED_OFFSET)
            )
            self._datasets[split] = reasoning_gym.create_dataset(
                self.generator,
                size=size,
                seed=seed,
                min_terms=self.min_terms,
                max_terms=self.max_terms,
                min_digits=self.min_digits,
                max_digits=self.max_digits,
            )
        return self._datasets[split]

    @staticmethod
    def _problem(entry: dict) -> Problem:
        return Problem(prompt=compact(entry["metadata"]["expression"]) + "=", answer=entry["answer"], entry=entry)

    @cached_property
    def eval(self) -> list[Problem]:
        return [self._problem(entry) for entry in self._dataset("eval")]

    @cached_property
    def train(self) -> list[Problem]:
        held_out = {problem.prompt for problem in self.eval}
        return [p for p in map(self._problem, self._dataset("train")) if p.prompt not in held_out]

    def score(self, problem: Problem, response: str) -> float:
        """Exact match of the final answer (reasoning-gym gives 0.01 to any wrong number; we count 0)."""
        return float(self._dataset("eval").score_answer(final_answer(response), problem.entry) == 1.0)

    def privileged_prompt(self, problem: Problem, context: str) -> str:
        """The prompt a self-teacher sees (``opdx.benchmarks.base.privileged``), in the pair's own
        characters: the solved expression first (``98+93-77=114;98+93-77=``), or the worked
        solution (``98+93=191;191-77=114;98+93-77=``)."""
        hint = f"{problem.prompt}{problem.answer}" if context == "reference" else self.worked_solution(problem)
        return f"{hint};{problem.prompt}"

    def worked_solution(self, problem: Problem) -> str:
        """The step-by-step response of ``WORKED_SOLUTIONS``; ValueError for another generator."""
        if self.generator not in WORKED_SOLUTIONS:
            known = ", ".join(WORKED_SOLUTIONS)
            raise ValueError(f"no worked solution for generator={self.generator!r}; known: {known}")
        return WORKED_SOLUTIONS[self.generator](problem.entry["metadata"]["expression"])
