"""Typed run configuration: the schema Hydra composes into, and where the config files live.

``conf/config.yaml`` (under ``CONF_DIR``) starts from ``base_config`` (``RunConfig`` below,
registered in Hydra's ConfigStore), so a wrong type (``trainer.lr=abc``) fails while composing;
``opdx.run.validate`` then checks values and registry names (``estimator.gamma=2``,
``divergence.alpha=0``) before any model loads and returns the built objects.

The defaults of ``trainer``, ``eval`` and the estimator switches live in the dataclasses below
(``opdx train --cfg job`` prints them); the defaults of a group option (a divergence's
parameter, a benchmark's data, a model pair) live in its YAML file. Each default has one home.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from fnmatch import fnmatchcase
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
DTYPES = ("float32", "bfloat16", "float16", "float64")
SCHEDULES = ("constant", "cosine", "linear")
STRATEGIES = ("none", "ddp", "fsdp2")
Schema = TypeVar("Schema")


class ConfigError(ValueError):
    """A config value that cannot run; the message names it and the valid choices."""


def check(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless ``condition``."""
    if not condition:
        raise ConfigError(message)


def asset_path(relative: str) -> str:
    """Path of a file shipped in ``opdx/assets`` (the ``${asset:...}`` config resolver)."""
    return str(resources.files("opdx") / "assets" / relative)


def cache_path(relative: str) -> str:
    """Path under ``$OPDX_CACHE`` (default ``~/.cache/opdx``), the ``${cache:...}`` resolver."""
    return str(Path(os.environ.get("OPDX_CACHE", "~/.cache/opdx")).expanduser() / relative)


@cache
def _started() -> datetime:
    return datetime.fromisoformat(os.environ["OPDX_START_TIME"]) if "OPDX_START_TIME" in os.environ else datetime.now()


def start_time(pattern: str) -> str:
    """The run's start time in ``pattern`` (strftime), the ``${start_time:...}`` resolver of the run
    directory: ``$OPDX_START_TIME`` (ISO) when set (the CLI gives every rank of a torchrun launch
    rank 0's time, so all share one directory), else the time of this process's first call."""
    return _started().strftime(pattern)


