import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opdx.benchmarks import get_benchmark
from opdx.evaluation import evaluate
from opdx.models import asset_path
from opdx.rollout import decode_responses, sample


@pytest.fixture(scope="module")
def setup():
    benchmark = get_benchmark("arith", train_size=200, eval_size=60)
    load = lambda role: AutoModelForCausalLM.from_pretrained(asset_path(f"tiny/{role}"))  # noqa: E731
    return benchmark, load("teacher"), load("student"), AutoTokenizer.from_pretrained(asset_path("tiny/student"))


def test_greedy_accuracy_is_the_verifier_on_greedy_responses(setup):
    benchmark, teacher, _, tokenizer = setup
    problems = benchmark.eval[:60]
    metrics = evaluate(teacher, tokenizer, benchmark, problems, batch_size=25)
    responses = decode_responses(
        tokenizer, sample(teacher, tokenizer, [p.prompt for p in problems], 1, 32, greedy=True)
    )
    by_hand = sum(benchmark.score(p, r) for p, r in zip(problems, responses, strict=True)) / len(problems)
    assert metrics == {"greedy_acc": pytest.approx(by_hand)}
    assert metrics["greedy_acc"] > 0.75


def test_avg_at_n_and_reverse_kl_per_token(setup):
    benchmark, teacher, student, tokenizer = setup
    torch.manual_seed(0)
    problems = benchmark.eval[:30]
    metrics = evaluate(student, tokenizer, benchmark, problems, n_samples=3, teacher=teacher)
    assert set(metrics) == {"greedy_acc", "avg@3", "reverse_kl_per_token"}
    assert 0 <= metrics["avg@3"] <= 1 and round(metrics["avg@3"] * 90) == pytest.approx(metrics["avg@3"] * 90)
    assert metrics["reverse_kl_per_token"] > 0.5  # the weak student is far from the teacher
    self_kl = evaluate(student, tokenizer, benchmark, problems, n_samples=2, teacher=student)["reverse_kl_per_token"]
    assert abs(self_kl) < 1e-4
