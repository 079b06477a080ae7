"""Typed run configuration: the schema Hydra composes into, validated once after all overrides.

`conf/config.yaml` starts from ``base_config`` (``RunConfig`` below, registered in Hydra's
ConfigStore), so a wrong type (``trainer.lr=abc``) fails while composing; ``validate`` then
checks values and registry names (``estimator.gamma=2``, ``divergence.alpha=0``) before any
model loads, and raises ConfigError with the bad value and the valid choices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


class ConfigError(ValueError):
    """A config value that cannot run; the message names it and the valid choices."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass
class ModelConfig:
    """Teacher and student: hub ids or local directories, loaded with ``from_pretrained``."""

    name: str = MISSING
    teacher: str = MISSING
    student: str = MISSING
    dtype: str = "float32"
    teacher_dtype: str = "float32"


@dataclass
class DivergenceConfig:
    name: str = MISSING
    alpha: float | None = None


@dataclass
class EstimatorConfig:
    """Estimator of the gradient and the switches of opd-math.md, all off by default."""

    name: str = MISSING
    gamma: float = 0.0
    log_ratio_clip: float | None = None
    token_mean: bool = False
    batch_baseline: bool = False
    whiten: bool = False

    def __post_init__(self) -> None:
        _check(0.0 <= self.gamma <= 1.0, f"estimator.gamma={self.gamma!r} is invalid; gamma must lie in [0, 1]")
        _check(
            self.log_ratio_clip is None or self.log_ratio_clip > 0,
            f"estimator.log_ratio_clip={self.log_ratio_clip!r} is invalid; use a positive number or null",
        )


@dataclass
class TrainerConfig:
    steps: int = 1000
    prompts_per_step: int = 64
    samples_per_prompt: int = 4
    max_new_tokens: int = 24
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "constant"
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

    def __post_init__(self) -> None:
        for key in ("steps", "prompts_per_step", "samples_per_prompt", "max_new_tokens"):
            _check(getattr(self, key) > 0, f"trainer.{key}={getattr(self, key)!r} is invalid; it must be positive")
        for key in ("eval_every", "checkpoint_every", "logprob_chunk"):
            _check(getattr(self, key) > 0, f"trainer.{key}={getattr(self, key)!r} is invalid; it must be positive")
        _check(self.lr > 0, f"trainer.lr={self.lr!r} is invalid; it must be positive")
        _check(self.schedule in SCHEDULES, f"trainer.schedule={self.schedule!r}; valid: {', '.join(SCHEDULES)}")
        _check(self.temperature > 0, f"trainer.temperature={self.temperature!r} is invalid; it must be positive")
        _check(0 < self.top_p <= 1, f"trainer.top_p={self.top_p!r} is invalid; it must lie in (0, 1]")
        _check(self.top_k >= 0, f"trainer.top_k={self.top_k!r} is invalid; 0 disables top-k")
        _check(self.device in ("auto", "cpu") or self.device.startswith("cuda"), f"trainer.device={self.device!r}")


SCHEDULES = ("constant", "cosine", "linear")


@dataclass
class EvalConfig:
    """Held-out evaluation, by `opdx eval` and every ``trainer.eval_every`` steps of training."""

    n: int = 4  # samples per problem for avg@n and pass@k; 0 = greedy accuracy only
    problems: int = 1000  # the first N problems of the benchmark's eval split
    max_new_tokens: int | None = None  # None: trainer.max_new_tokens
    batch_size: int = 2000  # sequences per generate call (prompts x n)
    run: str | None = None  # opdx eval: evaluate the student of this run directory

    def __post_init__(self) -> None:
        _check(self.n >= 0, f"eval.n={self.n!r} is invalid; 0 disables avg@n and pass@k")
        for key in ("problems", "batch_size"):
            _check(getattr(self, key) > 0, f"eval.{key}={getattr(self, key)!r} is invalid; it must be positive")
        _check(
            self.batch_size >= self.n,
            f"eval.batch_size={self.batch_size} is smaller than eval.n={self.n}: one problem's samples share a batch",
        )
        _check(
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
    model: ModelConfig = field(default_factory=ModelConfig)
    divergence: DivergenceConfig = field(default_factory=DivergenceConfig)
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)
    benchmark: dict[str, Any] = field(default_factory=dict)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0


def register_schema() -> None:
    ConfigStore.instance().store(name="base_config", node=RunConfig)


def validate(cfg: DictConfig) -> RunConfig:
    """The composed config as typed objects, with every name checked against its registry."""
    from omegaconf.errors import OmegaConfBaseException

    from opdx.benchmarks import BENCHMARKS, get_benchmark
    from opdx.divergences import get_divergence
    from opdx.logging import LOGGERS
    from opdx.models import MODELS
    from opdx.objective import ESTIMATORS

    plain = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]) if "hydra" in cfg else cfg
    try:
        run: RunConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), plain))
    except OmegaConfBaseException as error:
        raise ConfigError(str(error).splitlines()[0] + f" (key: {getattr(error, 'full_key', '?')})") from None
    except ValueError as error:
        raise ConfigError(str(error)) from None
    _check(run.model.name in MODELS, f"model={run.model.name!r} is unknown; valid models: {', '.join(MODELS)}")
    _check(run.estimator.name in ESTIMATORS, f"estimator={run.estimator.name!r}; valid: {', '.join(ESTIMATORS)}")
    _check(run.logger.name in LOGGERS, f"logger={run.logger.name!r} is unknown; valid loggers: {', '.join(LOGGERS)}")
    sampling = (run.trainer.temperature, run.trainer.top_k, run.trainer.top_p)
    _check(
        run.estimator.name != "analytic" or sampling == (1.0, 0, 1.0),
        f"estimator=analytic needs the student's own distribution: trainer.temperature=1, top_k=0, top_p=1 "
        f"(got {sampling})",
    )
    est = run.estimator
    _check(
        est.name != "analytic"
        or (est.gamma, est.log_ratio_clip, est.batch_baseline, est.whiten) == (0, None, False, False),
        "estimator=analytic is the exact per-state loss: estimator.gamma, log_ratio_clip, batch_baseline and whiten "
        "do not apply to it (leave them at 0 / null / false)",
    )
    for key in ("dtype", "teacher_dtype"):
        value = getattr(run.model, key)
        _check(value in DTYPES, f"model.{key}={value!r} is invalid; valid dtypes: {', '.join(DTYPES)}")
    params = {} if run.divergence.alpha is None else {"alpha": run.divergence.alpha}
    try:
        get_divergence(run.divergence.name, **params)
        benchmark = dict(run.benchmark)
        name = benchmark.pop("name", None)
        _check(name in BENCHMARKS, f"benchmark={name!r} is unknown; valid benchmarks: {', '.join(BENCHMARKS)}")
        get_benchmark(name, **benchmark)
    except TypeError as error:
        raise ConfigError(f"benchmark {run.benchmark.get('name')!r}: {error}") from None
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return run


DTYPES = ("float32", "bfloat16", "float16", "float64")
