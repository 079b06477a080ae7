"""Function calls in a model's response, and BFCL's AST checker for them.

    parse_tool_calls('<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>')  # [ToolCall("f", {"a": 1})]
    parse_tool_calls('[math.factorial(number=5), g(x="y")]')                          # BFCL's prompt-mode syntax
    check_calls(function_docs, calls, ground_truth, "parallel").valid

``parse_tool_calls`` reads, in this order of precedence: ``<tool_call>...</tool_call>`` blocks
(Qwen / Hermes; "parameters" is accepted for "arguments", and the OpenAI ``{"function": {...}}``
wrapper too), fenced code blocks, Python call syntax (``f(a=1)`` or a list of calls; dotted
names; keyword arguments with literal values only), and finally every JSON call object or list
of them found anywhere in the text. Text up to a closing ``</think>`` is ignored (an unclosed
``<think>`` gives no calls). Anything unparseable gives ``[]``.

``check_calls`` re-implements the Python rules of BFCL's ``ast_checker``
(bfcl_eval/eval_checker/ast_eval/ast_checker.py) over its raw function docs and possible answers
(``[{name: {param: [allowed values]}}]``, ``""`` among the values marking an optional param):

- the function name matches; every required param is given; every given param is in the doc and
  in the possible answer;
- types per the doc (BFCL names: string, integer, float, boolean, array, tuple, dict, any = str):
  an int is accepted for a float, a tuple for a tuple param; arrays check their item type one
  level deep; a value of the possible answer's own type is taken as a "variable" and only
  compared for membership;
- strings compare after ``standardize_string`` (no spaces or ``,./-_*^``, lowercase, ``'`` -> ``"``),
  lists element-wise the same way, dicts and lists of dicts key by key (BFCL's dict_checker), any
  other value must be one of the allowed values;
- a param of the possible answer that the model left out must allow ``""``;
- categories: simple (exactly one call), multiple (one call, checked against the doc of the
  expected function), parallel and parallel_multiple (as many calls as expected, matched in any
  order: each expected call takes the first unmatched call that passes).
"""

from __future__ import annotations

import ast
import copy
import json
import re
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


# ---------------------------------------------------------------- parsing


def _call_from_json(value: Any) -> ToolCall | None:
    """``{"name": str, "arguments" | "parameters": dict or JSON string}``, or OpenAI's ``{"function": {...}}``."""
    if not isinstance(value, dict):
        return None
    if isinstance(value.get("function"), dict) and "name" not in value:
        value = value["function"]
    name = value.get("name")
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(name, str) or not name or not isinstance(arguments, dict):
        return None
    return ToolCall(name, arguments)


def _calls_from_json(value: Any) -> list[ToolCall] | None:
    items = value if isinstance(value, list) else [value]
    calls = [_call_from_json(item) for item in items]
    return calls if calls and all(calls) else None


def _dotted_name(node: ast.expr) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id, *reversed(parts)])


def _python_calls(text: str) -> list[ToolCall] | None:
    """``f(a=1)`` or ``[m.f(a=1), g(b="x")]``: keyword arguments with literal values only."""
    try:
        body = ast.parse(text.strip().strip("'`").strip(), mode="eval").body
    except (SyntaxError, ValueError):
        return None
    nodes = body.elts if isinstance(body, (ast.List, ast.Tuple)) else [body]
    calls = []
    for node in nodes:
        if not isinstance(node, ast.Call) or node.args or any(kw.arg is None for kw in node.keywords):
            return None
        name = _dotted_name(node.func)
        if name is None:
            return None
        try:
            arguments = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return None
        calls.append(ToolCall(name, arguments))
    return calls or None


def _calls_in(text: str) -> list[ToolCall] | None:
    """The calls of a text that is nothing but JSON call(s) or Python call syntax, else None."""
    try:
        return _calls_from_json(json.loads(text))
    except json.JSONDecodeError:
        return _python_calls(text)


JSON_START = re.compile(r"[\[{]")


def _json_calls_anywhere(text: str) -> list[ToolCall]:
    """Every JSON call object, or list of them, in the text, left to right."""
    decoder, calls, i = json.JSONDecoder(), [], 0
    while (match := JSON_START.search(text, i)) is not None:
        try:
            value, end = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            i = match.start() + 1
            continue
        found = _calls_from_json(value)
        calls += found or []
        i = end if found else match.start() + 1
    return calls


