import json
import shutil
from pathlib import Path

import pytest

from opdx.benchmarks import get_benchmark
from opdx.benchmarks.data import BenchmarkDataError
from opdx.benchmarks.toolalpaca import openapi_function, parse_action_input

# ToolAlpaca's release format (github.com/tangqiaoyu/ToolAlpaca data/*.json), small invented APIs:
# eval_simulated / eval_real with Instructions + Golden_Answers, train_data with Instances.
FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "toolalpaca"


@pytest.fixture(scope="module")
def bench():
    return get_benchmark("toolalpaca", path=str(FIXTURE))


def call(name, **arguments):
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


def test_problems_from_golden_answers_and_instances(bench):
    assert [p.prompt for p in bench.eval] == [
        "I'd like to adopt a cat that is at most 3 years old. What's available?",
        "Tell me about the pet with id 42.",
        "Please apply for pet 7 for me: my name is Ana Lima, email ana@example.org. Then show me pet 7.",
        "Show me some rabbits.",
    ]
    assert [(p.entry["action"], p.entry["arguments"]) for p in bench.eval[:2]] == [
        ("searchPets", {"species": "cat", "age": 3, "page": 1}),
        ("getPet", {"petId": 42}),
    ]
    # instances: "\nHint: ..." dropped; getDetails first, no steps, or an invalid tool: skipped; the
    # instance repeating an eval instruction is held out of train
    assert [p.prompt for p in bench.train] == [
        "What's the weather like in Paris right now?",
        "I'm going to Tokyo. What will the weather be over the next 3 days?",
        "Give me a quote by Maya Angelou.",
    ]
    assert [p.entry["arguments"] for p in bench.train] == [
        {"city": "Paris"},
        {"city": "Tokyo", "days": 3},
        {"author": "Maya Angelou"},
    ]
    problem = bench.eval[0]
    assert problem.answer == call("searchPets", species="cat", age=3, page=1)
    assert problem.system.startswith(
        "You can use the functions of the PetAdopt API (Adoptable pets from animal shelters)."
    )
    assert "first function call" in problem.system


def test_tools_come_from_the_openapi_documentation(bench):
    tools = {t["function"]["name"]: t["function"] for t in bench.eval[0].tools}
    assert list(tools) == ["searchPets", "getPet", "submitApplication"]
    search = tools["searchPets"]
    assert search["description"] == "Search adoptable pets by species and age."
    assert search["parameters"] == {
        "type": "object",
        "properties": {
            "species": {"type": "string", "enum": ["dog", "cat", "rabbit"], "description": "The species of the pet"},
            "age": {"type": "integer", "description": "Maximum age in years"},
            "page": {"type": "integer", "default": 1, "description": "Page of results"},
        },
        "required": ["species"],
    }
    assert tools["getPet"]["parameters"]["required"] == ["petId"]
    application = tools["submitApplication"]["parameters"]  # a JSON body behind $refs
    assert application["required"] == ["petId", "applicant"]
    assert application["properties"]["applicant"] == {
        "type": "object",
        "properties": {"name": {"type": "string"}, "email": {"type": "string"}},
    }
    quotes = next(p for p in bench.train if p.entry["api"] == "QuoteGarden").tools[0]["function"]
    no_documentation = {"type": "object", "properties": {}, "additionalProperties": True}
    assert quotes["parameters"] == no_documentation
    assert 'Parameters: {"author": "string. The author\'s name."}' in quotes["description"]


def test_openapi_refs_and_path_level_parameters():
    spec = json.loads(json.loads((FIXTURE / "eval_real.json").read_text())[0]["Documentation"])
    parameters, summary = openapi_function(spec, "/api/holidays/{year}/{countryCode}", "get")
    assert summary == "Get public holidays"
    assert parameters["required"] == ["countryCode", "year"]
    assert parameters["properties"]["countryCode"] == {
        "type": "string",
        "description": "Two-letter country code, e.g. FR.",
    }
    assert openapi_function(spec, "/api/holidays/{year}/{countryCode}", "post") is None
    recursive = {
        "paths": {"/a": {"post": {"requestBody": {"content": {"application/json": {"schema": {"$ref": "#/c/A"}}}}}}},
        "c": {"A": {"type": "object", "properties": {"child": {"$ref": "#/c/A"}, "gone": {"$ref": "#/c/B"}}}},
    }
    parameters, _ = openapi_function(recursive, "/a", "post")
    depth, node = 0, parameters
    while node.get("properties"):
        assert node["properties"]["gone"] == {}
        node, depth = node["properties"]["child"], depth + 1
    assert depth == 4 and node == {}


def test_eval_real_appends_authentication():
    real = get_benchmark("toolalpaca", path=str(FIXTURE), eval_split="eval_real", train_split=None)
    (problem,) = real.eval
    assert (
        problem.prompt == "Which public holidays does France have in 2024?\nAuthentication information: apiKey=demo-key"
    )
    assert real.score(problem, call("getHolidays", countryCode="fr", year=2024)) == 1.0
    with pytest.raises(ValueError, match="eval-only"):
        _ = real.train


