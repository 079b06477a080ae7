"""Math reasoning benchmarks: deepmath, gsm8k, math500, aime24, aime25, graded by math-verify.

    opdx train benchmark=deepmath                      # DeepMath-103K prompts, 500 held out for eval
    opdx eval model=smollm2_135m benchmark=gsm8k benchmark.path=tests/fixtures/gsm8k_sample.jsonl

One loader and one verifier; the YAML file of each dataset (``conf/benchmark/<name>.yaml``) gives
the hub id, the splits and the column names (every one a config key, so a local file with other
columns works too):

| name     | hub id                  | config | train split | eval split | question | answer       |
|----------|-------------------------|--------|-------------|------------|----------|--------------|
| deepmath | zwhe99/DeepMath-103K    | -      | train       | train      | question | final_answer |
| gsm8k    | openai/gsm8k            | main   | train       | test       | question | answer       |
| math500  | HuggingFaceH4/MATH-500  | -      | -           | test       | problem  | answer       |
| aime24   | HuggingFaceH4/aime_2024 | -      | -           | train      | problem  | answer       |
| aime25   | math-ai/aime25          | -      | -           | test       | problem  | answer       |

Splits, one rule for all: eval is the eval split (all of it, or ``eval_size`` problems chosen by
a seeded shuffle, kept in file order); train is the train split minus every problem whose
question is in eval. So when both name the same split (deepmath) the eval problems are held out
of it, and ``train_split: null`` makes an eval-only benchmark whose ``.train`` raises. A local
file (``benchmark.path=x.jsonl``) is a single split: it serves as both, so training on a file
needs ``eval_size`` to hold part of it out; a local directory is read like the hub.

The gold answer is the answer column, or for GSM8K-style solutions the text after the last
``####`` with thousands commas removed. ``score`` is 1.0 iff math-verify judges the response's
final answer equal to the gold: the content of the last complete ``\\boxed{...}``, or, in a
response with no box, what math-verify extracts from the whole text (``The answer is 72``).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

from opdx.benchmarks.base import Problem, SingleComponent
from opdx.benchmarks.data import BenchmarkDataError, drop_eval_prompts, load_records, pick_eval

PROMPT_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."
TIMEOUT_S = 5  # math-verify's own limit per parse and per comparison (signal.alarm, main thread only)


def gold_answer(raw: Any) -> str:
    """The reference answer as a string; a GSM8K solution ('...#### 1,200') gives '1200'."""
    text = str(raw).strip()
    if "####" in text:
        return text.rsplit("####", 1)[1].strip().replace(",", "")
    return text


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` whose braces close, or None."""
    for match in reversed(list(re.finditer(r"\\boxed\s*\{", text))):
        depth = 1
        for i in range(match.end(), len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[match.end() : i]
    return None


@lru_cache(maxsize=65536)
def _parse_gold(gold: str, timeout: int | None) -> list:
    from math_verify import parse

    return parse(f"${gold}$", parsing_timeout=timeout)  # '$...$' parses numbers, LaTeX, percents and text alike


def grade(gold: str, response: str) -> float:
    """1.0 iff math-verify finds the response's final answer equal to ``gold``, else 0.0.

    The final answer is the last complete ``\\boxed{...}`` (math-verify on its own often reads
    several bare boxes of a response as one set, so a corrected answer after a first box scored 0); with
    no box, math-verify's own extraction from the whole response. Errors and timeouts score 0.
    math-verify times out with signal.alarm, which works only in the main thread; elsewhere it
    runs without a time limit."""
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    timeout = TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    boxed = last_boxed(response)
    try:
        target = parse(response if boxed is None else f"$\\boxed{{{boxed}}}$", parsing_timeout=timeout)
        return float(bool(target) and verify(_parse_gold(gold, timeout), target, timeout_seconds=timeout))
    except (Exception, TimeoutException):
        return 0.0


@dataclass
class MathBenchmark(SingleComponent):
    """Options as in conf/benchmark/<name>.yaml (one file per dataset of the table above)."""

    name: str
    path: str | None
    hub_id: str | None
    hub_config: str | None
    train_split: str | None
    eval_split: str
    eval_size: int | None
    seed: int
    question_key: str
    answer_key: str
    prompt_suffix: str

    def __post_init__(self) -> None:
        prefix = f"benchmark {self.name}: benchmark"
        for key in ("path", "hub_id", "hub_config", "train_split", "eval_split", "question_key", "answer_key"):
            if getattr(self, key) == "":
                raise ValueError(f"{prefix}.{key}='' is invalid; give a non-empty string or null")
        if self.eval_size is not None and self.eval_size < 1:
            raise ValueError(f"{prefix}.eval_size={self.eval_size!r} is invalid; give a positive integer or null (all)")
        if self.seed < 0:
            raise ValueError(f"{prefix}.seed={self.seed!r} is invalid; it must be a non-negative integer")
        if self.path is None and self.hub_id is None:
            raise ValueError(f"{prefix}.path and benchmark.hub_id are both null; give a local file or a hub id")
        if self.path is not None and not Path(self.path).expanduser().exists():
            raise ValueError(f"{prefix}.path={self.path} does not exist")
        self._records: dict[str, list[dict[str, Any]]] = {}

    def _split(self, split: str) -> list[dict[str, Any]]:
        if self.path is not None and Path(self.path).expanduser().is_file():
            split = "<file>"  # a file is one split, whatever the config names it
        if split not in self._records:
            self._records[split] = load_records(
                self.name,
                path=self.path,
                hub_id=self.hub_id,
                hub_config=self.hub_config,
                split=split,
                columns=(self.question_key, self.answer_key),
            )
        return self._records[split]

    def worked_solution(self, problem: Problem) -> str:
        """The record's worked solution: a GSM8K answer's text before ``####``, else its
        ``solution`` field (MATH); ValueError when the record has neither."""
        raw = str(problem.entry.get(self.answer_key, ""))
        if "####" in raw:
            return raw.rsplit("####", 1)[0].strip()
        if problem.entry.get("solution"):
            return str(problem.entry["solution"])
        raise ValueError(f"teacher.context=worked: benchmark {self.name}'s records have no worked solution")

    def _problem(self, record: dict[str, Any], split: str) -> Problem:
        missing = [key for key in (self.question_key, self.answer_key) if record.get(key) is None]
        if missing:
            raise BenchmarkDataError(
                f"benchmark {self.name}: a record of split {split!r} has no {' / '.join(missing)}; its keys are "
                f"{', '.join(record)}. Name the columns with benchmark.question_key= and benchmark.answer_key="
            )
        question = str(record[self.question_key]).strip()
        return Problem(prompt=question + self.prompt_suffix, answer=gold_answer(record[self.answer_key]), entry=record)

    @cached_property
    def eval(self) -> list[Problem]:
        records = pick_eval(self._split(self.eval_split), self.eval_size, self.seed, self.name, self.eval_split)
        return [self._problem(record, self.eval_split) for record in records]

    @cached_property
    def train(self) -> list[Problem]:
        if self.train_split is None:
            raise ValueError(
                f"benchmark {self.name} is eval-only (train_split: null), it has no train prompts; train on a "
                f"benchmark that has them (deepmath, gsm8k, arith) and evaluate on {self.name}, or give "
                f"benchmark.train_split=<split> with a dataset that has one"
            )
        problems = [self._problem(record, self.train_split) for record in self._split(self.train_split)]
        return drop_eval_prompts(problems, self.eval, self.name, self.train_split)

    def score(self, problem: Problem, response: str) -> float:
        """1.0 iff the response's final answer equals the gold answer under math-verify (see ``grade``)."""
        return grade(problem.answer, response)
