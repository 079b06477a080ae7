"""benchmark=mixture: the components, their weighted draws, per-component eval and the config."""

import math
from collections import Counter

import pytest
from conftest import FAST_TRAIN
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from opdx.backends.hf import HFModel
from opdx.benchmarks import Mixture, Subset, build_benchmark
from opdx.compat import PairError
from opdx.config import (
    CONF_DIR,
    ConfigError,
    EvalConfig,
    asset_path,
    load_option,
    register_resolvers,
    register_schema,
    resume_conflicts,
)
from opdx.evaluation import evaluate_split
from opdx.metrics import read_metrics
from opdx.models import load_model, load_tokenizer_of
from opdx.pairs.tiny import TinyLMSpec, build_char_tokenizer, build_tiny_llama
from opdx.rollout import PLAIN_SAMPLING
from opdx.run import start, teacher_nodes, validate
from opdx.step_metrics import eval_metrics
from opdx.trainer import prompts_for_step

register_schema()
register_resolvers()


def mixture(arith_weight: float = 0.25, products_weight: float = 0.75, **components) -> Mixture:
    """A small arith + products mixture (conf/benchmark/mixture.yaml's components, fewer problems)."""
    node = {
        "name": "mixture",
        "components": {
            "arith": {"benchmark": {**load_option("benchmark", "arith"), "train_size": 300, "eval_size": 40},
                      "weight": arith_weight},
            "products": {"benchmark": {**load_option("benchmark", "products"), "train_size": 300, "eval_size": 40},
                         "weight": products_weight},
            **components,
        },
    }  # fmt: skip
    return build_benchmark(node)


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_problems_carry_their_component_and_are_scored_by_its_verifier():
    bench = mixture()
    assert {p.source for p in bench.components[0].train} == {"arith"}
    assert {p.source for p in bench.eval} == {"arith", "products"} and len(bench.eval) == 80
    product = bench.components[1].eval[0]
    assert "*" in product.prompt and bench.score(product, f"x={product.answer}") == 1.0
    assert bench.score(product, "x=1") == 0.0
    assert bench.weights == {"arith": 0.25, "products": 0.75}


def test_draws_follow_the_weights_and_are_a_function_of_seed_and_step():
    bench = mixture()
    draws = [prompts_for_step(bench, seed=0, step=step, count=64) for step in range(200)]
    share = Counter(p.source for step in draws for p in step)["arith"] / (200 * 64)
    assert abs(share - 0.25) < 0.015  # 12,800 draws: 4 standard errors is 0.015
    assert prompts_for_step(bench, seed=0, step=7, count=64) == draws[7]
    assert prompts_for_step(bench, seed=1, step=7, count=64) != draws[7]
    assert draws[8] != draws[7]
    seen = {p.prompt for step in draws for p in step if p.source == "products"}
    assert len(seen) > 0.9 * len(bench.components[1].train)  # uniform within a component: nearly all drawn


@pytest.mark.parametrize(
    ("component", "message"),
    [
        ({"weight": 0.0}, "benchmark.components.arith.weight=0.0 is invalid"),
        ({"benchmark": {"name": "gsm9k"}}, "benchmark.components.arith.benchmark='gsm9k' is unknown"),
        ({"benchmark": {"name": "mixture", "components": {}}}, "a mixture cannot hold a mixture"),
    ],
)
def test_bad_components_are_refused_naming_the_key(component, message):
    arith = {"benchmark": load_option("benchmark", "arith"), "weight": 1.0, **component}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        mixture(arith=arith)


def test_a_component_name_with_a_slash_is_refused():
    with pytest.raises(ConfigError, match="must not contain '/'"):
        mixture(**{"a/b": {"benchmark": load_option("benchmark", "arith")}})