def parse_tool_calls(text: str) -> list[ToolCall]:
    """The function calls of a response, in order; [] when there are none, a block is malformed or
    the reasoning is cut off (``<think>`` with no ``</think>``)."""
    if "<think>" in text and "</think>" not in text:
        return []
    text = text.rsplit("</think>", 1)[-1]
    blocks = re.findall(r"<tool_call>(.*?)(?:</tool_call>|$)", text, re.DOTALL)
    if blocks:
        found = [_calls_in(block.strip()) for block in blocks]
        return [call for calls in found for call in calls] if all(found) else []
    fences = re.findall(r"```[\w-]*\n?(.*?)```", text, re.DOTALL)
    fenced = [calls for block in fences if (calls := _calls_in(block.strip()))]
    if fenced:
        return [call for calls in fenced for call in calls]
    return _python_calls(text) or _json_calls_anywhere(text)


# ---------------------------------------------------------------- BFCL function docs as JSON schema

BFCL_TO_JSON_SCHEMA = {"dict": "object", "float": "number", "tuple": "array"}


def json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A BFCL parameter schema in JSON-schema types (dict -> object, float -> number, tuple ->
    array, any -> no type constraint), recursing into properties and items."""
    out = {}
    for key, value in schema.items():
        if key == "type" and isinstance(value, str):
            if value != "any":
                out["type"] = BFCL_TO_JSON_SCHEMA.get(value, value)
        elif key == "properties" and isinstance(value, dict):
            out[key] = {name: json_schema(sub) for name, sub in value.items()}
        elif key == "items" and isinstance(value, dict):
            out[key] = json_schema(value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def bfcl_tool(doc: dict[str, Any]) -> dict[str, Any]:
    """A BFCL function doc as a chat-template tool: ``{"type": "function", "function": {...}}``."""
    function = {"name": doc["name"], "description": doc.get("description", "")}
    return {"type": "function", "function": {**function, "parameters": json_schema(doc.get("parameters", {}))}}


# ---------------------------------------------------------------- BFCL's AST checker (Python rules)

PYTHON_TYPES: dict[str, type] = {
    "string": str,
    "integer": int,
    "float": float,
    "boolean": bool,
    "array": list,
    "tuple": list,
    "dict": dict,
    "any": str,
}


@dataclass(frozen=True)
class CheckResult:
    valid: bool
    error: str = ""


OK = CheckResult(True)


def standardize_string(text: str) -> str:
    """BFCL's normalisation: drop spaces and ``,./-_*^``, lowercase, single quotes to double."""
    return re.sub(r"[ ,./\-_*^]", "", text).lower().replace("'", '"')


def _standard(value: Any) -> Any:
    return standardize_string(value) if type(value) is str else value


def _type_check(param: str, value: Any, allowed: list, kind: str, expected: type, item: type | None) -> CheckResult:
    """BFCL's type_checker; valid with error "variable" when the value has the possible answer's
    own type rather than the doc's (it is then only compared for membership)."""
    answer_type = next((type(option) for option in allowed if option != ""), None)
    variable = "variable" if answer_type is not None and answer_type is not expected else ""
    if type(value) is expected:
        if item is None:
            return CheckResult(True, variable)
        for option in allowed:  # one level deep: each item against the item type of some list option
            if type(option) is not list or all(
                _type_check(param, element, option, item.__name__, item, None).valid for element in value
            ):
                return CheckResult(True, variable)
        return CheckResult(False, f"nested type check failed for {param!r}: expected {kind} of {item.__name__}")
    if answer_type is not None and type(value) is answer_type:
        return CheckResult(True, "variable")
    return CheckResult(False, f"wrong type for {param!r}: expected {kind}, got {type(value).__name__} {value!r}")


def _string_check(param: str, value: str, allowed: list) -> CheckResult:
    if standardize_string(value) in [standardize_string(option) for option in allowed if type(option) is str]:
        return OK
    return CheckResult(False, f"invalid value for {param!r}: {value!r}, expected one of {allowed}")


def _list_check(param: str, value: list, allowed: list) -> CheckResult:
    options = [[_standard(x) for x in option] for option in allowed if isinstance(option, (list, str))]
    if [_standard(x) for x in value] in options:
        return OK
    return CheckResult(False, f"invalid value for {param!r}: {value!r}, expected one of {allowed}")


def _dict_check(param: str, value: Any, allowed: list) -> CheckResult:
    """BFCL's dict_checker: some non-empty option has every key of the value, the value's entry
    among its allowed values, and every option key the value lacks marked optional."""
    error = f"no allowed value for dict {param!r}"
    if not isinstance(value, dict):
        return CheckResult(False, f"{param!r}: expected a dict, got {value!r}")
    for option in allowed:
        if option == "" or not isinstance(option, dict):
            continue
        error = ""
        for key, entry in value.items():
            if key not in option:
                error = f"unexpected key {key!r} in dict {param!r}"
            elif _standard(entry) not in [_standard(x) for x in option[key]]:
                error = f"invalid value for key {key!r} of {param!r}: {entry!r}, expected one of {option[key]}"
            if error:
                break
        missing = [key for key, entries in option.items() if key not in value and "" not in entries]
        if not error and missing:
            error = f"missing key {missing[0]!r} in dict {param!r}"
        if not error:
            return OK
    return CheckResult(False, error)


