"""What every benchmark gives: problems (prompt, reference answer, chat extras), a verifier, and
the components a step draws its prompts from (a plain benchmark is one; ``benchmark=mixture``
has several, each with its weight and teacher)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch


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

    @property
    def components(self) -> list[Component]:
        """What a step draws from, each with its sampling weight (summing to 1) and teacher."""
        ...

    def draw(self, count: int, generator: torch.Generator) -> list[Problem]:
        """``count`` train problems drawn with replacement, a function of ``generator``'s state alone."""
        ...

    def with_benchmarks(self, replace: Callable[[Component], Benchmark]) -> Benchmark:
        """This benchmark with each component's problems those of ``replace(component)`` (e.g. a
        ``Subset`` without the prompts too long for the models)."""
        ...


@dataclass(frozen=True)
class Component:
    """One source of a run's prompts: a benchmark, its sampling weight and the teacher of its
    prompts. ``teacher_model`` is a local path or hub id (None: ``model.teacher``), ``teacher`` a
    node of the teacher group (None: the run's), ``teacher_key`` the config key that sets them
    (in messages). It grades and lists problems as its benchmark does."""

    name: str
    benchmark: Benchmark
    weight: float = 1.0
    teacher_model: str | None = None
    teacher: dict[str, Any] | None = None
    teacher_key: str = "teacher"

    @property
    def train(self) -> list[Problem]:
        return self.benchmark.train

    @property
    def eval(self) -> list[Problem]:
        return self.benchmark.eval

    def score(self, problem: Problem, response: str) -> float:
        return self.benchmark.score(problem, response)


class SingleComponent:
    """The component interface of a plain benchmark: one component, itself, of weight 1 and with
    the run's teacher; a step's prompts are uniform draws from its train split."""

    @property
    def components(self) -> list[Component]:
        return [Component(self.name, self)]

    def draw(self, count: int, generator: torch.Generator) -> list[Problem]:
        indices = torch.randint(len(self.train), (count,), generator=generator)
        return [self.train[i] for i in indices.tolist()]

    def with_benchmarks(self, replace: Callable[[Component], Benchmark]) -> Benchmark:
        return replace(self.components[0])


@dataclass
class Subset(SingleComponent):
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


CONTEXTS = ("none", "reference", "worked")  # what a self-teacher sees beside the prompt (teacher.context)
CONTEXT_LEADS = {"reference": "The correct final answer:", "worked": "A worked solution:"}


def privileged(benchmark: Benchmark, problem: Problem, context: str) -> Problem:
    """``problem`` as a self-teacher (``teacher=self``) sees it: the prompt alone (``none``), or
    with the reference answer (``reference``) or a worked solution (``worked``, the benchmark's
    ``worked_solution``) after it; in the benchmark's own form where it has one
    (``privileged_prompt``: arith's compact expressions), else after a line that says what it is.
    In a mixture, the benchmark of the problem's component (``Problem.source``) says. ValueError
    naming the benchmark when it has no worked solutions, or a bad ``context``."""
    if context not in CONTEXTS:
        raise ValueError(f"teacher.context={context!r} is invalid; valid: {', '.join(CONTEXTS)}")
    if hasattr(benchmark, "component"):  # a mixture (opdx.benchmarks.mixture)
        benchmark = benchmark.component(problem.source).benchmark
    while hasattr(benchmark, "benchmark"):  # a Subset's, or a mixture component's tagged benchmark
        benchmark = benchmark.benchmark
    if context == "none":
        return problem
    own = getattr(benchmark, "privileged_prompt", None)
    if own is not None:
        return replace(problem, prompt=own(problem, context))
    if context == "worked" and not hasattr(benchmark, "worked_solution"):
        raise ValueError(f"teacher.context=worked: benchmark {benchmark.name} has no worked solutions; use reference")
    hint = problem.answer if context == "reference" else benchmark.worked_solution(problem)
    return replace(problem, prompt=f"{problem.prompt}\n\n{CONTEXT_LEADS[context]}\n{hint}")