def register_resolvers() -> None:
    for name, resolver in (("asset", asset_path), ("cache", cache_path), ("start_time", start_time)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


def load_option(group: str, name: str) -> dict[str, Any]:
    """The values of ``conf/<group>/<name>.yaml``, resolved (a ``# @package _global_`` model file
    gives its ``model`` node). Raises ConfigError listing the group's options when there is no such file."""
    path = CONF_DIR / group / f"{name}.yaml"
    if not path.exists():
        valid = ", ".join(sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")))
        raise ConfigError(f"{group}={name!r} is unknown; valid: {valid}")
    register_resolvers()
    values = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    return values.get(group, values) if group == "model" else values


def typed(schema: type[Schema], values: Mapping[str, Any], key: str) -> Schema:
    """``values`` merged into the dataclass ``schema`` with OmegaConf's type checks and
    conversions (the same Hydra applies on the command line) and built, so the dataclass's
    ``__post_init__`` checks run too. Raises ConfigError naming ``key.<field>`` and the problem."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), dict(values)))
    except OmegaConfBaseException as error:
        field_key = getattr(error, "full_key", None) or "?"
        raise ConfigError(f"{key}.{field_key}: {str(error).splitlines()[0]}") from None
    except ValueError as error:
        raise ConfigError(str(error)) from None


@dataclass
class ModelConfig:
    """Teacher and student: hub ids or local directories, loaded with ``from_pretrained``."""

    name: str = MISSING
    teacher: str = MISSING
    student: str = MISSING
    dtype: str = "float32"
    teacher_dtype: str = "float32"

    def __post_init__(self) -> None:
        for key in ("dtype", "teacher_dtype"):
            value = getattr(self, key)
            check(value in DTYPES, f"model.{key}={value!r} is invalid; valid dtypes: {', '.join(DTYPES)}")


@dataclass
class EstimatorConfig:
    """The estimator of the gradient (a name of ``opdx.objective.ESTIMATORS``) and its switches
    (opd-math.md), all off by default; each trades bias for variance.

    - ``gamma``: discount of future rewards (0: per-token reward; 1: unbiased for the sequence objective).
    - ``log_ratio_clip``: clamp log u to [-c, c] before computing the advantage.
    - ``token_mean``: divide the loss by the number of response tokens instead of by B.
    - ``batch_baseline``: subtract the mean advantage over the batch's response tokens.
    - ``whiten``: z-score the advantage over the batch's response tokens (erases the difference
      between the estimators).
    - ``rollout_correction``: ``tis`` or ``ppo`` weighs each token by the importance ratio
      p_train / p_rollout of the trainer's and the sampler's log-probs, truncated at ``tis_cap``
      (truncated importance sampling) or PPO-clipped to [1 - ``ppo_clip``, 1 + ``ppo_clip``];
      null leaves the loss exactly as opd-math.md writes it.
    """

    name: str = MISSING
    gamma: float = 0.0
    log_ratio_clip: float | None = None
    token_mean: bool = False
    batch_baseline: bool = False
    whiten: bool = False
    rollout_correction: str | None = None
    tis_cap: float = 2.0
    ppo_clip: float = 0.2

    def __post_init__(self) -> None:
        check(0.0 <= self.gamma <= 1.0, f"estimator.gamma={self.gamma!r} is invalid; gamma must lie in [0, 1]")
        check(
            self.log_ratio_clip is None or self.log_ratio_clip > 0,
            f"estimator.log_ratio_clip={self.log_ratio_clip!r} is invalid; use a positive number or null",
        )
        check(
            self.rollout_correction in ROLLOUT_CORRECTIONS,
            f"estimator.rollout_correction={self.rollout_correction!r} is invalid; valid: null, tis, ppo",
        )
        check(self.tis_cap >= 1, f"estimator.tis_cap={self.tis_cap!r} is invalid; it must be at least 1")
        check(0 < self.ppo_clip < 1, f"estimator.ppo_clip={self.ppo_clip!r} is invalid; it must lie in (0, 1)")


ROLLOUT_CORRECTIONS = (None, "tis", "ppo")


@dataclass
class TrainerConfig:
    steps: int = 1000
    prompts_per_step: int = 64
    samples_per_prompt: int = 4
    max_new_tokens: int = 24
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "constant"  # constant, cosine or linear decay to 0 at `steps` (transformers' schedules)
    grad_clip: float = 1.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eval_every: int = 100
    checkpoint_every: int = 100
    resume: str | None = None
    threads: int | None = None
    device: str = "auto"
    logprob_chunk: int = 128
    gradient_checkpointing: bool = False  # recompute each student layer in backward: less memory, ~30% slower
    max_bad_steps: int = 3  # stop after this many steps in a row skipped for non-finite values
    drop_long_prompts: bool = False  # leave out prompts too long for the models' positions, instead of refusing
    strategy: str = "none"  # data parallelism under torchrun: ddp (a replica per rank) or fsdp2 (sharded)

    def __post_init__(self) -> None:
        positive = ("steps", "prompts_per_step", "samples_per_prompt", "max_new_tokens", "max_bad_steps")
        for key in (*positive, "eval_every", "checkpoint_every", "logprob_chunk"):
            check(getattr(self, key) > 0, f"trainer.{key}={getattr(self, key)!r} is invalid; it must be positive")
        check(self.lr > 0, f"trainer.lr={self.lr!r} is invalid; it must be positive")
        check(self.schedule in SCHEDULES, f"trainer.schedule={self.schedule!r}; valid: {', '.join(SCHEDULES)}")
        check(self.temperature > 0, f"trainer.temperature={self.temperature!r} is invalid; it must be positive")
        check(0 < self.top_p <= 1, f"trainer.top_p={self.top_p!r} is invalid; it must lie in (0, 1]")
        check(self.top_k >= 0, f"trainer.top_k={self.top_k!r} is invalid; 0 disables top-k")
        check(self.device in ("auto", "cpu") or self.device.startswith("cuda"), f"trainer.device={self.device!r}")
        check(self.strategy in STRATEGIES, f"trainer.strategy={self.strategy!r}; valid: {', '.join(STRATEGIES)}")


@dataclass
class EvalConfig:
    """Held-out evaluation, by `opdx eval` and every ``trainer.eval_every`` steps of training."""

    n: int = 4  # samples per problem for avg@n and pass@k; 0 = greedy accuracy only
    problems: int = 1000  # the first N problems of the benchmark's eval split
    max_new_tokens: int | None = None  # None: trainer.max_new_tokens
    batch_size: int = 2000  # sequences per generate call (prompts x n)
    run: str | None = None  # opdx eval: evaluate the student of this run directory

    def __post_init__(self) -> None:
        check(self.n >= 0, f"eval.n={self.n!r} is invalid; 0 disables avg@n and pass@k")
        for key in ("problems", "batch_size"):
            check(getattr(self, key) > 0, f"eval.{key}={getattr(self, key)!r} is invalid; it must be positive")
        check(
            self.batch_size >= self.n,
            f"eval.batch_size={self.batch_size} is smaller than eval.n={self.n}: one problem's samples share a batch",
        )
        check(
            self.max_new_tokens is None or self.max_new_tokens > 0,
            f"eval.max_new_tokens={self.max_new_tokens!r} is invalid; use a positive number or null",
        )


@dataclass
class LoggerConfig:
    name: str = MISSING
    project: str = "opdx"
    group: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class RunConfig:
    """One run. ``divergence`` and ``benchmark`` are their YAML files' values (name and options,
    typed by their registries); ``rollout`` and ``teacher`` name a backend class (``_target_``)
    and its options."""

    model: ModelConfig = field(default_factory=ModelConfig)
    divergence: dict[str, Any] = field(default_factory=dict)
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)
    benchmark: dict[str, Any] = field(default_factory=dict)
    rollout: dict[str, Any] = field(default_factory=dict)
    teacher: dict[str, Any] = field(default_factory=dict)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0


# Settings a resumed run may change (fnmatch patterns of config keys): how long it runs, where and
# how fast, how it is evaluated and logged, and which backend samples or serves a teacher (the
# run's, or a mixture component's). Any other difference (a component's teacher_model, weight or
# benchmark included) changes its meaning.
RESUME_SAFE = (
    "trainer.steps",
    "trainer.resume",
    "trainer.threads",
    "trainer.device",
    "trainer.eval_every",
    "trainer.checkpoint_every",
    "trainer.gradient_checkpointing",
    "trainer.logprob_chunk",
    "trainer.max_bad_steps",
    "trainer.strategy",
    "eval.*",
    "logger.*",
    "rollout.*",
    "teacher.*",
    "benchmark.components.*.teacher",
    "benchmark.components.*.teacher.*",
)


def resume_conflicts(saved: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """The settings outside ``RESUME_SAFE`` on which two resolved configs differ, as
    ``"key: saved -> new"`` (another model, divergence, estimator, benchmark, seed, lr, batch, a
    mixture's components or their teachers ...)."""
    flat_saved, flat_new = _flatten(saved), _flatten(new)
    keys = sorted(set(flat_saved) | set(flat_new))
    return [
        f"{key}: {flat_saved.get(key, '<unset>')} -> {flat_new.get(key, '<unset>')}"
        for key in keys
        if flat_saved.get(key) != flat_new.get(key) and not any(fnmatchcase(key, safe) for safe in RESUME_SAFE)
    ]


def _flatten(node: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in node.items():
        if isinstance(value, Mapping):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def register_schema() -> None:
    ConfigStore.instance().store(name="base_config", node=RunConfig)
