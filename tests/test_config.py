from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from opdx.backends import Sampler, Teacher
from opdx.benchmarks import BENCHMARKS
from opdx.config import (
    CONF_DIR,
    ESTIMATOR_ALIASES,
    ConfigError,
    RunConfig,
    load_option,
    register_resolvers,
    register_schema,
)
from opdx.divergences import DIVERGENCES
from opdx.metrics import LOGGERS
from opdx.objective import ESTIMATORS
from opdx.pairs import PAIRS
from opdx.run import start, validate

REGISTRIES = {
    "divergence": DIVERGENCES,
    "estimator": ESTIMATORS,
    "benchmark": BENCHMARKS,
    "logger": LOGGERS,
}
BACKENDS = {"rollout": Sampler, "teacher": Teacher}

register_schema()
register_resolvers()


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def stems(group: str) -> set[str]:
    return {p.stem for p in (CONF_DIR / group).glob("*.yaml")}


@pytest.mark.parametrize("group", list(REGISTRIES))
def test_config_group_files_mirror_the_registry(group):
    aliases = ESTIMATOR_ALIASES if group == "estimator" else {}
    assert stems(group) == set(REGISTRIES[group]) | set(aliases), f"conf/{group} vs registry"
    for stem in stems(group):
        assert (CONF_DIR / group / f"{stem}.yaml").read_text().startswith("# opdx "), "the command comes first"
        option = load_option(group, stem)
        assert {k: option.get(k) for k in aliases[stem]} == aliases[stem] if stem in aliases else option["name"] == stem


def test_every_pair_built_here_has_a_model_file_and_every_model_file_names_itself():
    assert set(PAIRS) <= stems("model")
    assert all(load_option("model", stem)["name"] == stem for stem in stems("model"))


# rollout=vllm needs vLLM and a student it can load (tests/backends/test_vllm.py), rollout=server
# too (tests/backends/test_student_server.py), teacher=server a server (tests/backends/test_server.py)
OWN_TESTS = {"rollout=vllm", "rollout=server", "teacher=server"}


@pytest.mark.parametrize(
    "override",
    [f"{group}={stem}" for group in BACKENDS for stem in sorted(stems(group)) if f"{group}={stem}" not in OWN_TESTS],
)
def test_backend_files_build_an_object_of_their_interface(override):
    parts = start(validate(composed(override, "runtime.threads=1")))
    assert isinstance(parts.rollout, Sampler) and isinstance(parts.teacher, Teacher)


@pytest.mark.parametrize(
    "override",
    [f"{group}={name}" for group in REGISTRIES for name in REGISTRIES[group]]
    + [f"model={stem}" for stem in sorted(stems("model"))],
)
def test_every_yaml_composes_and_validates(override):
    run = validate(composed(override))
    assert isinstance(run.config, RunConfig)
    group, name = override.split("=")
    built = {"divergence": run.divergence, "estimator": run.estimator, "benchmark": run.benchmark}
    assert (built[group] if group in built else getattr(run.config, group)).name == name


