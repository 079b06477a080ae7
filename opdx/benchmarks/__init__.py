"""Benchmarks (config group `benchmark`): prompts, reference answers and a verifier each.

A benchmark gives a train split (prompts for on-policy rollouts), a disjoint eval split and a
``score(problem, response) -> float`` verifier in [0, 1]. A problem is rendered with the chat
template: an optional system message, the user prompt, and for tool use the tool schemas.

A benchmark class is a dataclass whose fields are its options; ``conf/benchmark/<name>.yaml``
gives their values (the one home of their defaults) and ``build_benchmark`` type-checks a config
node against the class before building it (no data is read until ``.train`` / ``.eval``).
``benchmark=mixture`` (``opdx.benchmarks.mixture``) holds several, each with its own teacher.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from opdx.benchmarks.arith import ArithBenchmark
from opdx.benchmarks.base import CONTEXTS, Benchmark, Component, Problem, SingleComponent, Subset, privileged
from opdx.benchmarks.bfcl import BfclBenchmark
from opdx.benchmarks.math import MathBenchmark
from opdx.benchmarks.mixture import Mixture, build_mixture
from opdx.benchmarks.toolalpaca import ToolAlpacaBenchmark
from opdx.config import check, load_option, typed

__all__ = [
    "BENCHMARKS",
    "CONTEXTS",
    "Benchmark",
    "Component",
    "Mixture",
    "Problem",
    "SingleComponent",
    "Subset",
    "build_benchmark",
    "get_benchmark",
    "privileged",
]

BENCHMARKS: dict[str, type[Benchmark]] = {
    **{name: ArithBenchmark for name in ("arith", "products")},
    **{name: MathBenchmark for name in ("deepmath", "gsm8k", "math500", "aime24", "aime25")},
    "bfcl": BfclBenchmark,
    "toolalpaca": ToolAlpacaBenchmark,
    "mixture": Mixture,
}


def build_benchmark(config: Mapping[str, Any]) -> Benchmark:
    """The benchmark of a config node (``conf/benchmark/<name>.yaml`` with its overrides), its
    options type-checked against the benchmark's class; ConfigError names a bad key or value."""
    name = config.get("name")
    check(name in BENCHMARKS, f"benchmark={name!r} is unknown; valid benchmarks: {', '.join(BENCHMARKS)}")
    if name == Mixture.name:
        return build_mixture(config, build_benchmark)
    return typed(BENCHMARKS[name], config, "benchmark")


def get_benchmark(name: str, **overrides: Any) -> Benchmark:
    """The benchmark ``name`` with the options of its YAML file, ``overrides`` replacing some."""
    check(name in BENCHMARKS, f"unknown benchmark {name!r}; valid benchmarks: {', '.join(BENCHMARKS)}")
    check(
        name != Mixture.name,
        "a mixture's YAML composes its components through Hydra's defaults list: build it from a composed "
        "config (opdx.run.validate, or build_benchmark(cfg.benchmark)), not from the file alone",
    )
    return build_benchmark({**load_option("benchmark", name), **overrides})
