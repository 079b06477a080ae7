"""`bfcl`: single-turn function calling from the Berkeley Function Calling Leaderboard (BFCL v4).

    opdx eval model=smollm2_135m benchmark=bfcl eval.problems=50
    opdx train benchmark=bfcl benchmark.categories=[simple,multiple,parallel,parallel_multiple]

Data: the files of the ``bfcl-eval`` package (``pip install --no-deps bfcl-eval``; located without
importing it, whose import pulls in many API clients), or ``benchmark.path=<dir>`` with the same
layout: ``BFCL_v<N>_<file>.json`` (JSON lines: id, question = [[messages]], function = [docs]) and
``possible_answer/BFCL_v<N>_<file>.json`` (id, ground_truth). Categories (the Python AST ones):

| category               | file                   | problems | calls expected                         |
|------------------------|------------------------|----------|----------------------------------------|
| simple                 | simple_python          | 400      | one, one function offered              |
| multiple               | multiple               | 200      | one, picked among several functions    |
| parallel               | parallel               | 200      | several calls of one function          |
| parallel_multiple      | parallel_multiple      | 200      | several calls of several functions     |
| live_simple            | live_simple            | 258      | as simple, user-contributed            |
| live_multiple          | live_multiple          | 1053     | as multiple, user-contributed          |
| live_parallel          | live_parallel          | 16       | as parallel, user-contributed          |
| live_parallel_multiple | live_parallel_multiple | 24       | as parallel_multiple, user-contributed |

BFCL has one split: the records of the chosen categories are shuffled with ``seed``; the first
``eval_size`` are eval (kept in that shuffled order, so the first N mix the categories), the rest
train (minus any whose question is also an eval question). ``eval_size: null`` makes all of them
eval (eval-only). Changing the categories changes the split.

A problem is the user message; the system message asks for the call(s) only (plus the
question's own system message, if any; the call format comes with the tools, from the chat
template or from opdx's fallback); the tools are the BFCL function docs as JSON schema.
``score`` is 1.0 iff the calls parsed from the response pass BFCL's AST checker for the
record's category (``opdx.benchmarks.tool_calls``).
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from opdx.benchmarks.base import Problem, SingleComponent
from opdx.benchmarks.data import BenchmarkDataError, read_file
from opdx.benchmarks.tool_calls import bfcl_tool, check_calls, parse_tool_calls

CATEGORIES: dict[str, str] = {  # config name -> BFCL file name
    "simple": "simple_python",
    "multiple": "multiple",
    "parallel": "parallel",
    "parallel_multiple": "parallel_multiple",
    "live_simple": "live_simple",
    "live_multiple": "live_multiple",
    "live_parallel": "live_parallel",
    "live_parallel_multiple": "live_parallel_multiple",
}
SYSTEM_PROMPT = (
    "You are an expert in composing functions. You are given a question and a set of functions. Answer only "
    "with the function call(s) that answer the question, nothing else."
)
INSTALL_HINT = (
    "install the BFCL data with `pip install --no-deps bfcl-eval`, or give benchmark.path=<directory with "
    "BFCL_v4_<category>.json files and possible_answer/>"
)


def bfcl_data_dir() -> Path:
    """The ``data`` directory of the installed bfcl-eval package (found without importing it)."""
    spec = importlib.util.find_spec("bfcl_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"benchmark bfcl: the bfcl-eval package is not installed; {INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def category_file(directory: Path, file: str) -> Path:
    """``directory/BFCL_v<N>_<file>.json`` of the highest version N."""
    pattern = re.compile(rf"BFCL_v(\d+)_{re.escape(file)}\.json")
    found = sorted((int(m.group(1)), p) for p in directory.glob("BFCL_v*.json") if (m := pattern.fullmatch(p.name)))
    if not found:
        raise BenchmarkDataError(f"benchmark bfcl: no BFCL_v<N>_{file}.json in {directory}; {INSTALL_HINT}")
    return found[-1][1]


def _reference_value(value: Any, schema: dict[str, Any]) -> Any:
    """A plain value from a possible-answer value: a dict option ``{key: [allowed]}`` takes the
    first allowed value of each key (keys allowing only "" are left out)."""
    kind = schema.get("type")
    if kind == "dict" and isinstance(value, dict):
        return {
            key: next(v for v in values if v != "") for key, values in value.items() if any(v != "" for v in values)
        }
    if kind in ("array", "tuple") and schema.get("items", {}).get("type") == "dict" and isinstance(value, list):
        return [_reference_value(entry, schema["items"]) for entry in value]
    return value


def reference_response(docs: list[dict[str, Any]], ground_truth: list[dict[str, dict[str, list]]]) -> str:
    """The expected calls as ``<tool_call>`` blocks: the first allowed value of each param, params
    that may be left out ("" allowed) and are not required by the doc omitted. It passes the
    checker except for the few records BFCL itself cannot pass (e.g. a required param whose only
    allowed value is "")."""
    blocks = []
    for call in ground_truth:
        (name, allowed), *_ = call.items()
        doc = next((d for d in docs if d["name"] == name), {"parameters": {}})
        properties, required = doc["parameters"].get("properties", {}), doc["parameters"].get("required", [])
        arguments = {
            param: _reference_value(next(v for v in values if v != ""), properties.get(param, {}))
            for param, values in allowed.items()
            if any(v != "" for v in values) and ("" not in values or param in required)
        }
        blocks.append(f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>")
    return "\n".join(blocks)


@dataclass
class BfclBenchmark(SingleComponent):
    """Options as in conf/benchmark/bfcl.yaml: the categories, how many of their shuffled records
    are eval (null: all), the shuffle's seed, and a data directory (null: the bfcl-eval package's)."""

    name: str
    categories: list[str]
    eval_size: int | None
    seed: int
    path: str | None

    def __post_init__(self) -> None:
        valid = ", ".join(CATEGORIES)
        if not self.categories:
            raise ValueError(f"benchmark.categories={self.categories!r} is invalid; give a list of: {valid}")
        for category in self.categories:
            if category not in CATEGORIES:
                raise ValueError(f"benchmark.categories: unknown BFCL category {category!r}; valid: {valid}")
        if len(set(self.categories)) != len(self.categories):
            raise ValueError(f"benchmark.categories={self.categories} names a category twice")
        if self.eval_size is not None and self.eval_size < 1:
            raise ValueError(
                f"benchmark.eval_size={self.eval_size!r} is invalid; give a positive integer or null (all)"
            )
        if self.seed < 0:
            raise ValueError(f"benchmark.seed={self.seed!r} is invalid; it must be a non-negative integer")
        if self.path is not None and not Path(self.path).expanduser().is_dir():
            raise ValueError(f"benchmark.path={self.path!r} is not a directory; {INSTALL_HINT}")
        self.data_dir = bfcl_data_dir() if self.path is None else Path(self.path).expanduser()

    def _category_records(self, category: str) -> list[dict[str, Any]]:
        questions = read_file(category_file(self.data_dir, CATEGORIES[category]))
        answers_file = category_file(self.data_dir / "possible_answer", CATEGORIES[category])
        answers = {record["id"]: record["ground_truth"] for record in read_file(answers_file)}
        missing = [record["id"] for record in questions if record["id"] not in answers]
        if missing:
            raise BenchmarkDataError(f"benchmark bfcl: {answers_file} has no ground truth for {missing[:3]}")
        return [{**record, "category": category, "ground_truth": answers[record["id"]]} for record in questions]

    @cached_property
    def _split(self) -> tuple[list[Problem], list[Problem]]:
        records = [record for category in self.categories for record in self._category_records(category)]
        random.Random(self.seed).shuffle(records)
        size = len(records) if self.eval_size is None else self.eval_size
        if size > len(records):
            raise BenchmarkDataError(
                f"benchmark bfcl: eval_size={size} but categories {self.categories} have only {len(records)} "
                f"problems; lower benchmark.eval_size or set it to null (all)"
            )
        eval_problems = [self._problem(record) for record in records[:size]]
        held_out = {problem.prompt for problem in eval_problems}
        train = [p for p in map(self._problem, records[size:]) if p.prompt not in held_out]
        return train, eval_problems

    @staticmethod
    def _problem(record: dict[str, Any]) -> Problem:
        messages = record["question"][0]
        system = [m["content"] for m in messages if m["role"] == "system"]
        user = "\n\n".join(m["content"] for m in messages if m["role"] == "user")
        return Problem(
            prompt=user,
            answer=reference_response(record["function"], record["ground_truth"]),
            entry=record,
            system="\n\n".join([SYSTEM_PROMPT, *system]),
            tools=[bfcl_tool(doc) for doc in record["function"]],
        )

    @property
    def eval(self) -> list[Problem]:
        return self._split[1]

    @property
    def train(self) -> list[Problem]:
        if not self._split[0]:
            raise ValueError(
                f"benchmark bfcl: no train prompts left, all problems of {self.categories} are eval; lower "
                f"benchmark.eval_size or add categories"
            )
        return self._split[0]

    def check(self, problem: Problem, response: str):
        """The checker's verdict (``valid``, ``error``) on the calls parsed from ``response``."""
        entry = problem.entry
        return check_calls(entry["function"], parse_tool_calls(response), entry["ground_truth"], entry["category"])

    def score(self, problem: Problem, response: str) -> float:
        """1.0 iff the response's calls pass BFCL's AST checker for the problem's category."""
        return float(self.check(problem, response).valid)
