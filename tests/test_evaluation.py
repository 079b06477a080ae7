import itertools
import json
import math
import re
from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opdx.backends.hf import HFModel
from opdx.benchmarks import get_benchmark
from opdx.config import asset_path
from opdx.evaluation import evaluate, format_side_by_side, pass_at_k, pass_at_k_values
from opdx.rollout import decode_responses
from opdx.samples import read_samples


@pytest.fixture(scope="module")
def setup():
    """The arith benchmark and the tiny teacher and student as Hugging Face backends."""
    benchmark = get_benchmark("arith", train_size=200, eval_size=60)
    tokenizer = AutoTokenizer.from_pretrained(asset_path("tiny/student"))
    load = lambda role: HFModel(AutoModelForCausalLM.from_pretrained(asset_path(f"tiny/{role}")), tokenizer)  # noqa: E731
    return benchmark, load("teacher"), load("student"), tokenizer


def row(table: str, *cells: str) -> bool:
    """Whether a markdown table has a row of these cells (any padding)."""
    pattern = r"\|\s*" + r"\s*\|\s*".join(map(re.escape, cells)) + r"\s*\|"
    return any(re.fullmatch(pattern, line) for line in table.splitlines())


def test_greedy_accuracy_is_the_verifier_on_greedy_responses(setup):
    benchmark, teacher, _, tokenizer = setup
    problems = benchmark.eval[:60]
    metrics = evaluate(teacher, tokenizer, benchmark, problems, batch_size=25)
    responses = decode_responses(tokenizer, teacher.sample([p.prompt for p in problems], 1, 32, greedy=True))
    by_hand = sum(benchmark.score(p, r) for p, r in zip(problems, responses, strict=True)) / len(problems)
    assert metrics == {"greedy_acc": pytest.approx(by_hand)}
    assert metrics["greedy_acc"] > 0.75


def test_avg_at_n_and_reverse_kl_per_token(setup):
    benchmark, teacher, student, tokenizer = setup
    torch.manual_seed(0)
    problems = benchmark.eval[:30]
    metrics = evaluate(student, tokenizer, benchmark, problems, n_samples=3, teacher=teacher)
    assert set(metrics) == {"greedy_acc", "avg@3", "pass@2", "pass@3", "reverse_kl_per_token"}
    assert metrics["avg@3"] <= metrics["pass@2"] <= metrics["pass@3"] <= 1
    assert 0 <= metrics["avg@3"] <= 1 and round(metrics["avg@3"] * 90) == pytest.approx(metrics["avg@3"] * 90)
    assert metrics["reverse_kl_per_token"] > 0.5  # the weak student is far from the teacher
    self_kl = evaluate(student, tokenizer, benchmark, problems, n_samples=2, teacher=student)["reverse_kl_per_token"]
    assert abs(self_kl) < 1e-4


@pytest.mark.parametrize(
    ("n", "correct", "k"), [(5, 2, 1), (5, 2, 2), (5, 2, 3), (5, 2, 4), (8, 0, 3), (8, 8, 1), (6, 3, 6)]
)
def test_pass_at_k_is_the_chance_a_random_k_subset_holds_a_right_sample(n, correct, k):
    samples = [True] * correct + [False] * (n - correct)
    subsets = list(itertools.combinations(samples, k))
    by_enumeration = sum(any(s) for s in subsets) / len(subsets)
    assert pass_at_k(n, correct, k) == pytest.approx(by_enumeration, abs=1e-12)
    assert pass_at_k(n, correct, k) == pytest.approx(1 - math.comb(n - correct, k) / math.comb(n, k), abs=1e-12)


def test_pass_at_k_values_and_errors():
    assert pass_at_k_values(1) == [] and pass_at_k_values(4) == [2, 4]
    assert pass_at_k_values(8) == [2, 4, 8] and pass_at_k_values(6) == [2, 4, 6]
    with pytest.raises(ValueError, match="0 < k <= n"):
        pass_at_k(4, 1, 5)


def test_pass_at_k_from_sampled_scores(setup):
    """pass@n over the problems equals the fraction with at least one right sample."""
    benchmark, teacher, _, tokenizer = setup
    problems = benchmark.eval[:20]
    torch.manual_seed(1)
    metrics = evaluate(teacher, tokenizer, benchmark, problems, n_samples=4, progress=True)  # the bar changes nothing
    torch.manual_seed(1)
    teacher.sample(problems, 1, 32, greedy=True)  # the same RNG use as evaluate's greedy pass
    responses = decode_responses(tokenizer, teacher.sample(problems, 4, 32))
    scores = [[benchmark.score(p, r) for r in responses[4 * i : 4 * i + 4]] for i, p in enumerate(problems)]
    assert metrics["pass@4"] == pytest.approx(sum(any(s) for s in scores) / len(scores))
    assert metrics["avg@4"] == pytest.approx(sum(map(sum, scores)) / 80)


