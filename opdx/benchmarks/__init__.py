"""Benchmarks (config group `benchmark`): prompts, reference answers and a verifier each.

A benchmark gives a train split (prompts for on-policy rollouts), a disjoint eval split and a
``score(problem, response) -> float`` verifier in [0, 1]. A problem is rendered with the chat
template: an optional system message, the user prompt, and for tool use the tool schemas.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class Problem:
    """One prompt with its reference answer and the raw entry of its source dataset.

    ``prompt`` is the user message; ``system`` an optional system message; ``tools`` JSON-schema
    function definitions (``{"type": "function", "function": {"name", "description",
    "parameters"}}``) handed to the chat template's ``tools=``."""

    prompt: str
    answer: str
    entry: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    system: str | None = None
    tools: list[dict[str, Any]] | None = field(default=None, compare=False, hash=False)


class Benchmark(Protocol):
    name: str
    train: list[Problem]
    eval: list[Problem]

    def score(self, problem: Problem, response: str) -> float:
        """1.0 if the response's final answer is right, else 0.0 (or partial credit)."""
        ...


def _arith(**kwargs: Any) -> Benchmark:
    from opdx.benchmarks.arith import ArithBenchmark

    return ArithBenchmark(**kwargs)


def _math(name: str) -> Callable[..., Benchmark]:
    def build(**kwargs: Any) -> Benchmark:
        from opdx.benchmarks.math import MathBenchmark

        return MathBenchmark(name=name, **kwargs)

    return build


def _bfcl(**kwargs: Any) -> Benchmark:
    from opdx.benchmarks.bfcl import BfclBenchmark

    return BfclBenchmark(**kwargs)


def _toolalpaca(**kwargs: Any) -> Benchmark:
    from opdx.benchmarks.toolalpaca import ToolAlpacaBenchmark

    return ToolAlpacaBenchmark(**kwargs)


BENCHMARKS: dict[str, Callable[..., Benchmark]] = {
    "arith": _arith,
    **{name: _math(name) for name in ("deepmath", "gsm8k", "math500", "aime24", "aime25")},
    "bfcl": _bfcl,
    "toolalpaca": _toolalpaca,
}


def get_benchmark(name: str, **kwargs: Any) -> Benchmark:
    """The benchmark registered as ``name``, built with ``kwargs``; ValueError lists the valid names."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; valid benchmarks: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name](**kwargs)