def test_eval_reports_each_component_and_their_weighted_mean():
    bench = mixture()
    tokenizer = load_tokenizer_of(asset_path("tiny/teacher"))
    teacher = HFModel(load_model(asset_path("tiny/teacher"), "float32", "cpu", tokenizer, trainable=False), tokenizer)
    result = evaluate_split(teacher, tokenizer, bench, EvalConfig(n=2, problems=30), PLAIN_SAMPLING, 32)
    assert set(result) == {f"{c}{m}" for c in ("", "arith/", "products/") for m in ("greedy_acc", "avg@2", "pass@2")}
    assert result["arith/greedy_acc"] > 0.7  # the arith teacher on its own task
    assert result["greedy_acc"] == pytest.approx(
        0.25 * result["arith/greedy_acc"] + 0.75 * result["products/greedy_acc"]
    )
    logged = eval_metrics(result, "mixture", "teacher/")
    assert logged["eval/arith/teacher/greedy_acc"] == result["arith/greedy_acc"]
    assert logged["eval/mixture/teacher/greedy_acc"] == result["greedy_acc"]


def test_the_config_composes_with_a_served_teacher_for_one_component():
    cfg_overrides = (
        "benchmark=mixture",
        "+teacher@benchmark.components.products.teacher=server",
        "benchmark.components.products.teacher.url=http://localhost:8000/v1",
    )
    run = validate(composed(*cfg_overrides))
    nodes = teacher_nodes(run.config, run.benchmark)
    arith_pair, arith_node = nodes["benchmark.components.arith.teacher"]
    products_pair, products_node = nodes["benchmark.components.products.teacher"]
    assert arith_node["_target_"] == "opdx.backends.hf.load_teacher" and arith_pair.teacher == asset_path(
        "tiny/teacher"
    )
    assert products_node["_target_"] == "opdx.backends.server.ServedTeacher"
    assert products_node["url"] == "http://localhost:8000/v1"
    assert products_pair.teacher == asset_path("tiny_products/teacher")
    analytic = composed(*cfg_overrides, "estimator=analytic")
    with pytest.raises(ConfigError, match="benchmark.components.products.teacher._target_=opdx.backends.server"):
        validate(analytic)


def test_resume_conflicts_name_a_changed_teacher_set_or_mixture_but_not_a_moved_server():
    def resolved(*overrides: str) -> dict:
        return OmegaConf.to_container(composed("benchmark=mixture", *overrides), resolve=True)

    saved, tiny_teacher = resolved(), asset_path("tiny/teacher")
    other_teacher = resolved(f"benchmark.components.products.teacher_model={tiny_teacher}")
    assert resume_conflicts(saved, other_teacher) == [
        f"benchmark.components.products.teacher_model: {asset_path('tiny_products/teacher')} -> {tiny_teacher}"
    ]
    reweighted = resolved("benchmark.components.arith.weight=0.7")
    assert resume_conflicts(saved, reweighted) == ["benchmark.components.arith.weight: 0.5 -> 0.7"]
    served = resolved(
        "+teacher@benchmark.components.products.teacher=server",
        "benchmark.components.products.teacher.url=http://localhost:8000/v1",
    )
    assert resume_conflicts(saved, served) == []  # the same teacher model, served: as teacher=server is


SMALL = (
    "benchmark.components.arith.benchmark.train_size=300",
    "benchmark.components.products.benchmark.train_size=300",
)


def test_each_distinct_teacher_is_loaded_once_and_checked_against_the_students_tokenizer(tmp_path):
    two = start(validate(composed("benchmark=mixture", *SMALL, "eval.problems=20")))
    assert two.teacher.distinct == [two.teachers["arith"], two.teachers["products"]]  # a RoutedTeacher over both
    assert two.teachers["products"].model.config.num_hidden_layers == 4
    same = f"benchmark.components.products.teacher_model={asset_path('tiny/teacher')}"
    one = start(validate(composed("benchmark=mixture", *SMALL, same, "eval.problems=20")))
    assert one.teacher is one.teachers["arith"] is one.teachers["products"]  # one shared teacher, no routing
    tokenizer = build_char_tokenizer("0123456789+-*=;")  # fewer characters: other ids
    build_tiny_llama(TinyLMSpec(32, 1, 2, 64, 0, 0.0), tokenizer, seed=0).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    other = f"benchmark.components.products.teacher_model={tmp_path}"
    with pytest.raises(PairError, match=f"{tmp_path}: teacher and student tokenizers differ"):
        start(validate(composed("benchmark=mixture", *SMALL, other, "eval.problems=20")))


