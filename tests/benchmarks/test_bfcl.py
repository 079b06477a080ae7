import importlib.util
import json

import pytest

from opdx.benchmarks import get_benchmark
from opdx.benchmarks.bfcl import CATEGORIES, reference_response
from opdx.benchmarks.data import BenchmarkDataError
from opdx.benchmarks.tool_calls import parse_tool_calls
from opdx.config import ConfigError

needs_bfcl = pytest.mark.skipif(importlib.util.find_spec("bfcl_eval") is None, reason="pip install --no-deps bfcl-eval")
COUNTS = {
    "simple": 400,
    "multiple": 200,
    "parallel": 200,
    "parallel_multiple": 200,
    "live_simple": 258,
    "live_multiple": 1053,
    "live_parallel": 16,
    "live_parallel_multiple": 24,
}
# records whose possible answer BFCL's own checker cannot pass (a required param allowing only "",
# or an answer param missing from the doc and not optional)
UNPASSABLE = {
    "live_simple_106-63-0",
    "live_simple_112-68-0",
    "live_multiple_507-149-4",
    "live_multiple_862-181-3",
    "live_multiple_964-207-0",
}


@pytest.fixture(scope="module")
def every_category():
    return {category: get_benchmark("bfcl", categories=[category], eval_size=None).eval for category in CATEGORIES}


def _types(schema):
    """Every type named in a JSON schema, through properties and items."""
    yield schema.get("type")
    for sub in [*schema.get("properties", {}).values(), *([schema["items"]] if "items" in schema else [])]:
        yield from _types(sub)