def test_side_by_side_table():
    table = format_side_by_side({"teacher": {"greedy_acc": 0.9, "avg@2": 0.8}, "student": {"greedy_acc": 0.25}})
    assert table.splitlines()[0].replace(" ", "") == "|metric|teacher|student|"
    assert row(table, "greedy_acc", "0.9000", "0.2500") and row(table, "avg@2", "0.8000", "-")


@pytest.mark.slow
def test_opdx_eval_of_a_trained_run_matches_its_own_evals(opdx_cli, tmp_path):
    """`opdx eval eval.run=DIR` re-applies the run's overrides and scores its saved student; greedy
    decoding is deterministic, so it reproduces the run's final and teacher greedy accuracy."""
    from conftest import FAST_TRAIN

    opdx_cli("train", *FAST_TRAIN, "seed=3", f"hydra.run.dir={tmp_path / 'run'}")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    result = opdx_cli("eval", f"eval.run={tmp_path / 'run'}", "eval.n=2", f"hydra.run.dir={tmp_path / 'eval'}")
    record = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert record["problems"] == 16 and record["n"] == 2 and record["benchmark"] == "arith"
    assert record["student"] == str(tmp_path / "run" / "student")
    assert record["results"]["student"]["greedy_acc"] == summary["final_eval"]["greedy_acc"]
    assert record["results"]["teacher"]["greedy_acc"] == summary["teacher_eval"]["greedy_acc"]
    assert {"avg@2", "pass@2", "reverse_kl_per_token"} <= set(record["results"]["student"])
    assert row(result.stdout, "metric", "teacher", "student")
    samples = read_samples(tmp_path / "eval")  # 4 rows of each model and kind, the teacher's without log u
    assert Counter((r["model"], r["kind"]) for r in samples) == {
        (model, kind): 4 for model in ("teacher", "student") for kind in ("greedy", "sampled")
    }
    assert all((r["log_u"] is None) == (r["model"] == "teacher" or r["kind"] == "greedy") for r in samples)
    assert f"sample texts: opdx samples {tmp_path / 'eval'}" in result.stdout
    shown = opdx_cli("samples", str(tmp_path / "eval"), "--model", "teacher", "--kind", "greedy")
    assert shown.stdout.count("-- step 0 eval greedy (teacher): score") == 4 and "student" not in shown.stdout
    base = opdx_cli("eval", "eval.problems=16", "eval.n=0", "samples=0", f"hydra.run.dir={tmp_path / 'base'}")
    assert not (tmp_path / "base" / "samples.jsonl").exists()
    initial = json.loads((tmp_path / "base" / "eval.json").read_text())["results"]["student"]
    assert initial == {"greedy_acc": summary["initial_eval"]["greedy_acc"]}, base.stdout
    missing = opdx_cli("eval", f"eval.run={tmp_path / 'nothing'}", check=False)
    assert missing.returncode != 0 and "not a run directory" in missing.stderr


@pytest.mark.slow
@pytest.mark.xdist_group("smollm2")  # one worker builds the smollm2_cache pair
def test_opdx_eval_and_train_on_real_weights_and_bfcl(opdx_cli, smollm2_cache, tmp_path):
    """SmolLM2 teacher vs its pruned student on BFCL simple, then an OPD+ step on BFCL prompts, whose
    16 new tokens cut every response: truncation, not collapse."""
    result = opdx_cli(
        "eval",
        "model=smollm2_135m",
        "benchmark=bfcl",
        "benchmark.categories=[simple]",
        "eval.problems=2",
        "eval.n=2",
        "eval.max_new_tokens=16",
        f"hydra.run.dir={tmp_path / 'eval'}",
    )
    record = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert record["model"] == "smollm2_135m" and record["problems"] == 2
    for role in ("teacher", "student"):
        assert set(record["results"][role]) >= {"greedy_acc", "avg@2", "pass@2"}
    assert record["results"]["student"]["reverse_kl_per_token"] > 0.1, result.stdout
    opdx_cli(
        "train",
        "model=smollm2_135m",
        "benchmark=bfcl",
        "benchmark.categories=[simple]",
        "trainer.steps=1",
        "trainer.prompts_per_step=2",
        "trainer.samples_per_prompt=2",
        "sampling.max_new_tokens=16",
        "trainer.eval_every=1",
        "eval.problems=1",
        "eval.n=0",
        "runtime.threads=1",
        f"hydra.run.dir={tmp_path / 'train'}",
    )
    summary = json.loads((tmp_path / "train" / "summary.json").read_text())
    assert summary["model"] == "smollm2_135m" and summary["final_eval"]["step"] == 1
    assert summary["collapse"] is None and summary["truncation"].startswith("responses never ended")  # 16 tokens


def test_a_hub_benchmark_offline_fails_before_any_model_loads(opdx_cli, tmp_path):
    result = opdx_cli("eval", "benchmark=math500", f"hydra.run.dir={tmp_path}", check=False)
    assert result.returncode == 1
    assert "opdx eval: benchmark math500" in result.stderr and "benchmark.path=" in result.stderr
    assert "Loading weights" not in result.stderr + result.stdout and "Traceback" not in result.stderr