def test_default_choices_and_user_facing_names():
    run = validate(composed("seed=3", "trainer.steps=7", "trainer.lr=0.01", "estimator.gamma=0.5"))
    assert (run.config.model.name, run.divergence.name, run.estimator.name, run.benchmark.name) == (
        "tiny",
        "forward_kl",
        "unbiased",
        "arith",
    )
    config = run.config
    assert (config.seed, config.trainer.steps, config.trainer.lr, config.estimator.gamma) == (3, 7, 0.01, 0.5)
    assert Path(config.model.teacher, "config.json").exists()
    run = validate(composed("divergence=alpha", "divergence.alpha=0.3"))
    assert run.config.divergence["alpha"] == 0.3 and run.divergence.description.endswith("alpha=0.3")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["estimator.gamma=2"], r"estimator.gamma=2.0 is invalid; gamma must lie in \[0, 1\]"),
        (["divergence=alpha", "divergence.alpha=1"], "alpha divergence needs a finite alpha not equal to 0 or 1"),
        (["+divergence.alpha=0.3"], "'forward_kl' takes no parameters"),
        (["trainer.schedule=step"], "valid: constant, cosine, linear"),
        (["trainer.steps=0"], "trainer.steps=0 is invalid"),
        (["benchmark.max_terms=x"], "max_terms"),
        (["+benchmark.difficulty=3"], "difficulty"),
        (["model.dtype=fp8"], "valid dtypes: float32, bfloat16"),
        (["estimator=analytic", "estimator.whiten=true"], "do not apply to it"),
        (["estimator.support=dense"], "estimator.support='dense' is invalid; valid: sampled, topk, full"),
        (
            ["estimator.state_baseline=true", "estimator.whiten=true"],
            "state_baseline centres .* without batch_baseline",
        ),
        (["estimator=analytic", "estimator.state_baseline=true"], "goes with estimator.support=sampled"),
        (["estimator.rollout_correction=is"], "valid: null, tis, ppo, per_decision"),
        (
            ["estimator.rollout_correction=per_decision", "estimator.state_baseline=true"],
            "per_decision weighs each reward.*no longer unbiased",
        ),
        (["estimator.rollout_correction=per_decision", "estimator.batch_baseline=true"], "per_decision weighs"),
        (["estimator.rollout_correction=per_decision", "estimator.support=full"], "rollout_correction do not apply"),
        (["benchmark.eval_size=ten"], "benchmark.eval_size: Value 'ten'.*could not be converted to Integer"),
        (["rollout._target_=opdx.backends.hf.NoSuchSampler"], "rollout._target_=.*cannot be loaded"),
        (["+teacher.temperature=0.5"], "teacher: got an unexpected keyword argument 'temperature'"),
        (["logger.samples=-1"], r"logger.samples=-1 is invalid; use 0 \(none\) or more"),
        (["logger.samples_every=0"], "logger.samples_every=0 is invalid; use a positive number of steps or null"),
        (["trainer.probe_every=0"], "trainer.probe_every=0 is invalid; use a positive number of steps or null"),
    ],
)
def test_bad_values_fail_validation_with_a_clear_message(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(composed(*overrides))


def test_a_key_a_divergence_does_not_have_fails_while_composing():
    with pytest.raises(Exception, match="divergence.alpha"):
        composed("divergence.alpha=0.3")


def test_bad_type_fails_while_composing():
    with pytest.raises(Exception, match="trainer.lr=abc") as error:
        composed("trainer.lr=abc")
    assert "could not be converted to Float" in str(error.value.__cause__)


def test_cli_rejects_bad_input_before_loading_models(opdx_cli, tmp_path):
    result = opdx_cli("train", "divergence=jsd", f"hydra.run.dir={tmp_path}", check=False)
    assert result.returncode != 0
    assert "Could not find 'divergence/jsd'" in result.stderr and "forward_kl" in result.stderr
    result = opdx_cli("train", "estimator.gamma=2", f"hydra.run.dir={tmp_path}", check=False)
    assert result.returncode != 0
    assert "gamma must lie in [0, 1]" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def test_hydra_flags_work(opdx_cli):
    job = OmegaConf.create(opdx_cli("train", "--cfg", "job", "divergence=js").stdout)
    assert job.divergence.name == "js" and job.estimator.name == "unbiased"
    assert "divergence: alpha, forward_kl" in opdx_cli("train", "--help").stdout


def test_a_real_model_brings_its_trainer_and_eval_sizes_and_the_command_line_wins():
    run = validate(composed("model=smollm2_135m", "benchmark=bfcl")).config
    assert (run.trainer.lr, run.trainer.prompts_per_step, run.sampling.max_new_tokens) == (1e-5, 8, 96)
    assert (run.eval.problems, run.eval.n, run.trainer.steps) == (20, 2, 1000)
    run = validate(composed("model=smollm2_135m", "trainer.lr=3e-5", "eval.n=4", "trainer.steps=3")).config
    assert (run.trainer.lr, run.eval.n, run.trainer.steps, run.trainer.prompts_per_step) == (3e-5, 4, 3, 8)
    assert validate(composed()).config.trainer.lr == 1e-3  # the tiny default keeps the schema's default
    assert validate(composed("model=qwen3_8b_to_1p7b_base")).config.model.dtype == "bfloat16"


def test_eval_run_reapplies_the_run_settings_but_not_its_training_nor_a_switched_group(tmp_path):
    from opdx.cli import eval_run_overrides

    (tmp_path / ".hydra").mkdir()
    saved = ["benchmark=gsm8k", "benchmark.path=x.jsonl", "trainer.lr=0.1", "trainer.temperature=0.5", "seed=3"]
    saved += ["runtime.threads=1", "eval.run=old", "trainer.resume=old"]
    (tmp_path / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in saved))
    args = eval_run_overrides(tmp_path, [f"eval.run={tmp_path}", "eval.n=2"])
    kept = ["sampling.temperature=0.5", "seed=3", "runtime.threads=1"]  # an old name under its new one
    assert args == ["benchmark=gsm8k", "benchmark.path=x.jsonl", *kept, f"eval.run={tmp_path}", "eval.n=2"]
    switched = eval_run_overrides(tmp_path, [f"eval.run={tmp_path}", "benchmark=math500"])
    assert switched == [*kept, f"eval.run={tmp_path}", "benchmark=math500"]
    with pytest.raises(SystemExit, match="is not a run directory"):
        eval_run_overrides(tmp_path / "nothing", [])