def _wrong(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1000
    if isinstance(value, str):
        return value + "zzz"
    if isinstance(value, list):
        return [*value, "zzz"]
    return {**value, "zzz": 1}


@needs_bfcl
def test_counts_per_category(every_category):
    assert {category: len(problems) for category, problems in every_category.items()} == COUNTS
    for category, problems in every_category.items():
        assert {p.entry["category"] for p in problems} == {category}
        assert len({p.entry["id"] for p in problems}) == COUNTS[category]


@needs_bfcl
def test_default_split_is_disjoint_mixed_and_reproducible():
    bench = get_benchmark("bfcl")
    assert bench.categories == ["simple", "multiple", "parallel"]
    assert len(bench.eval) == 200
    train_ids, eval_ids = {p.entry["id"] for p in bench.train}, {p.entry["id"] for p in bench.eval}
    assert not train_ids & eval_ids and not {p.prompt for p in bench.train} & {p.prompt for p in bench.eval}
    assert 500 < len(bench.train) <= 600  # 800 records, minus the eval ones, minus repeated questions
    assert {p.entry["category"] for p in bench.eval[:50]} == {"simple", "multiple", "parallel"}
    again = get_benchmark("bfcl")
    assert [p.entry["id"] for p in again.eval] == [p.entry["id"] for p in bench.eval]
    other = get_benchmark("bfcl", seed=1)
    assert [p.entry["id"] for p in other.eval] != [p.entry["id"] for p in bench.eval]
    assert len(get_benchmark("bfcl", eval_size=10).eval) == 10


@needs_bfcl
def test_problems_tools_and_system(every_category):
    for problems in every_category.values():
        for problem in problems:
            types = {t for tool in problem.tools for t in _types(tool["function"]["parameters"])}
            assert not types & {"dict", "float", "tuple", "any"}, problem.entry["id"]
            assert all(tool["function"]["parameters"]["type"] == "object" for tool in problem.tools)
            assert "function call" in problem.system and problem.prompt
    (factorial,) = [p for p in every_category["simple"] if p.entry["id"] == "simple_python_1"]
    assert factorial.prompt == "Calculate the factorial of 5 using math functions."
    assert [tool["function"]["name"] for tool in factorial.tools] == ["math.factorial"]
    assert factorial.tools[0]["function"]["parameters"]["properties"]["number"]["type"] == "integer"
    (any_typed,) = [p for p in every_category["simple"] if p.entry["id"] == "simple_python_109"]
    assert "type" not in any_typed.tools[0]["function"]["parameters"]["properties"]["data"]
    with_system = [p for p in every_category["live_multiple"] if p.entry["id"] == "live_multiple_33-10-3"]
    assert with_system[0].system.endswith("Strictly use the mentioned functions only to generate the output.")


@needs_bfcl
def test_ground_truth_scores_one_and_wrong_values_zero(every_category):
    bench = get_benchmark("bfcl", categories=list(CATEGORIES), eval_size=None)
    for problems in every_category.values():
        for problem in problems[:30]:
            assert bench.score(problem, problem.answer) == float(problem.entry["id"] not in UNPASSABLE), (
                problem.entry["id"],
                bench.check(problem, problem.answer).error,
            )
            calls = parse_tool_calls(problem.answer)
            first = calls[0]
            if not first.arguments:
                continue
            param = next(iter(first.arguments))
            wrong = {**first.arguments, param: _wrong(first.arguments[param])}
            blocks = [{"name": c.name, "arguments": wrong if i == 0 else c.arguments} for i, c in enumerate(calls)]
            response = "\n".join(f"<tool_call>{json.dumps(b)}</tool_call>" for b in blocks)
            assert bench.score(problem, response) == 0.0, (problem.entry["id"], response)
    assert sum(p.entry["id"] in UNPASSABLE for ps in every_category.values() for p in ps) == len(UNPASSABLE)


@needs_bfcl
def test_scores_other_response_formats(every_category):
    bench = get_benchmark("bfcl")
    (factorial,) = [p for p in every_category["simple"] if p.entry["id"] == "simple_python_1"]
    assert bench.score(factorial, "[math.factorial(number=5)]") == 1.0
    assert (
        bench.score(factorial, '<think>5! is 120</think>\n{"name": "math.factorial", "arguments": {"number": 5}}')
        == 1.0
    )
    assert bench.score(factorial, "math.factorial(number=6)") == 0.0
    assert bench.score(factorial, "The factorial of 5 is 120.") == 0.0
    assert bench.score(factorial, "") == 0.0
    assert "wrong number of calls: 0" in bench.check(factorial, "").error


def _write_bfcl_dir(root, version="v4"):
    docs = [
        {
            "name": "math.gcd",
            "description": "Greatest common divisor.",
            "parameters": {
                "type": "dict",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
            },
        }
    ]
    questions = [
        {
            "id": f"simple_python_{i}",
            "question": [[{"role": "user", "content": f"gcd of {a} and {b}?"}]],
            "function": docs,
        }
        for i, (a, b) in enumerate([(12, 18), (7, 21), (9, 6)])
    ]
    answers = [
        {"id": q["id"], "ground_truth": [{"math.gcd": {"a": [a], "b": [b]}}]}
        for q, (a, b) in zip(questions, [(12, 18), (7, 21), (9, 6)], strict=True)
    ]
    (root / "possible_answer").mkdir(parents=True, exist_ok=True)
    (root / f"BFCL_{version}_simple_python.json").write_text("\n".join(json.dumps(q) for q in questions))
    (root / "possible_answer" / f"BFCL_{version}_simple_python.json").write_text(
        "\n".join(json.dumps(a) for a in answers)
    )
    return questions


def test_path_override_reads_a_copy_in_the_release_layout(tmp_path):
    _write_bfcl_dir(tmp_path / "old", version="v3")
    _write_bfcl_dir(tmp_path)
    (tmp_path / "BFCL_v3_simple_python.json").write_text("not json")  # an older version next to it is ignored
    (tmp_path / "BFCL_v4_parallel_multiple.json").write_text("")
    bench = get_benchmark("bfcl", categories=["simple"], path=str(tmp_path), eval_size=1, seed=0)
    assert len(bench.eval) == 1 and len(bench.train) == 2
    assert sorted(p.entry["id"] for p in [*bench.train, *bench.eval]) == [f"simple_python_{i}" for i in range(3)]
    problem = next(p for p in bench.train + bench.eval if p.entry["id"] == "simple_python_0")
    assert problem.prompt == "gcd of 12 and 18?"
    assert problem.answer == '<tool_call>{"name": "math.gcd", "arguments": {"a": 12, "b": 18}}</tool_call>'
    assert problem.tools[0]["function"]["parameters"]["type"] == "object"
    assert bench.score(problem, '<tool_call>{"name": "math.gcd", "arguments": {"b": 18, "a": 12}}</tool_call>') == 1.0
    assert bench.score(problem, '<tool_call>{"name": "math.gcd", "arguments": {"a": 12, "b": 8}}</tool_call>') == 0.0
    assert bench.score(problem, "math.gcd(a=12)") == 0.0
    v3 = get_benchmark("bfcl", categories=["simple"], path=str(tmp_path / "old"), eval_size=1)
    assert len(v3.eval) == 1
    with pytest.raises(BenchmarkDataError, match=r"no BFCL_v<N>_multiple.json in"):
        _ = get_benchmark("bfcl", categories=["multiple"], path=str(tmp_path)).eval
    with pytest.raises(BenchmarkDataError, match="eval_size=5 but categories"):
        _ = get_benchmark("bfcl", categories=["simple"], path=str(tmp_path), eval_size=5).eval
    eval_only = get_benchmark("bfcl", categories=["simple"], path=str(tmp_path), eval_size=None)
    assert len(eval_only.eval) == 3
    with pytest.raises(ValueError, match="no train prompts left"):
        _ = eval_only.train


def test_reference_response_takes_first_allowed_values_and_plain_dicts():
    docs = [
        {
            "name": "f",
            "parameters": {
                "type": "dict",
                "properties": {
                    "d": {"type": "dict"},
                    "ds": {"type": "array", "items": {"type": "dict"}},
                    "opt": {"type": "string"},
                    "req": {"type": "string"},
                },
                "required": ["req"],
            },
        }
    ]
    truth = [{"f": {"d": [{"k": ["x", "y"], "o": [""]}], "ds": [[{"k": [1]}]], "opt": ["", "a"], "req": ["", "b"]}}]
    (call,) = parse_tool_calls(reference_response(docs, truth))
    assert call.arguments == {"d": {"k": "x"}, "ds": [{"k": 1}], "req": "b"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"categories": ["simple", "java"]}, r"unknown BFCL category 'java'; valid: simple, multiple, parallel, "),
        ({"categories": []}, "benchmark.categories=\\[\\] is invalid"),
        ({"categories": ["simple", "simple"]}, "names a category twice"),
        ({"eval_size": 0}, "benchmark.eval_size=0 is invalid"),
        ({"eval_size": "ten"}, "benchmark.eval_size: Value 'ten'"),
        ({"categories": "simple"}, "benchmark.categories: .*not a ListConfig"),
        ({"seed": -1}, "benchmark.seed=-1 is invalid"),
        ({"path": "/no/such/dir"}, "is not a directory; install the BFCL data"),
    ],
)
def test_bad_arguments_fail_fast(kwargs, message):
    with pytest.raises(ValueError, match=message):
        get_benchmark("bfcl", **kwargs)
    with pytest.raises(ConfigError, match="difficulty"):
        get_benchmark("bfcl", difficulty=3)


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"pip install --no-deps bfcl-eval"):
        get_benchmark("bfcl")
    assert get_benchmark("bfcl", categories=["simple"], path=".").categories == ["simple"]  # a path needs no package
