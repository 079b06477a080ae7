"""`toolalpaca`: tool use on ToolAlpaca's simulated REST APIs (Tang et al. 2023, arXiv 2306.05301).

    opdx eval model=smollm2_135m benchmark=toolalpaca benchmark.path=tests/fixtures/toolalpaca
    opdx train benchmark=toolalpaca benchmark.path=/path/to/ToolAlpaca/data   # train_data -> eval_simulated

Data: the release files of github.com/tangqiaoyu/ToolAlpaca (``data/train_data.json``,
``data/eval_simulated.json``, ``data/eval_real.json``), each a JSON list with one entry per API:
Name, Description, Documentation (an OpenAPI spec as a JSON string), Function_Description
(function name -> text, plus a "components" text), Function_Projection (function name -> [path,
method]) and either

- Instructions + Golden_Answers (the eval files): one list of ``{"Action", "Action_Input"}`` per
  instruction, Action_Input a JSON string; or
- Instances (train_data): ``{"input", "output", "Final Thought", "intermediate_steps"}`` with
  steps ``[[action, action_input, log], observation]`` (agent runs against the simulator).

Golden_Answers win when an entry has both (Instances are then a model's outputs).
``benchmark.path`` is the ``data/`` directory (splits are the file stems ``train_split`` and
``eval_split``) or one file (a single split: ``eval_size`` holds part of it out); ``hub_id``
reads a hub copy with the same columns instead. The repository is not on the hub as such, so
there is no data without a path: download it and pass ``benchmark.path=``.

One problem per instruction (the Golden_Answers) or per instance whose first step calls one of
the API's functions (instances starting with getDetails, an invalid tool or an unparseable
Action Input are skipped). The prompt is the instruction (an instance input without its
``\\nHint: ...`` tail, as ToolAlpaca's build_dataset.py; the API's Authentication appended as in
its generation.py); the tools are the API's functions (Function_Projection order) as JSON schema,
the parameters taken from the OpenAPI Documentation (path, query, header and JSON-body
parameters, local $refs resolved), or a permissive empty schema with the full
Function_Description text when the Documentation lacks the function.

Grading, our automatic proxy: ToolAlpaca itself grades whole solution processes and final
responses with GPT-4 (evaluation.py, prompts/Evaluation.txt), which we cannot run in a reward.
``score`` is 1.0 iff the FIRST call parsed from the response (``tool_calls.parse_tool_calls``)
names the gold first action and its arguments equal the gold Action_Input (JSON-parsed) after
strings are normalised with BFCL's ``standardize_string`` (case, spaces and ``,./-_*^`` ignored;
1 == 1.0 but "1" != 1); an argument whose value is "" or null, or equals the parameter's
documented default, counts as absent on either side (the golden answers write ``"gender": ""``
for an unspecified optional parameter).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from opdx.benchmarks.base import Problem, SingleComponent
from opdx.benchmarks.data import BenchmarkDataError, drop_eval_prompts, load_records, pick_eval
from opdx.benchmarks.tool_calls import parse_tool_calls, standardize_string

SYSTEM_PROMPT = (
    "You can use the functions of the {name} API ({description}). Make the first function call that the "
    "user's request needs."
)
NO_DATA = (
    "benchmark toolalpaca: no data; download ToolAlpaca's data/ directory (github.com/tangqiaoyu/ToolAlpaca: "
    "train_data.json, eval_simulated.json, eval_real.json) and pass benchmark.path=/path/to/ToolAlpaca/data "
    "(or one of its .json files; tests/fixtures/toolalpaca is a small sample)"
)
MAX_REF_HOPS = 4


# ---------------------------------------------------------------- OpenAPI -> JSON-schema tools


def _resolve(spec: dict[str, Any], node: Any, hops: int = 0) -> Any:
    """``node`` with every local ``{"$ref": "#/..."}`` replaced by its target; a chain of more than
    MAX_REF_HOPS refs (a recursive schema) or a missing target becomes ``{}``."""
    if isinstance(node, list):
        return [_resolve(spec, item, hops) for item in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if not isinstance(ref, str):
        return {key: _resolve(spec, value, hops) for key, value in node.items()}
    target: Any = spec if ref.startswith("#/") and hops < MAX_REF_HOPS else None
    for part in ref[2:].split("/") if target is not None else []:
        target = target.get(part) if isinstance(target, dict) else None
    return _resolve(spec, target, hops + 1) if isinstance(target, dict) else {}


def openapi_function(spec: dict[str, Any], path: str, method: str) -> tuple[dict[str, Any], str] | None:
    """The JSON schema of an operation's inputs (path, query, header and cookie parameters and the
    properties of a JSON request body) and its summary, or None when the spec has no such operation."""
    path_item = spec.get("paths", {}).get(path) if isinstance(spec.get("paths"), dict) else None
    operation = path_item.get(method.lower()) if isinstance(path_item, dict) else None
    if not isinstance(operation, dict):
        return None
    properties: dict[str, Any] = {}
    required: list[str] = []
    for param in _resolve(spec, [*path_item.get("parameters", []), *operation.get("parameters", [])]):
        if not isinstance(param, dict) or not isinstance(param.get("name"), str):
            continue
        schema = dict(param.get("schema") or {})
        if param.get("description"):
            schema["description"] = param["description"]
        properties[param["name"]] = schema
        if param.get("required"):
            required.append(param["name"])
    content = (_resolve(spec, operation.get("requestBody")) or {}).get("content") or {}
    body = (content.get("application/json") or next(iter(content.values()), None) or {}).get("schema") or {}
    if isinstance(body.get("properties"), dict):
        properties.update(body["properties"])
        required += [name for name in body.get("required", []) if name in body["properties"]]
    parameters = {"type": "object", "properties": properties, "required": list(dict.fromkeys(required))}
    return parameters, str(operation.get("summary") or operation.get("description") or "").strip()


def _functions(entry: dict[str, Any]) -> dict[str, Any]:
    """Function name -> [path, method] (Function_Projection; for an entry without one, the
    Function_Description names, with no path)."""
    projection = {name: where for name, where in (entry.get("Function_Projection") or {}).items() if where}
    if projection:
        return projection
    return {name: None for name in entry.get("Function_Description") or {} if name != "components"}


def api_tools(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """The API's functions as chat-template tools, parameters from the OpenAPI Documentation."""
    try:
        spec = json.loads(entry.get("Documentation") or "")
    except (json.JSONDecodeError, TypeError):
        spec = {}
    spec = spec if isinstance(spec, dict) else {}
    texts = entry.get("Function_Description") or {}
    tools = []
    for name, where in _functions(entry).items():
        text = str(texts.get(name) or "").strip()
        found = openapi_function(spec, *where) if isinstance(where, list) and len(where) == 2 else None
        if found is None:  # no documented operation: the whole text, which lists the parameters in words
            parameters, description = {"type": "object", "properties": {}, "additionalProperties": True}, text or name
        else:
            parameters, summary = found
            description = text.split("Parameters:", 1)[0].strip() or summary or name
        function = {"name": name, "description": description, "parameters": parameters}
        tools.append({"type": "function", "function": function})
    return tools


