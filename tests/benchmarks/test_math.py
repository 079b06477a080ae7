import json
import threading
import time
from dataclasses import fields, replace
from pathlib import Path

import pandas as pd
import pytest
import yaml

from opdx.benchmarks import BENCHMARKS, get_benchmark
from opdx.benchmarks.data import BenchmarkDataError
from opdx.benchmarks.math import PROMPT_SUFFIX, MathBenchmark, gold_answer, grade, last_boxed
from opdx.config import ConfigError, load_option

REPO = Path(__file__).resolve().parents[2]
GSM8K_SAMPLE = REPO / "tests" / "fixtures" / "gsm8k_sample.jsonl"

# Problems written for these tests, in each dataset's real columns.
MATH500 = [
    {"problem": "What is $\\frac{1}{2}+\\frac{1}{3}$?", "solution": "... $\\boxed{\\frac{5}{6}}$.",
     "answer": "\\frac{5}{6}", "subject": "Prealgebra", "level": 1, "unique_id": "test/prealgebra/1.json"},
    {"problem": "Solve $x^2=9$ for $x>0$.", "solution": "$x=\\boxed{3}$", "answer": "3", "subject": "Algebra",
     "level": 1, "unique_id": "test/algebra/2.json"},
    {"problem": "Write the interval of $x$ with $-2\\le x\\le 7$.", "solution": "$\\boxed{[-2,7]}$",
     "answer": "[-2,7]", "subject": "Algebra", "level": 2, "unique_id": "test/algebra/3.json"},
]  # fmt: skip
AIME = [
    {"id": 60 + i, "problem": f"Find the remainder when $7^{{{i + 10}}}$ is divided by $1000$.",
     "solution": "...", "answer": str(pow(7, i + 10, 1000)), "url": "https://example.org", "year": "2024"}
    for i in range(6)
]  # fmt: skip
DEEPMATH = [
    {"question": f"Evaluate $\\lim_{{x\\to 0}} \\frac{{\\sin({k}x)}}{{x}}$.", "final_answer": str(k),
     "difficulty": 4.5, "topic": "Mathematics -> Calculus -> Limits", "r1_solution_1": "...", "r1_solution_2": "...",
     "r1_solution_3": "..."}
    for k in range(1, 11)
]  # fmt: skip


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def write_parquet(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(records).to_parquet(path)
    return path


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """datasets' cache in tmp_path: directory loads (the hub code path) leave nothing behind."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    return tmp_path


def gsm8k_records() -> list[dict]:
    return [json.loads(line) for line in GSM8K_SAMPLE.read_text().splitlines()]


# ---- specs and construction -------------------------------------------------------------------


def test_every_math_yaml_lists_every_option_and_builds_its_dataset():
    names = [name for name, cls in BENCHMARKS.items() if cls is MathBenchmark]
    assert names == ["deepmath", "gsm8k", "math500", "aime24", "aime25"]
    option_keys = {f.name for f in fields(MathBenchmark)}
    for name in names:
        conf = REPO / "conf" / "benchmark" / f"{name}.yaml"
        assert conf.read_text().startswith("# opdx ")
        assert set(yaml.safe_load(conf.read_text())) == option_keys, f"{conf} must list every option"
        bench = get_benchmark(name)
        assert bench.name == name and bench.prompt_suffix == PROMPT_SUFFIX
        assert bench._records == {}  # nothing loaded until .train / .eval


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "gsm9k"}, "'gsm9k'.*deepmath, gsm8k, math500, aime24, aime25"),
        ({"name": "gsm8k", "eval_size": 0}, "eval_size=0"),
        ({"name": "gsm8k", "eval_size": "ten"}, "benchmark.eval_size: Value 'ten'"),
        ({"name": "gsm8k", "eval_size": True}, "benchmark.eval_size: Value 'True' of type 'bool'"),
        ({"name": "gsm8k", "seed": -1}, "seed=-1"),
        ({"name": "gsm8k", "question_key": ""}, "question_key=''"),
        ({"name": "gsm8k", "eval_split": None}, "benchmark.eval_split: .*None"),
        ({"name": "gsm8k", "train_split": ""}, "train_split=''"),
        ({"name": "gsm8k", "prompt_suffix": None}, "benchmark.prompt_suffix: .*None"),
        ({"name": "gsm8k", "hub_id": None}, "path and benchmark.hub_id are both null"),
        ({"name": "gsm8k", "path": "no/such/file.jsonl"}, "path=no/such/file.jsonl does not exist"),
    ],
)
def test_invalid_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        get_benchmark(**kwargs)


def test_unknown_argument_is_refused():
    with pytest.raises(ConfigError, match="Key 'difficulty' not in 'MathBenchmark'"):
        get_benchmark("math500", difficulty=3)


# ---- loading and splits -----------------------------------------------------------------------


def test_gsm8k_file_is_one_split_eval_only_unless_eval_size_holds_out():
    bench = get_benchmark("gsm8k", path=str(GSM8K_SAMPLE))
    assert len(bench.eval) == 20
    first = bench.eval[0]
    assert first.prompt == first.entry["question"] + PROMPT_SUFFIX
    assert first.prompt.endswith("put your final answer within \\boxed{}.")
    answers = {p.entry["question"][:12]: p.answer for p in bench.eval}
    assert answers["A farmer has"] == "3000"  # '#### 3,000'
    assert answers["The temperat"] == "-4"
    with pytest.raises(ValueError, match="no train prompts left: all 20 .* set benchmark.eval_size"):
        _ = bench.train

    held = get_benchmark("gsm8k", path=str(GSM8K_SAMPLE), eval_size=5)
    assert (len(held.eval), len(held.train)) == (5, 15)
    assert not {p.prompt for p in held.eval} & {p.prompt for p in held.train}
    assert {p.prompt for p in held.eval} | {p.prompt for p in held.train} == {p.prompt for p in bench.eval}


def test_held_out_eval_is_seeded_nested_and_in_file_order():
    def eval_ids(**kwargs):
        return [p.entry["question"] for p in get_benchmark("gsm8k", path=str(GSM8K_SAMPLE), **kwargs).eval]

    order = [r["question"] for r in gsm8k_records()]
    five = eval_ids(eval_size=5)
    assert five == eval_ids(eval_size=5, seed=0)
    assert five != eval_ids(eval_size=5, seed=1)
    assert set(five) < set(eval_ids(eval_size=10))  # a larger eval set contains the smaller one
    assert five == sorted(five, key=order.index)


def test_gsm8k_directory_loads_like_the_hub_and_dedups_train(hf_cache):
    records = gsm8k_records()
    train, test = records[:14], records[14:]
    directory = hf_cache / "gsm8k"
    write_jsonl(directory / "train.jsonl", train + [test[0]])  # a test question also in train
    write_jsonl(directory / "test.jsonl", test)
    bench = get_benchmark("gsm8k", path=str(directory))
    assert [p.entry["question"] for p in bench.eval] == [r["question"] for r in test]
    assert [p.entry["question"] for p in bench.train] == [r["question"] for r in train]


def test_math500_jsonl_is_eval_only(tmp_path):
    bench = get_benchmark("math500", path=str(write_jsonl(tmp_path / "math500.jsonl", MATH500)))
    assert [p.answer for p in bench.eval] == ["\\frac{5}{6}", "3", "[-2,7]"]
    assert bench.eval[0].entry["unique_id"] == "test/prealgebra/1.json"
    assert bench.score(bench.eval[0], "So the sum is $\\boxed{\\dfrac{5}{6}}$.") == 1.0
    assert bench.score(bench.eval[2], "The answer is \\boxed{[-2, 7]}") == 1.0
    with pytest.raises(ValueError, match="math500 is eval-only .*deepmath, gsm8k"):
        _ = bench.train


@pytest.mark.parametrize("name", ["aime24", "aime25"])
def test_aime_parquet_file_and_directory(name, hf_cache):
    file = write_parquet(hf_cache / f"{name}.parquet", AIME)
    split = load_option("benchmark", name)["eval_split"]  # aime24 ships a train split, aime25 a test split
    directory = hf_cache / f"{name}_dir"
    write_parquet(directory / "data" / f"{split}-00000-of-00001.parquet", AIME)
    for path in (file, directory):
        bench = get_benchmark(name, path=str(path))
        assert [p.answer for p in bench.eval] == [r["answer"] for r in AIME]
        problem = bench.eval[0]
        assert bench.score(problem, f"... so the remainder is $\\boxed{{{int(problem.answer)}}}$") == 1.0
        assert bench.score(problem, f"\\boxed{{{int(problem.answer) + 1}}}") == 0.0
        with pytest.raises(ValueError, match="eval-only"):
            _ = bench.train


def test_deepmath_holds_out_eval_from_its_one_split(hf_cache):
    file = write_parquet(hf_cache / "deepmath.parquet", DEEPMATH)
    directory = hf_cache / "deepmath_dir"
    write_parquet(directory / "data" / "train-00000-of-00001.parquet", DEEPMATH)
    splits = []
    for path in (file, directory):
        bench = get_benchmark("deepmath", path=str(path), eval_size=3)
        assert (len(bench.eval), len(bench.train)) == (3, 7)
        assert not {p.prompt for p in bench.eval} & {p.prompt for p in bench.train}
        assert all(p.answer == p.entry["final_answer"] for p in bench.eval + bench.train)
        if path == directory:  # the hub code path keeps only the two columns it needs (DeepMath is GBs)
            assert set(bench.eval[0].entry) == {"question", "final_answer"}
        splits.append(([p.prompt for p in bench.eval], [p.prompt for p in bench.train]))
    assert splits[0] == splits[1]  # the file and the hub code path give the same split
    again = get_benchmark("deepmath", path=str(file), eval_size=3)
    assert [p.prompt for p in again.eval] == splits[0][0]


def test_own_column_names_and_a_clear_error_for_missing_ones(tmp_path):
    file = write_jsonl(tmp_path / "mine.jsonl", [{"q": "What is 6 times 7?", "a": "42"}])
    bench = get_benchmark("math500", path=str(file), question_key="q", answer_key="a")
    assert (bench.eval[0].prompt, bench.eval[0].answer) == ("What is 6 times 7?" + PROMPT_SUFFIX, "42")
    with pytest.raises(BenchmarkDataError, match="no problem / answer; its keys are q, a.*question_key="):
        _ = get_benchmark("math500", path=str(file)).eval


def test_eval_size_larger_than_the_split(tmp_path):
    bench = get_benchmark("math500", path=str(write_jsonl(tmp_path / "m.jsonl", MATH500)), eval_size=4)
    with pytest.raises(BenchmarkDataError, match="eval_size=4 but split 'test' has only 3"):
        _ = bench.eval


def test_hub_id_offline_fails_fast_naming_benchmark_path():
    import datasets

    if not datasets.config.HF_HUB_OFFLINE:
        pytest.skip("needs HF_HUB_OFFLINE=1 (conftest sets it unless the environment overrides it)")
    start = time.perf_counter()
    with pytest.raises(BenchmarkDataError, match="openai/gsm8k.*benchmark.path="):
        _ = get_benchmark("gsm8k").eval
    assert time.perf_counter() - start < 30


# ---- grading ----------------------------------------------------------------------------------


def test_gold_answer_and_last_boxed():
    assert gold_answer("She pays 4 * 300 = <<4*300=1200>>1200.\n#### 1,200") == "1200"
    assert gold_answer(" \\frac{1}{2} ") == "\\frac{1}{2}"
    assert gold_answer(45) == "45"
    assert last_boxed("a \\boxed{1} b \\boxed{\\frac{1}{2}} c") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{80} then \\boxed{7") == "80"  # an unclosed (truncated) box does not count
    assert last_boxed("no box here") is None


# (gold, response, score) as math-verify 0.9.0 grades them, through grade's last-box extraction.
GRADES = [
    # the same number written differently
    ("0.5", "\\boxed{\\frac{1}{2}}", 1.0),
    ("0.5", "\\boxed{\\dfrac12}", 1.0),
    ("0.5", "\\boxed{1/2}", 1.0),
    ("\\frac{1}{2}", "\\boxed{0.5}", 1.0),
    ("\\frac{1}{2}", "\\boxed{\\tfrac{1}{2}}", 1.0),
    ("\\frac{1}{2}", "\\boxed{2/4}", 1.0),
    ("\\frac{1}{2}", "\\boxed{0.25}", 0.0),
    ("0.5", "\\boxed{50\\%}", 0.0),
    # units, currency and thousands separators are dropped
    ("72", "\\boxed{72}", 1.0),
    ("72", "\\boxed{72\\text{ dollars}}", 1.0),
    ("72", "\\boxed{\\$72}", 1.0),
    ("72", "She earns $72.", 1.0),
    ("72", "The answer is 72 dollars.", 1.0),
    ("72", "\\boxed{72.0}", 1.0),
    ("72", "\\boxed{72.5}", 0.0),
    ("5", "\\boxed{5 \\text{ cm}}", 1.0),
    ("5", "\\boxed{5\\,\\mathrm{cm}}", 1.0),
    ("5", "The side is 5 cm.", 1.0),
    ("5", "\\boxed{6 \\text{ cm}}", 0.0),
    ("1000", "\\boxed{1,000}", 1.0),
    ("1000", "\\boxed{1{,}000}", 1.0),
    ("1000", "The total is 1,000 dollars", 1.0),
    ("1000", "\\boxed{1,000,000}", 0.0),
    ("1,000", "\\boxed{1000}", 1.0),
    ("10\\%", "\\boxed{10}", 1.0),  # a percent gold accepts the bare number ...
    ("10\\%", "\\boxed{0.1}", 0.0),  # ... but not the fraction
    # signs
    ("-3", "\\boxed{-3}", 1.0),
    ("-3", "The answer is $-3$.", 1.0),
    ("-3", "\\boxed{3}", 0.0),
    ("-4", "#### -4", 1.0),
    # LaTeX answers
    ("\\frac{\\sqrt{3}}{2}", "\\boxed{\\sqrt{3}/2}", 1.0),
    ("\\frac{\\sqrt{3}}{2}", "\\boxed{0.866}", 0.0),
    ("2\\sqrt{2}", "\\boxed{\\sqrt{8}}", 1.0),
    ("x^2+1", "\\boxed{1+x^2}", 1.0),
    ("(1,2)", "\\boxed{(2,1)}", 0.0),
    ("3, 5, 7", "\\boxed{7, 5, 3}", 1.0),
    ("\\pi", "\\boxed{3.14159}", 0.0),
    ("\\text{(C)}", "\\boxed{C}", 1.0),
    ("\\text{Evelyn}", "\\boxed{\\text{Evelyn}}", 1.0),
    ("5", "\\boxed{x = 5}", 1.0),
    ("y = 2x + 3", "\\boxed{2x+3}", 1.0),  # lenient: the right-hand side alone is accepted
    ("e^{-1}", "\\boxed{\\frac{1}{e}}", 1.0),
    ("Yes", "\\boxed{\\text{Yes}}", 1.0),  # DeepMath has yes/no answers
    ("Yes", "\\boxed{No}", 0.0),
    # which answer counts: the last complete box
    ("72", "I first got \\boxed{80}. Wait, 8 * 9 = 72, so the answer is \\boxed{72}", 1.0),
    ("72", "\\boxed{72}. Hmm, or maybe \\boxed{80}", 0.0),
    ("72", "\\boxed{1}, \\boxed{2}, \\boxed{72}", 1.0),
    ("72", "\\boxed{72}.\n\nCheck: 80 - 8 = 72.", 1.0),
    ("72", "<think>it might be 80</think>\n\\boxed{72}", 1.0),
    ("72", "\\boxed{72} then \\boxed{8", 1.0),
    # no box: math-verify's own pick, the last number it finds
    ("72", "The answer is 72, not 80.", 1.0),
    ("72", "Final answer: 72. Check: 72 + 8 = 80", 0.0),
    ("72", "72 or 80", 0.0),
    # nothing to grade
    ("72", "", 0.0),
    ("72", "\\boxed{}", 0.0),
    ("72", "\\boxed{", 0.0),
    ("72", "}}{{\\frac{", 0.0),
]


@pytest.mark.parametrize(("gold", "response", "expected"), GRADES)
def test_grade(gold, response, expected):
    assert grade(gold, response) == expected


def test_math_verify_alone_merges_bare_boxes_so_grade_takes_the_last():
    from math_verify import parse, verify

    response = "\\boxed{80}\n\nWait, actually \\boxed{72}"
    assert verify(parse("$72$"), parse(response)) is False  # parsed as the set {72, 80}
    assert grade("72", response) == 1.0


def test_grade_in_a_thread_runs_without_the_signal_timeout():
    results = []
    thread = threading.Thread(target=lambda: results.append(grade("\\frac{1}{2}", "\\boxed{0.5}")))
    thread.start()
    thread.join()
    assert results == [1.0]


def test_gsm8k_sample_solutions_score_one_and_wrong_answers_zero():
    bench = get_benchmark("gsm8k", path=str(GSM8K_SAMPLE))
    for problem in bench.eval:
        assert bench.score(problem, problem.entry["answer"]) == 1.0  # the worked solution, ending '#### N'
        assert bench.score(problem, f"So the answer is $\\boxed{{{problem.answer}}}$.") == 1.0
        assert bench.score(problem, f"\\boxed{{{float(problem.answer) + 1:g}}}") == 0.0


def test_a_self_teacher_sees_a_gsm8k_solution_or_its_answer_after_the_prompt():
    from opdx.benchmarks import privileged

    bench = get_benchmark("gsm8k", path=str(GSM8K_SAMPLE))
    problem = bench.eval[0]
    solution = problem.entry["answer"].rsplit("####", 1)[0].strip()
    worked = privileged(bench, problem, "worked")
    assert worked.prompt == f"{problem.prompt}\n\nA worked solution:\n{solution}" and "####" not in worked.prompt
    reference = privileged(bench, problem, "reference")
    assert reference.prompt == f"{problem.prompt}\n\nThe correct final answer:\n{problem.answer}"
    with pytest.raises(ValueError, match="records have no worked solution"):
        bench.worked_solution(replace(problem, entry={"answer": "7"}))
