"""Sample texts: rows from a rollout, samples.jsonl read back, and `opdx samples`."""

import pytest
import torch
from transformers import AutoTokenizer

from opdx.benchmarks import get_benchmark
from opdx.config import asset_path
from opdx.metrics import JsonlLogger
from opdx.rollout import Rollout
from opdx.samples import SampleLog, coloured_tokens, format_samples, main, read_samples


@pytest.fixture(scope="module")
def rollout_and_benchmark():
    """Two arith problems, two responses each (one right and ended, one cut at the limit)."""
    tokenizer = AutoTokenizer.from_pretrained(asset_path("tiny/student"))
    benchmark = get_benchmark("arith", train_size=10, eval_size=2)
    problems = benchmark.eval[:2]
    prompts_P = [tokenizer(p.prompt)["input_ids"] for p in problems]
    right = [tokenizer(f"{p.answer}")["input_ids"][1:] + [tokenizer.eos_token_id] for p in problems]
    cut = [tokenizer("1+1=2;")["input_ids"][1:] for _ in problems]
    responses_B = [right[0], cut[0], right[1], cut[1]]
    logps_B = [[-0.5] * len(r) for r in responses_B]
    rollout = Rollout.from_samples(problems, prompts_P, responses_B, [True, False, True, False], 0, logps_B)
    return tokenizer, benchmark, rollout


def test_rows_spread_over_prompts_with_score_stop_and_log_u(rollout_and_benchmark):
    tokenizer, benchmark, rollout = rollout_and_benchmark
    log_u_B_T = torch.full_like(rollout.logp_sampling_B_T, -2.0)
    log = SampleLog(tokenizer, count=2)
    log.add(benchmark, rollout, "train", "sampled", log_u_B_T)
    log.add(benchmark, rollout, "train", "sampled", log_u_B_T)  # already full: nothing more
    first, second = log.rows
    assert len(log.rows) == 2 and first["prompt"] != second["prompt"]  # rows 0 and 2: one per prompt
    assert first["response"] == first["reference"] and first["score"] == 1.0 and first["stop"] == "eos"
    assert first["tokens"][-1] == tokenizer.eos_token and "".join(first["tokens"][:-1]) == first["response"]
    assert first["log_u"] == [-2.0] * len(first["tokens"])
    log.add(benchmark, rollout.select([1]), "eval", "greedy")
    assert log.rows[2]["stop"] == "length" and log.rows[2]["score"] == 0.0 and log.rows[2]["log_u"] is None


def test_opdx_samples_prints_a_step_colours_log_u_and_names_bad_choices(rollout_and_benchmark, tmp_path, capsys):
    tokenizer, benchmark, rollout = rollout_and_benchmark
    logger = JsonlLogger(tmp_path, {})
    for step in (0, 2):
        log = SampleLog(tokenizer, count=1)
        log.add(benchmark, rollout, "eval", "sampled", rollout.logp_sampling_B_T * step)
        logger.samples(log.rows, step)
    assert [row["step"] for row in read_samples(tmp_path)] == [0, 2]
    assert main([str(tmp_path), "--colour", "never"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("-- step 2 eval sampled: score 1, stop eos, mean log u -1.000\nprompt:    ")
    assert "\033[" not in out and "step 0" not in out
    assert main([str(tmp_path), "--step", "all", "--colour", "always"]) == 0
    out = capsys.readouterr().out
    assert "-- step 0 eval sampled: score 1, stop eos, mean log u +0.000" in out and "\033[32m" in out
    assert main([str(tmp_path), "--step", "7"]) == 1
    assert "--step 7 has no samples; steps with them: [0, 2]" in capsys.readouterr().out
    assert main([str(tmp_path), "--split", "train"]) == 1
    assert "--step last has no train samples; steps with them: []" in capsys.readouterr().out
    logger.samples([{**read_samples(tmp_path)[0], "split": "train"}], 4)  # a later step of training rows only
    assert main([str(tmp_path), "--split", "eval", "--colour", "never"]) == 0  # the last step with eval rows
    assert capsys.readouterr().out.startswith("-- step 2 eval sampled")
    assert main([str(tmp_path / "none")]) == 1
    assert "has no samples.jsonl (runs write it while logger.samples > 0)" in capsys.readouterr().out


def test_tokens_are_coloured_by_their_log_u():
    assert coloured_tokens(["a", "b", "c", "d"], [0.1, -0.5, -2.0, -4.0]) == (
        "\033[32ma\033[0mb\033[33mc\033[0m\033[31md\033[0m"
    )
    row = {"step": 3, "split": "eval", "kind": "greedy", "score": 0.0, "stop": "length", "prompt": "1+1=",
           "reference": "2", "response": "3", "tokens": ["3"], "log_u": None}  # fmt: skip
    assert format_samples([row], colour=True) == (
        "-- step 3 eval greedy: score 0, stop length\nprompt:    1+1=\nreference: 2\nresponse:  3"
    )