@pytest.mark.parametrize(
    ("index", "response", "score"),
    [
        (0, call("searchPets", species="cat", age=3, page=1), 1.0),
        (0, call("searchPets", age=3, species="CAT"), 1.0),  # order, case; page=1 is the documented default
        (0, call("searchPets", species="cat", age=3.0), 1.0),  # 3.0 == 3
        (0, 'searchPets(species="cat", age=3)', 1.0),
        (0, call("searchPets", species="cat"), 0.0),  # age missing
        (0, call("searchPets", species="cat", age=3, page=2), 0.0),
        (0, call("searchPets", species="dog", age=3), 0.0),
        (0, call("searchPets", species="cat", age="3"), 0.0),  # "3" is not 3
        (0, call("getPet", petId=3), 0.0),
        (0, call("getPet", petId=42) + call("searchPets", species="cat", age=3), 0.0),  # only the first call counts
        (0, "I would search for cats up to 3 years old.", 0.0),
        (1, call("getPet", petId=42), 1.0),
        (1, call("getPet", petId=42, verbose=True), 0.0),
        (2, call("submitApplication", petId=7, applicant={"email": "ana@example.org", "name": "ana lima"}), 1.0),
        (2, call("submitApplication", petId=7, applicant={"name": "Ana Lima"}), 0.0),
        (
            2,
            call("submitApplication", petId=7, applicant={"name": "Ana Lima", "email": "ana@example.org"})
            + call("getPet", petId=7),
            1.0,
        ),
        (3, call("searchPets", species="rabbit"), 1.0),  # the golden "age": "" means left out
        (3, call("searchPets", species="rabbit", age=""), 1.0),
        (3, call("searchPets", species="rabbit", age=2), 0.0),
    ],
)
def test_grading_first_call_against_the_gold_action(bench, index, response, score):
    assert bench.score(bench.eval[index], response) == score


def test_parse_action_input():
    assert parse_action_input('{"a": 1}') == {"a": 1}
    assert parse_action_input('Action Input: {"a": {"b": [1]}}\n') == {"a": {"b": [1]}}
    assert parse_action_input({"a": 1}) == {"a": 1}
    assert parse_action_input("none") is None
    assert parse_action_input("[1, 2]") is None


def test_single_file_and_eval_size(tmp_path):
    file = str(FIXTURE / "train_data.json")
    one = get_benchmark("toolalpaca", path=file, eval_size=1, seed=0)
    assert len(one.eval) == 1 and len(one.train) == 3
    assert not {p.prompt for p in one.eval} & {p.prompt for p in one.train}
    assert [p.prompt for p in get_benchmark("toolalpaca", path=file, eval_size=1, seed=0).eval] == [
        p.prompt for p in one.eval
    ]
    picked = {
        tuple(p.prompt for p in get_benchmark("toolalpaca", path=file, eval_size=2, seed=s).eval) for s in range(6)
    }
    assert len(picked) > 1  # the seed chooses
    with pytest.raises(ValueError, match="no train prompts left"):
        _ = get_benchmark("toolalpaca", path=file).train
    with pytest.raises(BenchmarkDataError, match="eval_size=9 but split"):
        _ = get_benchmark("toolalpaca", path=file, eval_size=9).eval
    shutil.copy(FIXTURE / "eval_real.json", tmp_path / "eval_real.json")
    with pytest.raises(BenchmarkDataError, match=r"no eval_simulated.json in .*its .json files: eval_real"):
        _ = get_benchmark("toolalpaca", path=str(tmp_path)).eval
    (tmp_path / "empty.json").write_text(json.dumps([{"Name": "X", "Instructions": ["hi"], "Golden_Answers": [[]]}]))
    with pytest.raises(BenchmarkDataError, match="has no usable problems"):
        _ = get_benchmark("toolalpaca", path=str(tmp_path / "empty.json")).eval


def test_no_data_says_how_to_pass_a_path():
    bench = get_benchmark("toolalpaca")  # the config validator builds it: no data is read yet
    with pytest.raises(BenchmarkDataError, match=r"pass benchmark.path=/path/to/ToolAlpaca/data"):
        _ = bench.eval


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"path": "/no/such/file.json"}, "benchmark.path=/no/such/file.json does not exist"),
        ({"eval_size": 0}, "benchmark.eval_size=0 is invalid"),
        ({"seed": "x"}, "benchmark.seed: Value 'x'"),
        ({"eval_split": ""}, "benchmark.eval_split='' is invalid"),
        ({"train_split": ""}, "benchmark.train_split='' is invalid"),
    ],
)
def test_bad_arguments_fail_fast(kwargs, message):
    with pytest.raises(ValueError, match=message):
        get_benchmark("toolalpaca", **kwargs)
