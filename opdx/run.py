"""A run's configuration checked and built, and its start-up: the one place `opdx train` and
`opdx eval` turn a composed Hydra config into working parts.

``validate`` runs before any model loads: a typo or a value out of range fails in a second with
a message naming it and the valid choices, and what it returns holds the built divergence,
estimator and benchmark. ``start`` then sets threads and seed, loads the benchmark's data (a
data error fails before minutes of model loading), builds a local pair on first use, and loads
the student, its tokenizer and the rollout and teacher backends (a teacher per component, each
distinct one built once; several behind a ``RoutedTeacher``).
"""

from __future__ import annotations

import heapq
import inspect
import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from opdx.backends import Sampler, Teacher
from opdx.backends.routing import RoutedTeacher
from opdx.benchmarks import Benchmark, Problem, Subset, build_benchmark
from opdx.compat import PairError
from opdx.config import (
    ConfigError,
    EvalRunConfig,
    ModelConfig,
    RunConfig,
    SetupConfig,
    check,
    resolve_precision,
    typed,
    upgrade,
)
from opdx.dist import Ranks, init
from opdx.divergences import Divergence, build_divergence
from opdx.lora import add_adapters, has_adapters
from opdx.metrics import LOGGERS
from opdx.models import check_teacher_tokenizer, load_model, load_tokenizer, resolve_device, stop_ids
from opdx.objective import Estimator, build_estimator
from opdx.pairs import ensure_built
from opdx.plan import Plan, plan_run
from opdx.prompts import encode_prompts
from opdx.rollout import SamplingParams


@dataclass
class Setup:
    """A validated ``opdx eval`` config (or the part of a run both commands share) and the objects
    built from it: the benchmark and the sampling parameters."""

    config: SetupConfig
    benchmark: Benchmark
    sampling: SamplingParams


@dataclass
class Run(Setup):
    """A validated ``opdx train`` config and the objects built from it."""

    config: RunConfig
    divergence: Divergence
    estimator: Estimator


SUPPORT_NEEDS = {"sampled": "log-probs of the sampled tokens", "topk": "top-k log-probs", "full": "full logits"}


def validate(cfg: DictConfig) -> Run:
    """The composed ``opdx train`` config as typed objects, every name checked against its
    registry; raises ConfigError with the bad value and the valid choices."""
    config = typed(RunConfig, upgrade(plain_config(cfg)), "config")
    config.trainer.precision = resolve_precision(config.trainer.precision, config.model.dtype)
    check(
        config.logger.name in LOGGERS,
        f"logger={config.logger.name!r} is unknown; valid loggers: {', '.join(LOGGERS)}",
    )
    setup = validate_setup(config)
    try:
        divergence = build_divergence(config.divergence)
        estimator = build_estimator(config.estimator, setup.sampling.is_plain, config.runtime.dense_chunk)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    check(
        config.trainer.max_staleness is None or backend_memory(config.rollout) == "remote",
        f"trainer.max_staleness={config.trainer.max_staleness} samples ahead while the trainer trains, which needs a "
        f"sampler in another process: rollout=server, not {config.rollout['_target_']}",
    )
    needed = estimator.teacher_support
    for key, (_, node) in teacher_nodes(config, setup.benchmark).items():
        supports = getattr(get_object(node["_target_"]), "supports", ("sampled", "topk", "full"))
        baseline = estimator.config.state_baseline
        what, instead = (
            ("estimator.state_baseline", "estimator.state_baseline=false")
            if baseline
            else (f"estimator.support={needed}", f"estimator.support={supports[-1]}")
        )
        check(
            needed in supports,
            f"{what} needs the teacher's {SUPPORT_NEEDS[needed]}, and {key}._target_={node['_target_']} scores only "
            f"the supports {', '.join(supports)} (a server returns the log-probs of given tokens and its top-k, not "
            f"full logits). Use a local teacher (teacher=hf) or {instead}",
        )
    return Run(config, setup.benchmark, setup.sampling, divergence, estimator)


def validate_eval(cfg: DictConfig) -> Setup:
    """The composed ``opdx eval`` config as typed objects; ConfigError as ``validate``."""
    return validate_setup(typed(EvalRunConfig, upgrade(plain_config(cfg)), "config"))


def plain_config(cfg: DictConfig) -> dict[str, Any]:
    """A composed config without its ``hydra`` node, as a plain nested dict (unresolved)."""
    container = OmegaConf.to_container(cfg)
    container.pop("hydra", None)
    return container