def test_old_names_of_moved_settings_still_work_and_say_their_new_name(capsys, monkeypatch):
    from opdx.config import RENAMED, upgrade

    monkeypatch.setattr("opdx.config._warned", set())  # as in a fresh process

    run = validate(composed("trainer.temperature=0.7", "trainer.max_new_tokens=12", "runtime.device=cpu"))
    assert (run.config.sampling.temperature, run.config.sampling.max_new_tokens) == (0.7, 12)
    assert run.sampling.temperature == 0.7 and run.config.trainer.temperature is None
    err = capsys.readouterr().err
    assert err.count("trainer.temperature is now sampling.temperature") == 1
    validate(composed("trainer.temperature=0.6"))
    assert "trainer.temperature" not in capsys.readouterr().err  # once per process
    saved = {"trainer": {"max_new_tokens": 32, "threads": 1}}  # a run saved before the move
    assert upgrade(saved, warn=False) == {
        "trainer": {"max_new_tokens": None, "threads": None},
        "sampling": {"max_new_tokens": 32},
        "runtime": {"threads": 1},
    }
    assert all(new.split(".")[0] in ("sampling", "runtime") for new in RENAMED.values())
    old_analytic = upgrade({"estimator": {"name": "analytic", "token_mean": True}})
    assert old_analytic == {"estimator": {"name": "unbiased", "support": "full", "token_mean": True}}
    assert "estimator=analytic is now estimator=unbiased estimator.support=full" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="set one setting twice"):  # the old name would silently win
        validate(composed("trainer.max_new_tokens=12", "sampling.max_new_tokens=30"))


def test_a_resume_compares_the_resolved_precision_and_earlier_runs_trained_pure_bf16():
    from opdx.config import resume_conflicts

    earlier = {"model": {"dtype": "bfloat16"}, "trainer": {"steps": 1}}  # saved before trainer.precision
    now = {"model": {"dtype": "bfloat16"}, "trainer": {"steps": 1, "precision": None}}
    assert resume_conflicts(earlier, now) == ["trainer.precision: bf16 -> bf16-mixed"]
    assert resume_conflicts(now, {**now, "trainer": {"steps": 1, "precision": "bf16-mixed"}}) == []


def test_eval_has_its_own_entry_config_without_the_trainer_settings():
    from opdx.run import validate_eval

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=["model=smollm2_135m", "sampling.top_p=0.9"])
    assert "divergence" not in cfg and "estimator" not in cfg and "logger" not in cfg
    setup = validate_eval(cfg)
    assert setup.config.sampling.max_new_tokens == 96 and setup.sampling.top_p == 0.9  # the model file's length
    assert setup.benchmark.name == "arith"


def test_resume_conflicts_name_what_changes_a_run_and_allow_the_rest():
    from opdx.config import resume_conflicts

    saved = OmegaConf.to_container(composed(), resolve=True)
    safe = composed("trainer.steps=5000", "eval.n=0", "logger=wandb", "runtime.threads=1", "trainer.eval_every=7")
    assert resume_conflicts(saved, OmegaConf.to_container(safe, resolve=True)) == []
    changed = composed(
        "divergence=alpha", "estimator=stopgrad", "benchmark.max_terms=4", "seed=1", "model=smollm2_135m"
    )
    conflicts = resume_conflicts(saved, OmegaConf.to_container(changed, resolve=True))
    assert "divergence.name: forward_kl -> alpha" in conflicts and "divergence.alpha: <unset> -> 0.5" in conflicts
    assert "estimator.name: unbiased -> stopgrad" in conflicts and "benchmark.max_terms: 3 -> 4" in conflicts
    assert "seed: 0 -> 1" in conflicts and "model.name: tiny -> smollm2_135m" in conflicts
    assert not any(c.startswith(("eval.", "logger.")) for c in conflicts)
    older = {**saved, "model": {k: v for k, v in saved["model"].items() if k != "lora"}}  # saved before model.lora
    assert resume_conflicts(older, OmegaConf.to_container(composed(), resolve=True)) == []
    with_lora = OmegaConf.to_container(composed("model.lora.r=8"), resolve=True)
    assert resume_conflicts(older, with_lora) == ["model.lora.r: <unset> -> 8"]
    assert resume_conflicts(saved, with_lora) == ["model.lora.r: 0 -> 8"]
    served = OmegaConf.to_container(composed("teacher=server", "teacher.url=http://127.0.0.1:1/v1"), resolve=True)
    assert resume_conflicts(saved, served) == []  # the same teacher served another way
    self_taught = resume_conflicts(saved, OmegaConf.to_container(composed("teacher=self"), resolve=True))
    assert "teacher._target_: opdx.backends.hf.load_teacher -> opdx.backends.hf.load_self_teacher" in self_taught
    assert "teacher.context: <unset> -> reference" in self_taught


def test_the_training_precision_follows_the_students_dtype_or_is_refused():
    from opdx.config import resolve_precision

    assert resolve_precision(None, "float32") == "fp32" and resolve_precision(None, "bfloat16") == "bf16-mixed"
    assert resolve_precision("bf16", "bfloat16") == "bf16" and resolve_precision(None, "float64") == "fp32"
    with pytest.raises(ConfigError, match="trainer.precision=bf16-mixed with model.dtype=float32"):
        resolve_precision("bf16-mixed", "float32")
    with pytest.raises(ConfigError, match="loss scaling"):
        resolve_precision(None, "float16")
    assert validate(composed("model=qwen3_1p7b_to_0p6b_base")).config.trainer.precision == "bf16-mixed"
    assert validate(composed()).config.trainer.precision == "fp32"
