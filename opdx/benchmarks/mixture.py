"""`mixture`: several benchmarks in one run, each with a sampling weight and its own teacher.

    opdx train benchmark=mixture sampling.max_new_tokens=32       # conf/benchmark/mixture.yaml
    opdx train benchmark=mixture benchmark.components.arith.weight=0.25
    opdx train benchmark=mixture +teacher@benchmark.components.products.teacher=server \\
        benchmark.components.products.teacher.url=http://localhost:8000/v1

Multi-teacher on-policy distillation (one student; a math specialist scores the math prompts, a
tool-use specialist the tool calls; TRL routes by a ``teacher_id`` column, verl by data source).
Each component holds a benchmark node (a ``conf/benchmark`` file composed into it, options
overridable), a ``weight`` and the teacher of its prompts: ``teacher_model`` (a local path or hub
id; null: ``model.teacher``) and ``teacher`` (a node of the teacher group; null: the run's). Every
problem carries its component's name (``Problem.source``), which routes it to its teacher
(``opdx.backends.routing``) and its verifier. A step's prompts draw a component by weight, then a
problem of it uniformly (``draw``); evaluation reports each component and their weighted mean.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from opdx.benchmarks.base import Benchmark, Component, Problem, SingleComponent
from opdx.config import ConfigError, check, typed


@dataclass
class ComponentConfig:
    """One component's node: its benchmark's node, its sampling weight and its teacher."""

    benchmark: dict[str, Any]
    weight: float = 1.0
    teacher_model: str | None = None
    teacher: dict[str, Any] | None = None


@dataclass
class MixtureConfig:
    """``conf/benchmark/mixture.yaml``: the components by name."""

    name: str
    components: dict[str, ComponentConfig]


class Tagged(SingleComponent):
    """A component's benchmark with every problem tagged with the component's ``name``
    (``Problem.source``); scores as its benchmark does. Problems are read on first use."""

    def __init__(self, name: str, benchmark: Benchmark) -> None:
        self.name, self.benchmark = name, benchmark

    @cached_property
    def train(self) -> list[Problem]:
        return [dataclasses.replace(problem, source=self.name) for problem in self.benchmark.train]

    @cached_property
    def eval(self) -> list[Problem]:
        return [dataclasses.replace(problem, source=self.name) for problem in self.benchmark.eval]

    def score(self, problem: Problem, response: str) -> float:
        return self.benchmark.score(problem, response)


class Mixture:
    """Components (``Component``, each a ``Tagged`` benchmark with its teacher) whose sampling
    weights sum to 1 (``build_mixture`` normalises them).

    ``train`` and ``eval`` are the components' problems one after another; ``score`` grades a
    problem with its own component's verifier."""

    name = "mixture"

    def __init__(self, components: list[Component]) -> None:
        self.components = components

    @property
    def names(self) -> list[str]:
        return [component.name for component in self.components]

    @property
    def weights(self) -> dict[str, float]:
        return {component.name: component.weight for component in self.components}

    def component(self, name: str | None) -> Component:
        for component in self.components:
            if component.name == name:
                return component
        raise KeyError(f"problem source {name!r} is not a component of this mixture ({', '.join(self.names)})")

    @property
    def train(self) -> list[Problem]:
        return [problem for component in self.components for problem in component.train]

    @property
    def eval(self) -> list[Problem]:
        return [problem for component in self.components for problem in component.eval]

    def score(self, problem: Problem, response: str) -> float:
        return self.component(problem.source).score(problem, response)

    def draw(self, count: int, generator: torch.Generator) -> list[Problem]:
        """``count`` train problems: each picks a component with probability its weight, then one
        of its problems uniformly, with replacement; a function of ``generator``'s state alone."""
        weights = torch.tensor([self.weights[name] for name in self.names], dtype=torch.float64)
        which = torch.multinomial(weights, count, replacement=True, generator=generator).tolist()
        positions = torch.rand(count, generator=generator, dtype=torch.float64).tolist()
        problems = []
        for index, position in zip(which, positions, strict=True):
            train = self.components[index].train
            problems.append(train[min(int(position * len(train)), len(train) - 1)])
        return problems

    def with_benchmarks(self, replace: Callable[[Component], Benchmark]) -> Mixture:
        """This mixture with each component's benchmark ``replace(component)`` (e.g. a ``Subset``
        of its tagged benchmark: its problems keep their source)."""
        return Mixture([dataclasses.replace(c, benchmark=replace(c)) for c in self.components])


def build_mixture(config: Mapping[str, Any], build: Callable[[Mapping[str, Any]], Benchmark]) -> Mixture:
    """The mixture of a ``benchmark=mixture`` node, each component's benchmark made by ``build``;
    ConfigError for no component, a weight that is not positive, a component name with a '/'
    (metric keys are ``eval/<component>/...``) or a mixture inside a mixture."""
    node = typed(MixtureConfig, config, "benchmark")
    check(bool(node.components), "benchmark=mixture has no components; give benchmark.components.<name>.benchmark")
    components = []
    for name, component in node.components.items():
        key = f"benchmark.components.{name}"
        check("/" not in name, f"{key}: a component's name must not contain '/' (it names metrics eval/<name>/...)")
        check(name != Mixture.name, f"{key}: '{name}' names the weighted means (eval/{name}/...); rename the component")
        check(component.weight > 0, f"{key}.weight={component.weight!r} is invalid; it must be positive")
        check(component.benchmark.get("name") != Mixture.name, f"{key}: a mixture cannot hold a mixture")
        try:
            benchmark = build(component.benchmark)
        except ConfigError as error:
            raise ConfigError(f"benchmark.components.{name}.{error}") from None
        teacher_key = f"{key}.teacher"
        components.append(
            Component(
                name, Tagged(name, benchmark), component.weight, component.teacher_model, component.teacher, teacher_key
            )
        )
    total = sum(component.weight for component in components)
    return Mixture([dataclasses.replace(c, weight=c.weight / total) for c in components])
