"""Typed run configuration: the schema Hydra composes into, and where the config files live.

``conf/config.yaml`` (under ``CONF_DIR``) starts from ``base_config`` (``RunConfig`` below,
registered in Hydra's ConfigStore), so a wrong type (``trainer.lr=abc``) fails while composing;
``opdx.run.validate`` then checks values and registry names (``estimator.gamma=2``,
``divergence.alpha=0``) before any model loads and returns the built objects.

The defaults of ``trainer``, ``sampling``, ``runtime``, ``eval`` and the estimator switches live in
the dataclasses below (``opdx train --cfg job`` prints them); the defaults of a group option (a divergence's
parameter, a benchmark's data, a model pair) live in its YAML file. Each default has one home.
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from fnmatch import fnmatchcase
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
DTYPES = ("float32", "bfloat16", "float16", "float64")
SCHEDULES = ("constant", "cosine", "linear")
STRATEGIES = ("none", "ddp", "fsdp2")
PRECISIONS = ("fp32", "bf16-mixed", "bf16")
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


def rank_zero_subdir(subdir: str) -> str | None:
    """``hydra.output_subdir``: ``subdir`` on rank 0, none on the other torchrun ranks (rank 0
    writes the run's files). The ``${rank_zero_subdir:...}`` resolver."""
    return subdir if int(os.environ.get("RANK", "0")) == 0 else None


def rank_zero_file(path: str) -> str:
    """``path`` on rank 0, the null device on the other torchrun ranks (their job log), the
    ``${rank_zero_file:...}`` resolver."""
    return path if int(os.environ.get("RANK", "0")) == 0 else os.devnull


def register_resolvers() -> None:
    resolvers = (
        ("asset", asset_path), ("cache", cache_path), ("start_time", start_time),
        ("rank_zero_subdir", rank_zero_subdir), ("rank_zero_file", rank_zero_file),
    )  # fmt: skip
    for name, resolver in resolvers:
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


LORA_ALL_LINEAR = "all-linear"  # peft's name for every linear layer but the output layer


@dataclass
class LoraConfig:
    """LoRA adapters on the student, through ``peft`` (Hu et al. 2021): each targeted weight W
    computes with W + (alpha / r) B A, B [out, r] starting at zero and A [r, in]; only A and B
    train, are checkpointed and are saved. ``r`` 0 (the default) trains every weight instead.
    ``target_modules``: peft's ``all-linear``, or module names separated by commas
    (``q_proj,v_proj``). ``dropout``: on each adapter's input in the training forward (the
    sampled tokens' log-probs then come from a thinned student). ``save_merged``: also write the
    merged model, W + (alpha / r) B A in the base's names, to ``student_merged/``."""

    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str = LORA_ALL_LINEAR
    save_merged: bool = False

    def __post_init__(self) -> None:
        check(self.r >= 0, f"model.lora.r={self.r} is invalid: give the adapters' rank (0: no adapters)")
        check(self.alpha > 0, f"model.lora.alpha={self.alpha} is invalid: give a positive scale")
        check(0 <= self.dropout < 1, f"model.lora.dropout={self.dropout} is invalid: give a probability in [0, 1)")
        check(bool(self.targets()), "model.lora.target_modules is empty: give all-linear or module names")

    def targets(self) -> str | list[str]:
        """``target_modules`` as peft takes it."""
        if self.target_modules == LORA_ALL_LINEAR:
            return LORA_ALL_LINEAR
        return [name.strip() for name in self.target_modules.split(",") if name.strip()]


@dataclass
class ModelConfig:
    """Teacher and student: hub ids or local directories, loaded with ``from_pretrained``.
    ``dtype`` is the student's compute dtype (its forward passes, its samples, a vLLM engine's
    copy); ``trainer.precision`` says in which dtype training keeps its weights."""

    name: str = MISSING
    teacher: str = MISSING
    student: str = MISSING
    dtype: str = "float32"
    teacher_dtype: str = "float32"
    # config.json fields (with model_type) the memory planner reads when no copy of a model's config is at hand
    student_config: dict[str, Any] | None = None
    teacher_config: dict[str, Any] | None = None
    lora: LoraConfig = field(default_factory=LoraConfig)  # adapters on the student instead of training every weight

    def __post_init__(self) -> None:
        for key in ("dtype", "teacher_dtype"):
            value = getattr(self, key)
            check(value in DTYPES, f"model.{key}={value!r} is invalid; valid dtypes: {', '.join(DTYPES)}")


@dataclass
class EstimatorConfig:
    """The estimator of the gradient (a name of ``opdx.objective.ESTIMATORS``) and its switches
    (docs/opd-math.md), all off by default; each trades bias for variance.

    - ``gamma``: discount of future rewards (0: per-token reward; 1: unbiased for the sequence objective).
    - ``log_ratio_clip``: clamp log u to [-c, c] before computing the advantage.
    - ``token_mean``: divide the loss by the number of response tokens instead of by B.
    - ``batch_baseline``: subtract the mean advantage over the batch's response tokens.
    - ``whiten``: z-score the advantage over the batch's response tokens (erases the difference
      between the estimators).
    - ``support``: where each state's divergence is taken: ``sampled`` (the sampled token alone,
      an unbiased one-sample estimate of D_f; needs only its teacher log-prob), ``topk`` (the
      teacher's ``top_k`` most likely tokens and one tail category with the rest of both models'
      mass: D_f on K + 1 categories, exactly) or ``full`` (every token: D_f exactly). The dense
      supports need the teacher's logits.
    - ``state_baseline``: on the sampled support, subtract from each token's own advantage its
      expectation at that state over the whole vocabulary, b(s) = sum_y p(y|s) a(u_y), computed
      exactly from the teacher's logits: a baseline that does not depend on the sampled token, so
      the gradient stays unbiased while its variance falls.
    - ``rollout_correction``: ``tis`` or ``ppo`` weighs each token by the importance ratio
      p_train / p_rollout of the trainer's and the sampler's log-probs, truncated at ``tis_cap``
      (truncated importance sampling) or PPO-clipped to [1 - ``ppo_clip``, 1 + ``ppo_clip``];
      ``per_decision`` weighs each reward by the product of the ratios up to its token (per-decision
      importance sampling), truncated at ``per_decision_cap`` (null: not truncated, and then unbiased
      for the trainer's policy whatever policy sampled: a stale one, another engine's arithmetic);
      null leaves the loss exactly as docs/opd-math.md writes it.
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
    per_decision_cap: float | None = None
    support: str = "sampled"
    top_k: int = 16
    state_baseline: bool = False

    def __post_init__(self) -> None:
        check(0.0 <= self.gamma <= 1.0, f"estimator.gamma={self.gamma!r} is invalid; gamma must lie in [0, 1]")
        check(self.support in SUPPORTS, f"estimator.support={self.support!r} is invalid; valid: {', '.join(SUPPORTS)}")
        check(self.top_k >= 1, f"estimator.top_k={self.top_k!r} is invalid; it must be at least 1")
        check(
            self.log_ratio_clip is None or self.log_ratio_clip > 0,
            f"estimator.log_ratio_clip={self.log_ratio_clip!r} is invalid; use a positive number or null",
        )
        check(
            self.rollout_correction in ROLLOUT_CORRECTIONS,
            f"estimator.rollout_correction={self.rollout_correction!r} is invalid; valid: null, "
            + ", ".join(ROLLOUT_CORRECTIONS[1:]),
        )
        check(
            self.per_decision_cap is None or self.per_decision_cap >= 1,
            f"estimator.per_decision_cap={self.per_decision_cap!r} is invalid; use null or a number of at least 1",
        )
        check(self.tis_cap >= 1, f"estimator.tis_cap={self.tis_cap!r} is invalid; it must be at least 1")
        check(0 < self.ppo_clip < 1, f"estimator.ppo_clip={self.ppo_clip!r} is invalid; it must lie in (0, 1)")


ROLLOUT_CORRECTIONS = (None, "tis", "ppo", "per_decision")
SUPPORTS = ("sampled", "topk", "full")


@dataclass
class SamplingConfig:
    """How every rollout samples from the student, in training and in ``opdx eval`` alike: the
    warpers (``temperature``, ``top_k`` with 0 off, ``top_p`` with 1 off) and the response length
    limit ``max_new_tokens``. A warped distribution is what u = q/p then compares with the teacher
    (docs/opd-math.md, "Warped sampling")."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 24

    def __post_init__(self) -> None:
        check(self.temperature > 0, f"sampling.temperature={self.temperature!r} is invalid; it must be positive")
        check(0 < self.top_p <= 1, f"sampling.top_p={self.top_p!r} is invalid; it must lie in (0, 1]")
        check(self.top_k >= 0, f"sampling.top_k={self.top_k!r} is invalid; 0 disables top-k")
        new_tokens = self.max_new_tokens
        check(new_tokens > 0, f"sampling.max_new_tokens={new_tokens!r} is invalid; it must be positive")


@dataclass
class RuntimeConfig:
    """Where and how the models run, for ``opdx train`` and ``opdx eval`` alike: CPU threads
    (null: torch's default), the device (``auto``: CUDA when there is one), the tokens (rows x
    positions) per chunk of the log-prob head (a chunk's logits are [logprob_chunk, V]), the states
    per chunk of a dense estimator support's logits (``dense_chunk``: both models' [dense_chunk, V]
    logits, recomputed in backward; the loss's extra memory is a few such float32 tensors), and
    whether prompts too long for the models' positions are left out (``drop_long_prompts``) instead
    of refused."""

    threads: int | None = None
    device: str = "auto"
    logprob_chunk: int = 8192
    dense_chunk: int = 256
    drop_long_prompts: bool = False
    track_memory: bool = False  # a CPU run records each phase's peak tensor memory (memory/*; slow); CUDA always does

    def __post_init__(self) -> None:
        check(
            self.threads is None or self.threads > 0,
            f"runtime.threads={self.threads!r} is invalid; use a positive number or null",
        )
        check(
            self.device in ("auto", "cpu") or self.device.startswith("cuda"),
            f"runtime.device={self.device!r} is invalid; valid: auto, cpu, cuda, cuda:<index>",
        )
        for key in ("logprob_chunk", "dense_chunk"):
            check(getattr(self, key) > 0, f"runtime.{key}={getattr(self, key)!r} is invalid; it must be positive")


@dataclass
class TrainerConfig:
    """The training loop: batch, optimizer, schedule, evals and checkpoints, resume, parallelism.
    The fields at the end are the old names of settings that moved (``RENAMED``): null unless set."""

    steps: int = 1000
    prompts_per_step: int = 64
    samples_per_prompt: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "constant"  # constant, cosine or linear decay to 0 at `steps` (transformers' schedules)
    grad_clip: float = 1.0
    eval_every: int = 100
    checkpoint_every: int = 100
    resume: str | None = None
    gradient_checkpointing: bool = False  # recompute each student layer in backward: less memory, ~30% slower
    # sequences per forward/backward (teacher, student, update): a number, auto (the memory planner's
    # choice: the whole batch when it fits) or null (the whole batch)
    micro_batch_size: Any = "auto"
    # sequences per sampling call of a step's rollout (whole groups of samples_per_prompt), the same choices
    rollout_batch_size: Any = "auto"
    precision: str | None = None  # fp32 | bf16-mixed | bf16 (resolve_precision); null: by model.dtype
    export_dtype: str | None = None  # the saved student's dtype (e.g. bfloat16); null: the master weights'
    max_bad_steps: int = 3  # stop after this many steps in a row skipped for non-finite values
    strategy: str = "none"  # data parallelism under torchrun: ddp (a replica per rank) or fsdp2 (sharded)
    # asynchronous rollouts (rollout=server): the batch of step n + k is sampled, by the weights of step n,
    # while step n trains (opdx.pipeline); null: each step samples its own batch first
    max_staleness: int | None = None
    # every this many steps, the other estimator's gradient on the step's batch beside the run's (probe/*:
    # opdx.trainer.probe_gradients); null: never
    probe_every: int | None = None
    stop_on_warning: bool = False  # stop at the first early warning (opdx.monitor), its step's checkpoint saved
    # old names, kept working (each warns once): sampling.* and runtime.* are where these live now
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    threads: int | None = None
    device: str | None = None
    logprob_chunk: int | None = None
    drop_long_prompts: bool | None = None

    def __post_init__(self) -> None:
        positive = ("steps", "prompts_per_step", "samples_per_prompt", "max_bad_steps", "eval_every")
        for key in (*positive, "checkpoint_every"):
            check(getattr(self, key) > 0, f"trainer.{key}={getattr(self, key)!r} is invalid; it must be positive")
        check(self.lr > 0, f"trainer.lr={self.lr!r} is invalid; it must be positive")
        check(
            self.max_staleness is None or self.max_staleness >= 0,
            f"trainer.max_staleness={self.max_staleness!r} is invalid; use 0 or more steps, or null (no sampling "
            "ahead)",
        )
        check(
            self.probe_every is None or self.probe_every > 0,
            f"trainer.probe_every={self.probe_every!r} is invalid; use a positive number of steps or null (no probe)",
        )
        for key in ("micro_batch_size", "rollout_batch_size"):
            size = getattr(self, key)
            check(
                size is None or size == "auto" or (isinstance(size, int) and not isinstance(size, bool) and size > 0),
                f"trainer.{key}={size!r} is invalid; use a positive number, auto (the memory planner's choice) or "
                "null (the whole batch)",
            )
        check(
            self.export_dtype is None or self.export_dtype in DTYPES,
            f"trainer.export_dtype={self.export_dtype!r} is invalid; valid: {', '.join(DTYPES)} or null",
        )
        check(self.schedule in SCHEDULES, f"trainer.schedule={self.schedule!r}; valid: {', '.join(SCHEDULES)}")
        check(self.strategy in STRATEGIES, f"trainer.strategy={self.strategy!r}; valid: {', '.join(STRATEGIES)}")
        check(
            self.precision is None or self.precision in PRECISIONS,
            f"trainer.precision={self.precision!r} is invalid; valid: {', '.join(PRECISIONS)} or null",
        )


def resolve_precision(precision: str | None, dtype: str) -> str:
    """The training precision of a student computing in ``dtype`` (``model.dtype``): ``fp32``
    trains in the student's own float32 (or float64) weights; ``bf16-mixed`` keeps float32 master
    weights and AdamW state and computes in bfloat16 (autocast); ``bf16`` keeps everything in
    bfloat16, where an update smaller than half a weight's step is lost (at lr 1e-6 most are,
    and norm weights near 1 never move). Null: ``bf16-mixed`` for a bfloat16 student, ``fp32``
    for a float32 or float64 one. ConfigError for a combination that contradicts ``dtype`` and for
    a float16 student (training it needs loss scaling, which opdx does not do)."""
    check(dtype != "float16", "model.dtype=float16 cannot be trained (it needs loss scaling): use bfloat16 or float32")
    full = dtype in ("float32", "float64")
    resolved = precision or ("fp32" if full else "bf16-mixed")
    check(
        (resolved == "fp32") == full,
        f"trainer.precision={resolved} with model.dtype={dtype}: fp32 goes with a float32 or float64 student, "
        "bf16-mixed and bf16 with a bfloat16 one",
    )
    return resolved


# Settings that moved: old key -> new key. The old names still compose (the fields above) and
# `upgrade` moves their values, warning once; saved configs of earlier runs are read through it too.
RENAMED = {
    "trainer.max_new_tokens": "sampling.max_new_tokens",
    "trainer.temperature": "sampling.temperature",
    "trainer.top_k": "sampling.top_k",
    "trainer.top_p": "sampling.top_p",
    "trainer.threads": "runtime.threads",
    "trainer.device": "runtime.device",
    "trainer.logprob_chunk": "runtime.logprob_chunk",
    "trainer.drop_long_prompts": "runtime.drop_long_prompts",
}
_warned: set[str] = set()
NEW_NODES = {"sampling": SamplingConfig, "runtime": RuntimeConfig}  # the schemas of RENAMED's new keys
# former estimator names: the conf/estimator file kept under each (an alias) and what a saved run's becomes
ESTIMATOR_ALIASES = {"analytic": {"name": "unbiased", "support": "full"}}


def upgrade(config: Mapping[str, Any], warn: bool = True) -> dict[str, Any]:
    """A copy of a config (a plain nested dict) with every renamed setting under its new key
    (``RENAMED``): an old key's value (not null) replaces the new key's, and the old key is left
    null; ConfigError when both are set to different values (the new one off its default). A
    saved former estimator name becomes what ``ESTIMATOR_ALIASES`` says (``analytic``: ``unbiased``
    with ``support: full``). With ``warn``
    each old name used says its new name once per process (stderr)."""
    upgraded = copy.deepcopy(dict(config))
    for old, new in RENAMED.items():
        old_node, old_key = old.split(".")
        new_node, new_key = new.split(".")
        value = upgraded.get(old_node, {}).get(old_key)
        if value is None:
            continue
        given, default = upgraded.get(new_node, {}).get(new_key), getattr(NEW_NODES[new_node](), new_key)
        check(
            given in (None, default, value),
            f"{old}={value!r} and {new}={given!r} set one setting twice: {old} is the old name of {new}; keep {new}",
        )
        if warn and old not in _warned:
            _warned.add(old)
            print(f"opdx: {old} is now {new} (the old name still works)", file=sys.stderr)
        upgraded.setdefault(new_node, {})[new_key] = value
        upgraded[old_node][old_key] = None
    estimator = upgraded.get("estimator") or {}
    alias = ESTIMATOR_ALIASES.get(estimator.get("name"))
    if alias:  # a run saved under a former estimator name
        upgraded["estimator"] = {**estimator, **alias}
        if warn and estimator["name"] not in _warned:
            _warned.add(estimator["name"])
            new = " ".join(f"estimator.{key}={value}" for key, value in alias.items()).replace(".name=", "=")
            print(f"opdx: estimator={estimator['name']} is now {new}", file=sys.stderr)
    return upgraded


@dataclass
class EvalConfig:
    """Held-out evaluation, by `opdx eval` and every ``trainer.eval_every`` steps of training."""

    n: int = 4  # samples per problem for avg@n and pass@k; 0 = greedy accuracy only
    problems: int = 1000  # the first N problems of the benchmark's eval split
    max_new_tokens: int | None = None  # None: sampling.max_new_tokens
    batch_size: int = 2000  # sequences per generate call (prompts x n) at most; the memory planner may lower it
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
class PlanConfig:
    """The memory planner (``opdx.plan``; ``opdx plan`` prints it): the device memory to plan for
    (null: the CUDA device's, or the machine's RAM for a CPU run), the ranks (null: torchrun's),
    the longest prompt in tokens (null: measured with the tokenizer, 512 without one) and the
    share of the memory a plan may fill (the rest: fragmentation, the CUDA context)."""

    gpu_memory_gib: float | None = None
    gpus: int | None = None
    prompt_tokens: int | None = None
    headroom: float = 0.9

    def __post_init__(self) -> None:
        for key in ("gpu_memory_gib", "gpus", "prompt_tokens"):
            value = getattr(self, key)
            check(value is None or value > 0, f"plan.{key}={value!r} is invalid; use a positive number or null")
        check(0 < self.headroom <= 1, f"plan.headroom={self.headroom!r} is invalid; it must be in (0, 1]")


@dataclass
class MonitorConfig:
    """Early warnings (``opdx.monitor``): each signal's mean over the last ``window`` steps against
    its best so far in the run (drift: the factor it may move by) or a fixed level; null turns a
    signal off. On by default are the two rules that separated collapsing from healthy runs of the
    default job on the seeds they were chosen on (docs/monitor.md); the drift signals off by
    default moved as far in healthy runs there, and no run there reached the levels' values.
    ``trainer.stop_on_warning`` stops the run at the first warning."""

    window: int = 1
    eos_rate: float | None = 1.5  # drift: falls to 1/factor of its highest
    reverse_kl: float | None = 1.75  # drift: rises to factor x its lowest
    length_rise: float | None = None  # drift: rises to factor x its lowest
    length_fall: float | None = None  # drift: falls to 1/factor of its highest
    grad_norm: float | None = None  # drift: rises to factor x its lowest
    advantage: float | None = None  # drift: the largest |advantage| rises to factor x its lowest
    forward_kl: float | None = None  # drift: rises to factor x its lowest
    ess: float | None = None  # level: the importance-weight ESS fraction falls below it (e.g. 0.5)
    clip_fraction: float | None = None  # level: the share of log u clipped rises above it (e.g. 0.2)

    def __post_init__(self) -> None:
        check(self.window > 0, f"monitor.window={self.window!r} is invalid; it must be a positive number of steps")
        drifts = ("eos_rate", "reverse_kl", "length_rise", "length_fall", "grad_norm", "advantage", "forward_kl")
        for key in drifts:
            value = getattr(self, key)
            check(
                value is None or value > 1,
                f"monitor.{key}={value!r} is invalid; use a factor above 1 (the rolling mean's move from its best "
                "so far that warns) or null (off)",
            )
        for key in ("ess", "clip_fraction"):
            value = getattr(self, key)
            check(
                value is None or 0 < value < 1,
                f"monitor.{key}={value!r} is invalid; use a fraction in (0, 1) or null (off)",
            )


@dataclass
class LoggerConfig:
    """``name``: jsonl or wandb (``opdx.metrics.LOGGERS``); wandb's ``project``, ``group`` and
    ``tags``. ``samples``: rollouts kept as text (``opdx.samples``) of each kind at each eval and
    every ``samples_every`` training steps (null: at the eval steps; 0 samples: none)."""

    name: str = MISSING
    project: str = "opdx"
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    samples: int = 4
    samples_every: int | None = None

    def __post_init__(self) -> None:
        check(self.samples >= 0, f"logger.samples={self.samples!r} is invalid; use 0 (none) or more")
        check(
            self.samples_every is None or self.samples_every > 0,
            f"logger.samples_every={self.samples_every!r} is invalid; use a positive number of steps or null",
        )


@dataclass
class SetupConfig:
    """What ``opdx train`` and ``opdx eval`` both set up: the pair, the benchmark, the backends of
    the student's rollouts and of the teacher, sampling, the runtime, the eval and the seed.
    ``benchmark`` is its YAML file's values (name and options, typed by the registry);
    ``rollout`` and ``teacher`` name a backend class (``_target_``) and its options."""

    model: ModelConfig = field(default_factory=ModelConfig)
    benchmark: dict[str, Any] = field(default_factory=dict)
    rollout: dict[str, Any] = field(default_factory=dict)
    teacher: dict[str, Any] = field(default_factory=dict)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    seed: int = 0


@dataclass
class RunConfig(SetupConfig):
    """One training run (``conf/config.yaml``): the setup, the divergence (its YAML file's values),
    the estimator, the trainer, the logger and the early warnings."""

    divergence: dict[str, Any] = field(default_factory=dict)
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)