def _list_of_dicts_check(param: str, value: list, allowed: list) -> CheckResult:
    """BFCL's list_dict_checker: some option of the same length matches dict by dict, in order."""
    errors = []
    for option in allowed:
        if not isinstance(option, (list, str)) or len(value) != len(option):
            continue
        failed = [r for r in (_dict_check(param, v, [o]) for v, o in zip(value, option, strict=True)) if not r.valid]
        if not failed:
            return OK
        errors.append(failed[0].error)
    return CheckResult(False, errors[0] if errors else f"wrong number of dicts in {param!r}")


def check_call(doc: dict[str, Any], call: ToolCall, answer: dict[str, dict[str, list]]) -> CheckResult:
    """BFCL's simple_function_checker: one call against its doc and possible answer ``{name: {param: [values]}}``."""
    allowed = next(iter(answer.values()))
    if call.name != doc["name"]:
        return CheckResult(False, f"wrong function: {call.name!r}, expected {doc['name']!r}")
    properties = doc["parameters"].get("properties", {})
    missing = [param for param in doc["parameters"].get("required", []) if param not in call.arguments]
    if missing:
        return CheckResult(False, f"missing required parameter {missing[0]!r}")
    for param, value in call.arguments.items():
        if param not in properties or param not in allowed:
            return CheckResult(False, f"unexpected parameter {param!r}")
        kind = properties[param].get("type", "any")
        if kind not in PYTHON_TYPES:
            return CheckResult(False, f"unsupported type {kind!r} of {param!r}")
        expected = PYTHON_TYPES[kind]
        item = PYTHON_TYPES.get(properties[param].get("items", {}).get("type")) if kind in ("array", "tuple") else None
        if kind == "tuple" and type(value) is tuple:
            value = list(value)
        if kind == "float" and type(value) is int:
            value = float(value)
        typed = _type_check(param, value, allowed[param], kind, expected, item)
        if not typed.valid:
            return typed
        special = None
        if typed.error != "variable":  # a "variable" is only compared for membership
            if expected is dict:
                special = _dict_check
            elif expected is list:
                special = _list_of_dicts_check if item is dict else _list_check
            elif expected is str:
                special = _string_check
        if special is not None:
            result = special(param, value, allowed[param])
            if not result.valid:
                return result
        elif value not in allowed[param]:
            return CheckResult(False, f"invalid value for {param!r}: {value!r}, expected one of {allowed[param]}")
    for param, values in allowed.items():
        if param not in call.arguments and "" not in values:
            return CheckResult(False, f"missing parameter {param!r} (not optional in the possible answer)")
    return OK


def _doc(docs: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    return next((doc for doc in docs if doc["name"] == name), None)


def check_calls(
    docs: list[dict[str, Any]], calls: list[ToolCall], ground_truth: list[dict[str, dict[str, list]]], category: str
) -> CheckResult:
    """BFCL's ast_checker for Python: ``category`` containing "parallel" -> order-free matching of
    every expected call, containing "multiple" -> one call checked against the expected function's
    doc, else simple -> exactly one call against the only doc."""
    expected = len(ground_truth) if "parallel" in category or "multiple" in category else 1
    if len(calls) != expected:
        return CheckResult(False, f"wrong number of calls: {len(calls)}, expected {expected}")
    if "parallel" not in category:
        doc = _doc(docs, next(iter(ground_truth[0]))) if "multiple" in category else docs[0]
        if doc is None:
            return CheckResult(False, f"no function doc named {next(iter(ground_truth[0]))!r}")
        return check_call(doc, calls[0], ground_truth[0])
    matched: set[int] = set()
    for i, answer in enumerate(ground_truth):
        name = next(iter(answer))
        doc = _doc(docs, name)
        if doc is None:
            return CheckResult(False, f"no function doc named {name!r}")
        errors = []
        for j, call in enumerate(calls):
            if j in matched:
                continue
            result = check_call(doc, call, answer)
            if result.valid:
                matched.add(j)
                break
            errors.append(f"call {j}: {result.error}")
        else:
            return CheckResult(False, f"no call matches expected call {i} ({name}): " + "; ".join(errors))
    return OK