def test_long_prompts_are_left_out_of_each_component_by_its_own_models(capsys):
    """56 new tokens leave 8 positions of the 64: every products prompt (<bos> + 6 characters)
    fits, arith prompts of 3 terms do not; the components keep their problems' sources."""
    overrides = ("sampling.max_new_tokens=56", "runtime.drop_long_prompts=true", "eval.problems=100")
    run = validate(composed("benchmark=mixture", *SMALL, *overrides))
    start(run)
    arith, products = run.benchmark.components
    assert 0 < len(arith.eval) < 100 and isinstance(arith.benchmark, Subset)
    assert not isinstance(products.benchmark, Subset) and len(products.eval) == 1000  # nothing left out: as built
    assert {p.source for p in arith.train + arith.eval} == {"arith"} and all(len(p.prompt) <= 7 for p in arith.eval)
    assert f"left out {100 - len(arith.eval)} of 100 arith eval prompts" in capsys.readouterr().out


@pytest.mark.slow
def test_a_mixture_run_logs_each_component_and_resume_refuses_another_teacher(opdx_cli, tmp_path):
    opdx_cli(
        "train", "benchmark=mixture", *SMALL, *FAST_TRAIN, "sampling.max_new_tokens=32", f"hydra.run.dir={tmp_path}"
    )
    records = read_metrics(tmp_path)
    first, trained = records[0], [r for r in records if "train/loss" in r]
    assert {"eval/arith/teacher/greedy_acc", "eval/products/teacher/greedy_acc", "eval/mixture/greedy_acc"} <= set(
        first
    )
    assert first["eval/products/teacher/greedy_acc"] > first["eval/products/greedy_acc"]
    shares = [r.get("rollout/arith/share", 0) + r.get("rollout/products/share", 0) for r in trained]
    assert all(share == pytest.approx(1.0) for share in shares)
    assert any("reward/products/token_mean" in r and "adv/arith/std" in r for r in trained)
    refused = opdx_cli(
        "train",
        f"trainer.resume={tmp_path}",
        f"benchmark.components.products.teacher_model={asset_path('tiny/teacher')}",
        check=False,
    )
    assert refused.returncode == 1 and "benchmark.components.products.teacher_model:" in refused.stderr


def test_a_self_teacher_in_a_mixture_sees_each_components_privileged_prompt_and_trains(opdx_cli, tmp_path):
    """teacher=self on a mixture: each problem gets its own component's privileged prompt, and the
    self-teachers (one per distinct teacher node: the products component names another teacher
    model, which a self-teacher does not load) score through the trainer's module."""
    from opdx.benchmarks import privileged

    bench = mixture()
    for component in bench.components:
        problem = component.eval[0]
        shown = privileged(bench, problem, "reference")
        assert shown == privileged(component.benchmark.benchmark, problem, "reference") and shown != problem
    overrides = ["benchmark=mixture", "teacher=self", "teacher.context=reference", *SMALL, *FAST_TRAIN]
    opdx_cli("train", *overrides, "sampling.max_new_tokens=32", f"hydra.run.dir={tmp_path}")
    trained = [r for r in read_metrics(tmp_path) if "train/loss" in r]
    assert all(math.isfinite(r["train/loss"]) for r in trained)
    assert any("reward/products/token_mean" in r for r in trained) and any(
        "reward/arith/token_mean" in r for r in trained
    )