@dataclass
class EvalRunConfig(SetupConfig):
    """``opdx eval`` (``conf/eval.yaml``): the setup alone. ``trainer`` holds what a model file sets
    for training (its batch, lr, ...) and the old names of moved settings (``RENAMED``, which
    ``upgrade`` moves); evaluation reads nothing else of it."""

    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    samples: int = 4  # rollouts of each model and kind kept as text in samples.jsonl (opdx.samples); 0: none

    def __post_init__(self) -> None:
        check(self.samples >= 0, f"samples={self.samples!r} is invalid; use 0 (none) or more")


# Settings a resumed run may change (fnmatch patterns of config keys): how long it runs, where and
# how fast, how it is evaluated and logged, and which backend samples or serves a teacher (the
# run's, or a mixture component's). Any other difference (a component's teacher_model, weight or
# benchmark included) changes its meaning.
SELF_TEACHER = "load_self_teacher"  # teacher=self's factory (opdx.backends.hf)
RESUME_SAFE = (
    "trainer.steps",
    "trainer.resume",
    "trainer.eval_every",
    "trainer.checkpoint_every",
    "trainer.gradient_checkpointing",
    "trainer.micro_batch_size",
    "trainer.rollout_batch_size",
    "plan.*",
    "trainer.max_bad_steps",
    "trainer.export_dtype",
    "trainer.strategy",
    "trainer.probe_every",
    "trainer.stop_on_warning",
    "monitor.*",
    "runtime.*",
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
    mixture's components or their teachers ...). A setting the saved run does not have (it was
    added to opdx later) differs only when the new value is not its default, which is what the
    run trained with."""
    flat_saved, flat_new = (_flatten(with_precision(upgrade(c, warn=False))) for c in (saved, new))
    defaults = schema_defaults()
    keys = sorted(set(flat_saved) | set(flat_new))
    return [
        f"{key}: {flat_saved.get(key, '<unset>')} -> {flat_new.get(key, '<unset>')}"
        for key in keys
        if flat_saved.get(key, defaults.get(key)) != flat_new.get(key)
        and not resume_safe(key, flat_saved.get(key), flat_new.get(key))
    ]


def resume_safe(key: str, saved: Any, new: Any) -> bool:
    """Whether a resumed run may change ``key`` from ``saved`` to ``new`` (``RESUME_SAFE``), but
    never who teaches: ``teacher=self`` and its settings (the student teaches itself) against a
    teacher model served one way or another."""
    if key.endswith(("teacher.weights", "teacher.context")):
        return False
    if key.endswith("teacher._target_") and any(str(value).endswith(SELF_TEACHER) for value in (saved, new)):
        return False
    return any(fnmatchcase(key, safe) for safe in RESUME_SAFE)


@cache
def schema_defaults() -> dict[str, Any]:
    """Every setting of ``RunConfig`` with a default, flattened (``model.lora.r``: 0)."""
    return _flatten(OmegaConf.to_container(OmegaConf.structured(RunConfig), throw_on_missing=False))


def with_precision(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with its training precision resolved (``resolve_precision``), so that null and the
    value it resolves to compare equal; a run saved before ``trainer.precision`` existed trained a
    bfloat16 student in pure bf16."""
    trainer, dtype = config.setdefault("trainer", {}), config.get("model", {}).get("dtype", "float32")
    if "precision" not in trainer:
        trainer["precision"] = "bf16" if dtype == "bfloat16" else "fp32"
    elif trainer["precision"] is None and dtype != "float16":
        trainer["precision"] = resolve_precision(None, dtype)
    return config


def _flatten(node: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in node.items():
        if isinstance(value, Mapping):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def register_schema() -> None:
    """The schemas of the two entry configs: ``conf/config.yaml`` (train) and ``conf/eval.yaml``."""
    from hydra.core.config_store import ConfigStore  # Hydra: only for the commands that compose (not `opdx table`)

    ConfigStore.instance().store(name="base_config", node=RunConfig)
    ConfigStore.instance().store(name="base_eval_config", node=EvalRunConfig)