# ---------------------------------------------------------------- gold calls and grading


def parse_action_input(action_input: Any) -> dict[str, Any] | None:
    """An Action Input as a dict: JSON, else the span from the first '{' to the last '}' (as
    ToolAlpaca's parse_json_string); None when it is not a JSON object."""
    if isinstance(action_input, dict):
        return action_input
    text = str(action_input).strip()
    for candidate in (text, text[text.find("{") : text.rfind("}") + 1]):
        try:
            value = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return None


def _normal(value: Any) -> Any:
    if isinstance(value, str):
        return standardize_string(value)
    if isinstance(value, dict):
        return {key: _normal(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normal(item) for item in value]
    return value


def significant_arguments(arguments: dict[str, Any], properties: dict[str, Any]) -> dict[str, Any]:
    """Normalised arguments without those that say nothing: "" or null, or the documented default."""
    kept = {}
    for name, value in arguments.items():
        schema = properties.get(name) if isinstance(properties.get(name), dict) else {}
        if value in ("", None) or ("default" in schema and _normal(value) == _normal(schema["default"])):
            continue
        kept[name] = _normal(value)
    return kept


def _gold_steps(entry: dict[str, Any]) -> list[tuple[str, Any, dict[str, Any]]]:
    """(prompt, raw gold action + input, raw record) per instruction or instance of an API entry."""
    auth = entry.get("Authentication") or {}
    suffix = "\nAuthentication information: " + " ".join(f"{k}={v}" for k, v in auth.items()) if auth else ""
    if entry.get("Golden_Answers") is not None:
        pairs = zip(entry.get("Instructions") or [], entry["Golden_Answers"], strict=False)  # by index
        return [
            (instruction + suffix, (answers[0].get("Action"), answers[0].get("Action_Input")), {"golden": answers})
            for instruction, answers in pairs
            if answers
        ]
    steps = []
    for instance in entry.get("Instances") or []:
        trace = instance.get("intermediate_steps") if isinstance(instance, dict) else None
        try:
            action, action_input = trace[0][0][0], trace[0][0][1]  # [[action, action_input, log], observation]
        except (IndexError, KeyError, TypeError):
            continue
        prompt = str(instance.get("input") or "").rsplit("\nHint: ", 1)[0]
        steps.append((prompt, (action, action_input), {"intermediate_steps": trace}))
    return steps


def api_problems(entry: dict[str, Any]) -> list[Problem]:
    """The problems of one API entry (see the module docstring for which are kept)."""
    tools = api_tools(entry)
    names = {tool["function"]["name"] for tool in tools}
    system = SYSTEM_PROMPT.format(name=entry.get("Name"), description=entry.get("Description") or "")
    problems = []
    for prompt, (action, action_input), source in _gold_steps(entry):
        arguments = parse_action_input(action_input)
        if action not in names or arguments is None or not prompt.strip():
            continue
        answer = f"<tool_call>{json.dumps({'name': action, 'arguments': arguments})}</tool_call>"
        record = {"api": entry.get("Name"), "action": action, "arguments": arguments, **source}
        problems.append(Problem(prompt=prompt, answer=answer, entry=record, system=system, tools=tools))
    return problems


def grade(problem: Problem, response: str) -> float:
    """1.0 iff the response's first call is the gold first action with the same significant arguments."""
    calls = parse_tool_calls(response)
    if not calls or calls[0].name != problem.entry["action"]:
        return 0.0
    tool = next(t for t in problem.tools or [] if t["function"]["name"] == problem.entry["action"])
    properties = tool["function"]["parameters"].get("properties", {})
    gold = significant_arguments(problem.entry["arguments"], properties)
    return float(significant_arguments(calls[0].arguments, properties) == gold)


# ---------------------------------------------------------------- the benchmark


@dataclass
class ToolAlpacaBenchmark(SingleComponent):
    """Options as in conf/benchmark/toolalpaca.yaml: where the release files are (a directory, a
    file or a hub copy), the splits (file stems), the eval subset and its seed."""

    name: str
    path: str | None
    hub_id: str | None
    hub_config: str | None
    train_split: str | None
    eval_split: str
    eval_size: int | None
    seed: int

    def __post_init__(self) -> None:
        for key in ("path", "hub_id", "hub_config", "train_split", "eval_split"):
            if getattr(self, key) == "":
                raise ValueError(f"benchmark.{key}='' is invalid; give a non-empty string or null")
        if self.eval_size is not None and self.eval_size < 1:
            raise ValueError(
                f"benchmark.eval_size={self.eval_size!r} is invalid; give a positive integer or null (all)"
            )
        if self.seed < 0:
            raise ValueError(f"benchmark.seed={self.seed!r} is invalid; it must be a non-negative integer")
        if self.path is not None and not Path(self.path).expanduser().exists():
            raise ValueError(f"benchmark.path={self.path} does not exist; {NO_DATA}")
        self._records: dict[str, list[dict[str, Any]]] = {}

    def _split(self, split: str) -> list[dict[str, Any]]:
        """The API entries of a split: ``path/<split>.json``, the file ``path``, or the hub split."""
        local = None if self.path is None else Path(self.path).expanduser()
        if local is not None and local.is_file():
            split = "<file>"  # a file is one split, whatever the config names it
        if split not in self._records:
            if local is None and self.hub_id is None:
                raise BenchmarkDataError(NO_DATA)
            if local is not None and local.is_dir():
                file = local / f"{split}.json"
                if not file.is_file():
                    present = ", ".join(sorted(p.stem for p in local.glob("*.json"))) or "none"
                    raise BenchmarkDataError(
                        f"benchmark toolalpaca: no {file.name} in {local} (its .json files: {present}); set "
                        f"benchmark.train_split / benchmark.eval_split to file stems there"
                    )
                local = file
            self._records[split] = load_records(
                "toolalpaca",
                path=None if local is None else str(local),
                hub_id=self.hub_id,
                hub_config=self.hub_config,
                split=split,
            )
        return self._records[split]

    def _problems(self, split: str) -> list[Problem]:
        problems = [problem for entry in self._split(split) for problem in api_problems(entry)]
        if not problems:
            raise BenchmarkDataError(
                f"benchmark toolalpaca: split {split!r} has no usable problems (API entries with Instructions + "
                f"Golden_Answers or Instances whose first step calls one of the API's Function_Projection functions)"
            )
        return problems

    @cached_property
    def eval(self) -> list[Problem]:
        return pick_eval(self._problems(self.eval_split), self.eval_size, self.seed, "toolalpaca", self.eval_split)

    @cached_property
    def train(self) -> list[Problem]:
        if self.train_split is None:
            raise ValueError(
                "benchmark toolalpaca is eval-only (train_split: null); give benchmark.train_split=train_data"
            )
        return drop_eval_prompts(self._problems(self.train_split), self.eval, "toolalpaca", self.train_split)

    def score(self, problem: Problem, response: str) -> float:
        """1.0 iff the first call is the gold first action with equal arguments (see ``grade``)."""
        return grade(problem, response)