def validate_setup(config: SetupConfig) -> Setup:
    """The benchmark and sampling of a typed config; its backends' ``_target_`` and options checked."""
    s = config.sampling
    check_backend(config.rollout, "rollout")
    benchmark = build_benchmark(config.benchmark)
    for key, (_, node) in teacher_nodes(config, benchmark).items():
        check_backend(node, key)
    return Setup(config, benchmark, SamplingParams(s.temperature, s.top_k, s.top_p))


def teacher_nodes(config: SetupConfig, benchmark: Benchmark) -> dict[str, tuple[ModelConfig, dict[str, Any]]]:
    """The teachers a run loads, one per component, by the config key that sets it (``teacher``,
    or in a mixture ``benchmark.components.<name>.teacher``): the pair it loads with (``model``
    with the component's ``teacher_model``) and its backend node (the component's, else the run's)."""
    nodes = {}
    for component in benchmark.components:
        pair = replace(config.model, teacher=component.teacher_model or config.model.teacher)
        nodes[component.teacher_key] = (pair, component.teacher or config.teacher)
    return nodes


def check_backend(node: Mapping[str, Any], group: str) -> None:
    """A backend node names an importable ``_target_`` that takes its options."""
    options = {key: value for key, value in node.items() if key != "_target_"}
    try:
        factory = get_object(node["_target_"])
        inspect.signature(factory).bind_partial(**options)
    except KeyError:
        raise ConfigError(f"{group}: no _target_ naming its backend class (conf/{group}/*.yaml)") from None
    except (ImportError, AttributeError, ValueError) as error:
        raise ConfigError(f"{group}._target_={node['_target_']!r} cannot be loaded: {error}") from None
    except TypeError as error:
        raise ConfigError(f"{group}: {error}") from None


def build_backend(node: Mapping[str, Any], **runtime: Any) -> Any:
    """The backend ``node`` names, built from its options and those of the ``runtime`` objects
    (models, tokenizer, device) its factory takes."""
    options = {key: value for key, value in node.items() if key != "_target_"}
    factory = get_object(node["_target_"])
    takes = inspect.signature(factory).parameters
    return factory(**options, **{name: value for name, value in runtime.items() if name in takes})


def build_teachers(
    setup: Setup, tokenizer: PreTrainedTokenizerBase, device: torch.device, stops: list[int], student: PreTrainedModel
) -> dict[str, Teacher]:
    """Each component's teacher backend by component name, its answers ending at ``stops``; each
    distinct (model, dtype, backend node) is built once and shared by the components that name it.
    A factory that takes them also gets the ``student`` and the benchmark (``teacher=self``)."""
    logprob_chunk = setup.config.runtime.logprob_chunk
    runtime = {"tokenizer": tokenizer, "device": device, "logprob_chunk": logprob_chunk, "stop_ids": stops}
    runtime |= {"student": student, "benchmark": setup.benchmark}
    components = setup.benchmark.components
    groups: dict[str, tuple[ModelConfig, dict[str, Any], list[str]]] = {}  # one per (model, dtype, backend node)
    for component, (pair, node) in zip(components, teacher_nodes(setup.config, setup.benchmark).values(), strict=True):
        key = json.dumps([pair.teacher, pair.teacher_dtype, node], sort_keys=True)
        groups.setdefault(key, (pair, node, []))[2].append(component.name)
    teachers: dict[str, Teacher] = {}
    for pair, node, names in groups.values():
        if len(components) > 1:
            print(f"teacher of {', '.join(names)}: {pair.teacher} ({node['_target_']})")
        if pair.teacher != setup.config.model.teacher:
            check_teacher_tokenizer(tokenizer, pair.teacher)  # model.teacher's was checked by load_tokenizer
        teachers |= dict.fromkeys(names, build_backend(node, pair=pair, **runtime))
    return teachers


def one_teacher(teachers: Mapping[str, Teacher]) -> Teacher:
    """The run's teacher: the one backend all components share, else a ``RoutedTeacher`` that
    scores each row with its component's."""
    distinct = {id(teacher) for teacher in teachers.values()}
    return next(iter(teachers.values())) if len(distinct) == 1 else RoutedTeacher(teachers)


@dataclass
class Parts:
    """What a started run works with: the trainable student, its tokenizer, the sampler of its
    rollouts, the teacher (``one_teacher``) and each component's teacher by component name."""

    student: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    rollout: Sampler
    teacher: Teacher
    teachers: dict[str, Teacher]
    device: torch.device
    ranks: Ranks


