"""What every benchmark gives: problems (prompt, reference answer, chat extras) and a verifier."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class Problem:
    """One prompt with its reference answer and the raw entry of its source dataset.

    ``prompt`` is the user message; ``system`` an optional system message; ``tools`` JSON-schema
    function definitions (``{"type": "function", "function": {"name", "description",
    "parameters"}}``) handed to the chat template's ``tools=``; ``source`` the mixture component
    it was drawn from (``benchmark=mixture``: it picks the teacher that scores it), else None."""

    prompt: str
    answer: str
    entry: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    system: str | None = None
    tools: list[dict[str, Any]] | None = field(default=None, compare=False, hash=False)
    source: str | None = None


class Benchmark(Protocol):
    name: str
    train: list[Problem]
    eval: list[Problem]

    def score(self, problem: Problem, response: str) -> float:
        """1.0 if the response's final answer is right, else 0.0 (or partial credit)."""
        ...


@dataclass
class Subset:
    """A benchmark with some of its problems left out (e.g. prompts too long for the models);
    it scores as the benchmark does."""

    benchmark: Benchmark
    train: list[Problem]
    eval: list[Problem]

    @property
    def name(self) -> str:
        return self.benchmark.name

    def score(self, problem: Problem, response: str) -> float:
        return self.benchmark.score(problem, response)