def start(setup: Setup) -> Parts:
    """Ranks (torchrun), threads, seed and device; the benchmark's data (the train split too for a
    training ``Run``), before any model; a locally built pair on first use; then the student, the
    tokenizer and the backends, and the checks of the inputs against them."""
    config, runtime, train = setup.config, setup.config.runtime, isinstance(setup, Run)
    ranks = init()
    check(
        ranks.world == 1 or not train or setup.config.trainer.strategy != "none",
        f"torchrun started {ranks.world} processes but trainer.strategy=none: give trainer.strategy=ddp "
        "(a replica of the student per rank) or fsdp2 (the student sharded over the ranks)",
    )
    t = setup.config.trainer if train else None
    check(
        t is None or ranks.world == 1 or t.prompts_per_step % ranks.world == 0
        or (t.micro_batch_size is None and t.rollout_batch_size is None),
        f"trainer.micro_batch_size and trainer.rollout_batch_size under torchrun need the same number of sequences "
        f"on every rank: give trainer.prompts_per_step a multiple of the {ranks.world} ranks",
    )  # fmt: skip
    if runtime.threads:
        torch.set_num_threads(runtime.threads)
    device = resolve_device(runtime.device, ranks.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(config.seed)
    components = setup.benchmark.components
    for component in components:
        counts = [f"{len(component.train)} train prompts"] if train else []
        weight = f" (weight {component.weight:.3g})" if len(components) > 1 else ""
        print(f"{component.name}: {', '.join([*counts, f'{len(component.eval)} eval problems'])}{weight}")
    ensure_built(config.model)
    tokenizer = load_tokenizer(config.model)
    if train:
        fill_plan(setup, memory_plan(setup, device, ranks.world, longest_prompt(setup, tokenizer)))
    student = load_model(config.model.student, weights_dtype(setup), device, tokenizer, trainable=True)
    check(
        not (train and has_adapters(student)),
        f"model.student={config.model.student} is a LoRA adapter directory, which loads frozen: train from its run's "
        "merged model (student_merged/, model.lora.save_merged=true) or from the base with model.lora.r",
    )
    if config.model.lora.r and not has_adapters(student):  # a LoRA run's saved student/ (opdx eval) brings its own
        add_adapters(student, config.model.lora)
    stops = stop_ids(
        config.model, tokenizer, [pair.teacher for pair, _ in teacher_nodes(config, setup.benchmark).values()]
    )
    rollout = build_backend(
        config.rollout, model=student, tokenizer=tokenizer, stop_ids=stops, compute_dtype=config.model.dtype
    )
    teachers = build_teachers(setup, tokenizer, device, stops, student)
    torch.manual_seed(config.seed)  # an engine backend may have reseeded the process (vLLM seeds its own)
    parts = Parts(student, tokenizer, rollout, one_teacher(teachers), teachers, device, ranks)
    fit_prompts(setup, parts, train)
    return parts


PROMPTS_MEASURED = 64  # the longest prompts by characters, of which the planner takes the longest in tokens


def longest_prompt(setup: Setup, tokenizer: PreTrainedTokenizerBase | None) -> int:
    """The longest prompt in tokens, for the planner: ``plan.prompt_tokens``, else the longest, as
    the student's ``tokenizer`` renders them, of the ``PROMPTS_MEASURED`` train and eval prompts
    with the most characters (system message and tool schemas included), else (no tokenizer) 512."""
    if setup.config.plan.prompt_tokens:
        return setup.config.plan.prompt_tokens
    if tokenizer is None:
        return 512
    problems = [
        problem
        for c in setup.benchmark.components
        for problem in [*c.benchmark.train, *c.benchmark.eval[: setup.config.eval.problems]]
    ]
    longest = heapq.nlargest(
        PROMPTS_MEASURED, problems, key=lambda p: len(p.prompt) + len(p.system or "") + len(str(p.tools or ""))
    )
    return max((len(ids) for ids in encode_prompts(tokenizer, longest)), default=1)


def backend_memory(node: Mapping[str, Any]) -> str:
    """Where a backend's model holds memory: its class's or factory's ``memory`` (``opdx.backends``:
    ``remote``, ``student``), else local."""
    return getattr(get_object(node["_target_"]), "memory", "local")


def memory_plan(run: Run, device: torch.device, world: int, prompt_tokens: int, notes: list[str] | None = None) -> Plan:
    """The memory plan of ``run`` (``opdx.plan.plan_run``) with its backends' placement and the
    local teachers (a mixture's distinct ones; ``model.teacher_config`` for ``model.teacher``). A
    teacher whose memory is the ``student``'s (``teacher=self``) adds a frozen copy of it only with
    ``weights: initial`` and no LoRA base to share."""
    model = run.config.model
    teachers: dict[str, dict[str, Any] | None] = {}
    for pair, node in teacher_nodes(run.config, run.benchmark).values():
        placement = backend_memory(node)
        if placement == "local":
            teachers[pair.teacher] = model.teacher_config if pair.teacher == model.teacher else None
        elif placement == "student" and node.get("weights") == "initial" and not model.lora.r:
            teachers[model.student] = model.student_config
    rollout = backend_memory(run.config.rollout)
    dense = run.estimator.needs_dense
    return plan_run(run.config, device, world, prompt_tokens, dense, rollout, teachers, notes)


def fill_plan(run: Run, plan: Plan) -> None:
    """Refuse (ConfigError, with the plan) a run that cannot fit; else set ``auto`` micro-batches
    and an eval batch lowered to fit, and say what was chosen."""
    if not plan.fits:
        raise ConfigError(
            "the run does not fit in memory (opdx plan prints this with the same overrides):\n  "
            + "\n  ".join(plan.lines())
            + "\nLower trainer.micro_batch_size or trainer.rollout_batch_size (or set them to auto), "
            "trainer.prompts_per_step, "
            "sampling.max_new_tokens or eval.batch_size; turn on trainer.gradient_checkpointing; or set "
            "plan.gpu_memory_gib to the device's real size"
        )
    t, e = run.config.trainer, run.config.eval
    chosen = []
    for key, size, name in [
        ("micro_batch_size", plan.micro_batch_size, "micro-batch"),
        ("rollout_batch_size", plan.rollout_batch_size, "rollout batch"),
    ]:
        if getattr(t, key) == "auto":
            setattr(t, key, None if size >= plan.rows else size)
            chosen.append(f"{name} {size if size < plan.rows else 'the whole batch'}")
    if plan.eval_batch_size < e.batch_size:
        chosen.append(f"eval.batch_size {e.batch_size} -> {plan.eval_batch_size}")
        e.batch_size = plan.eval_batch_size
    print(f"memory plan: {plan.lines()[-1]}" + (f"; {', '.join(chosen)}" if chosen else ""))


def weights_dtype(setup: Setup) -> str:
    """The dtype the student's weights load in: float32 master weights under
    ``trainer.precision=bf16-mixed``, else its compute dtype ``model.dtype``."""
    mixed = isinstance(setup, Run) and setup.config.trainer.precision == "bf16-mixed"
    return "float32" if mixed else setup.config.model.dtype


def fit_prompts(setup: Setup, parts: Parts, train: bool) -> None:
    """Check that every prompt plus its new tokens fits the student's and its component's teacher's
    positions (each with its own rendering); refuse (PairError) or, with ``runtime.drop_long_prompts``,
    leave the long ones out of the run's benchmark (of each component) and say how many."""
    several = len(setup.benchmark.components) > 1
    setup.benchmark = setup.benchmark.with_benchmarks(
        lambda c: fitted(setup, parts.rollout, parts.teachers[c.name], c.benchmark, train, f"{c.name} " * several)
    )


def fitted(
    setup: Setup, student: Sampler, teacher: Teacher, benchmark: Benchmark, train: bool, label: str = ""
) -> Benchmark:
    """``benchmark``, or a ``Subset`` of it without the prompts too long for the student's or the
    teacher's backend (``fit_prompts``); ``label`` names it in messages."""
    e, new_tokens = setup.config.eval, setup.config.sampling.max_new_tokens
    splits = {"eval": (benchmark.eval[: e.problems], e.max_new_tokens or new_tokens)}
    if train:
        splits["train"] = (benchmark.train, new_tokens)
    kept: dict[str, list[Problem]] = {"train": [], "eval": []}
    for split, (problems, new_tokens) in splits.items():
        long: set[int] = set()
        for role, backend in (("student", student), ("teacher", teacher)):
            lengths = [len(ids) for ids in backend.prompt_ids(problems)]
            over = {i for i, length in enumerate(lengths) if length + new_tokens > backend.context}
            if over and not setup.config.runtime.drop_long_prompts:
                raise PairError(
                    f"{len(over)} of {len(problems)} {label}{split} prompts do not fit the {role}: prompt + "
                    f"{new_tokens} new tokens exceed its {backend.context} positions (the longest prompt has "
                    f"{max(lengths)} tokens). Lower the new tokens, use shorter prompts, or leave them out with "
                    "runtime.drop_long_prompts=true"
                )
            long |= over
        kept[split] = [problem for i, problem in enumerate(problems) if i not in long]
        if long:
            too_long = f"{label}{split} prompts longer than the models' positions allow"
            print(f"left out {len(long)} of {len(problems)} {too_long}")
        if not kept[split]:
            raise PairError(f"no {label}{split} prompt fits the models' positions with {new_tokens} new tokens")
    if any(len(kept[split]) < len(problems) for split, (problems, _) in splits.items()):
        return Subset(benchmark, kept["train"], kept["eval"])
    return benchmark
