import pytest

from opdx.benchmarks.tool_calls import (
    ToolCall,
    bfcl_tool,
    check_calls,
    json_schema,
    parse_tool_calls,
    standardize_string,
)

# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "calls"),
    [
        ('<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>', [ToolCall("f", {"a": 1})]),
        ('<tool_call>\n{"name": "f", "parameters": {"a": "x"}}\n</tool_call>', [ToolCall("f", {"a": "x"})]),
        (
            'I will call both.\n<tool_call>{"name": "m.f", "arguments": {"a": 1}}</tool_call>\n'
            '<tool_call>{"name": "g", "arguments": {}}</tool_call>',
            [ToolCall("m.f", {"a": 1}), ToolCall("g", {})],
        ),
        (
            '<tool_call>[{"name": "f", "arguments": {"a": 1}}, {"name": "f", "arguments": {"a": 2}}]</tool_call>',
            [ToolCall("f", {"a": 1}), ToolCall("f", {"a": 2})],
        ),
        ('<tool_call>{"name": "f", "arguments": {"a": [1, 2]}}', [ToolCall("f", {"a": [1, 2]})]),  # cut off at EOS
        (
            '<think>maybe {"name": "no", "arguments": {}}</think>\n'
            '<tool_call>{"name": "yes", "arguments": {}}</tool_call>',
            [ToolCall("yes", {})],
        ),
        (
            'Here you go:\n```json\n[{"name": "f", "arguments": {"a": true, "b": null}}]\n```\nDone.',
            [ToolCall("f", {"a": True, "b": None})],
        ),
        ("```\nf(a=1)\n```", [ToolCall("f", {"a": 1})]),
        ('Sure: {"name": "f", "arguments": {"x": {"y": [1]}}} is the call.', [ToolCall("f", {"x": {"y": [1]}})]),
        (
            'First {"name": "f", "arguments": {"a": 1}} then {"name": "g", "arguments": {"b": 2}}',
            [ToolCall("f", {"a": 1}), ToolCall("g", {"b": 2})],
        ),
        ('{"tool_calls": [{"name": "f", "arguments": {"a": 1}}]}', [ToolCall("f", {"a": 1})]),
        ('{"type": "function", "function": {"name": "f", "arguments": "{\\"a\\": 1}"}}', [ToolCall("f", {"a": 1})]),
        (
            '[math.factorial(number=5), f(a=1, b="x")]',
            [ToolCall("math.factorial", {"number": 5}), ToolCall("f", {"a": 1, "b": "x"})],
        ),
        ("func(a=1)", [ToolCall("func", {"a": 1})]),
        (
            "a.b.c(x=[1, 2], y={'k': (1, 2)}, z=-3.5, w=None, t=True)",
            [ToolCall("a.b.c", {"x": [1, 2], "y": {"k": (1, 2)}, "z": -3.5, "w": None, "t": True})],
        ),
        ("  'f(a=\"q\")'  ", [ToolCall("f", {"a": "q"})]),
    ],
)
def test_parse_tool_calls_formats(text, calls):
    assert parse_tool_calls(text) == calls


@pytest.mark.parametrize(
    "text",
    [
        "",
        "hello world",
        "The answer is 42.",
        "{not json",
        "[1, 2, 3]",
        '{"foo": 1}',
        '{"name": 3, "arguments": {}}',
        '{"name": "f", "arguments": [1]}',
        "f(5)",  # positional arguments
        "f(a=x)",  # a variable, not a literal
        "f(a=g(1))",
        "f(**kw)",
        "f(a=1",
        '<think>I could answer {"name": "f", "arguments": {"a": 1}} but let me think more',  # cut off
        '<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call><tool_call>{"name": oops}</tool_call>',
        '<tool_call>{"name": "f"  "arguments": {}}</tool_call> {"name": "g", "arguments": {}}',
    ],
)
def test_parse_tool_calls_rejects_garbage(text):
    assert parse_tool_calls(text) == []


# ---------------------------------------------------------------- BFCL docs as JSON schema


def test_bfcl_types_become_json_schema():
    doc = {
        "name": "f",
        "description": "d",
        "parameters": {
            "type": "dict",
            "properties": {
                "a": {"type": "float", "description": "x", "default": 1.0},
                "b": {"type": "tuple", "items": {"type": "dict", "properties": {"c": {"type": "any"}}}},
                "d": {"type": "any"},
                "e": {"type": "array", "items": {"type": "float"}},
            },
            "required": ["a"],
        },
    }
    tool = bfcl_tool(doc)
    params = tool["function"]["parameters"]
    assert tool["type"] == "function" and tool["function"]["name"] == "f" and tool["function"]["description"] == "d"
    assert params["type"] == "object" and params["required"] == ["a"]
    assert params["properties"]["a"] == {"type": "number", "description": "x", "default": 1.0}
    assert params["properties"]["b"] == {"type": "array", "items": {"type": "object", "properties": {"c": {}}}}
    assert params["properties"]["d"] == {}
    assert params["properties"]["e"]["items"] == {"type": "number"}
    assert doc["parameters"]["type"] == "dict"  # the doc itself is left alone
    assert json_schema({"type": "string", "enum": ["x"]}) == {"type": "string", "enum": ["x"]}


# ---------------------------------------------------------------- BFCL's checker

WEATHER = {
    "name": "weather.get",
    "description": "Weather of a city.",
    "parameters": {
        "type": "dict",
        "properties": {
            "city": {"type": "string"},
            "days": {"type": "integer"},
            "scale": {"type": "float"},
            "units": {"type": "string"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "coords": {"type": "tuple", "items": {"type": "float"}},
            "options": {"type": "dict", "properties": {"alerts": {"type": "boolean"}, "lang": {"type": "string"}}},
            "stops": {"type": "array", "items": {"type": "dict"}},
            "code": {"type": "any"},
            "detailed": {"type": "boolean"},
        },
        "required": ["city", "days"],
    },
}
TIME = {
    "name": "time.now",
    "description": "Local time of a city.",
    "parameters": {"type": "dict", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
ANSWER = {
    "weather.get": {
        "city": ["New York", "NYC"],
        "days": [3],
        "scale": [2.0, ""],
        "units": ["celsius", "metric", ""],
        "tags": [["rain", "wind"], ""],
        "coords": [[40.5, -74.0], ""],
        "options": [{"alerts": [True], "lang": ["en", ""]}, ""],
        "stops": [[{"name": ["a"]}, {"name": ["b"]}], ""],
        "code": [5, ""],
        "detailed": [False, ""],
    }
}


def simple(arguments: dict, name: str = "weather.get"):
    return check_calls([WEATHER], [ToolCall(name, arguments)], [ANSWER], "simple")


BASE = {"city": "New York", "days": 3}


@pytest.mark.parametrize(
    "arguments",
    [
        BASE,
        {"days": 3, "city": "New York", "units": "metric", "detailed": False},  # argument order is irrelevant
        {**BASE, "city": "new york"},
        {**BASE, "city": "NewYork"},
        {**BASE, "city": "new-york."},
        {**BASE, "city": "nyc"},  # another allowed value
        {**BASE, "scale": 2},  # int for float
        {**BASE, "scale": 2.0},
        {**BASE, "tags": ["Rain", "wind"]},  # list items standardised
        {**BASE, "coords": [40.5, -74.0]},
        {**BASE, "options": {"alerts": True, "lang": "EN"}},
        {**BASE, "options": {"alerts": True}},  # an optional dict key left out
        {**BASE, "stops": [{"name": "A"}, {"name": "b"}]},
        {**BASE, "code": 5},  # "any" with an int answer: a variable, compared for membership
    ],
)
def test_checker_accepts(arguments):
    result = simple(arguments)
    assert result.valid, result.error


@pytest.mark.parametrize(
    ("arguments", "error"),
    [
        ({"city": "New York"}, "missing required parameter 'days'"),
        ({**BASE, "wind": 1}, "unexpected parameter 'wind'"),  # not in the doc
        ({**BASE, "city": "New York City"}, "invalid value for 'city'"),
        ({**BASE, "days": "3"}, "wrong type for 'days'"),  # str for int
        ({**BASE, "days": 3.0}, "wrong type for 'days'"),  # float for int
        ({**BASE, "detailed": 0}, "wrong type for 'detailed'"),
        ({**BASE, "days": 4}, "invalid value for 'days'"),
        ({**BASE, "scale": 2.5}, "invalid value for 'scale'"),
        ({**BASE, "units": "kelvin"}, "invalid value for 'units'"),
        ({**BASE, "tags": ["wind", "rain"]}, "invalid value for 'tags'"),  # list order matters
        ({**BASE, "tags": ["rain"]}, "invalid value for 'tags'"),
        ({**BASE, "tags": [1, 2]}, "invalid value for 'tags'"),  # "" allowed: BFCL skips the item types
        ({**BASE, "options": {"alerts": True, "lang": "fr"}}, "invalid value for key 'lang'"),
        ({**BASE, "options": {"alerts": True, "extra": 1}}, "unexpected key 'extra'"),
        ({**BASE, "options": {"lang": "en"}}, "missing key 'alerts'"),
        ({**BASE, "stops": [{"name": "b"}, {"name": "a"}]}, "invalid value for key 'name'"),
        ({**BASE, "stops": [{"name": "a"}]}, "wrong number of dicts"),
        ({**BASE, "code": "5"}, "invalid value for 'code'"),
    ],
)
def test_checker_rejects(arguments, error):
    result = simple(arguments)
    assert not result.valid and error in result.error


def test_checker_name_and_param_rules():
    assert "wrong function" in simple(BASE, name="weather_get").error
    assert check_calls([WEATHER], [ToolCall("weather.get", BASE)], [ANSWER], "simple").valid
    # a param of the doc that the possible answer does not allow is unexpected
    narrow = {"weather.get": {"city": ["NYC"], "days": [3]}}
    assert (
        "unexpected parameter 'units'"
        in check_calls(
            [WEATHER], [ToolCall("weather.get", {**BASE, "units": "metric", "city": "NYC"})], [narrow], "simple"
        ).error
    )
    # a possible-answer param left out must allow ""
    strict = {"weather.get": {"city": ["NYC"], "days": [3], "units": ["metric"]}}
    result = check_calls([WEATHER], [ToolCall("weather.get", {"city": "NYC", "days": 3})], [strict], "simple")
    assert "missing parameter 'units'" in result.error
    # simple needs exactly one call
    two = [ToolCall("weather.get", BASE), ToolCall("weather.get", BASE)]
    assert "wrong number of calls: 2, expected 1" in check_calls([WEATHER], two, [ANSWER], "simple").error
    assert not check_calls([WEATHER], [], [ANSWER], "simple").valid
    # item types are checked one level deep against the list options
    lists = {"weather.get": {"city": ["NYC"], "days": [3], "tags": [["rain"]], "coords": [[40.5, -74.0]]}}
    for arguments in ({"tags": [1]}, {"coords": ["40.5", "-74"]}):
        call = ToolCall(
            "weather.get", {"city": "NYC", "days": 3, "tags": ["rain"], "coords": [40.5, -74.0], **arguments}
        )
        assert "nested type check failed" in check_calls([WEATHER], [call], [lists], "simple").error
    # python tuples from BFCL's own call syntax count for tuple params
    (call,) = parse_tool_calls("weather.get(city='NYC', days=3, coords=(40.5, -74))")
    assert check_calls([WEATHER], [call], [ANSWER], "simple").valid


def test_standardize_string_is_bfcl_s():
    assert standardize_string("April 1, 2024") == standardize_string("april 1 2024") == "april12024"
    assert standardize_string("a_b-c/d.e*f^g") == "abcdefg"
    assert standardize_string("O'Hare") == 'o"hare'


def test_multiple_checks_the_expected_function_s_doc():
    answer = [{"time.now": {"city": ["Paris"]}}]
    assert check_calls([WEATHER, TIME], [ToolCall("time.now", {"city": "paris"})], answer, "multiple").valid
    wrong = check_calls([WEATHER, TIME], [ToolCall("weather.get", {"city": "Paris", "days": 1})], answer, "multiple")
    assert not wrong.valid and "wrong function" in wrong.error
    two = [ToolCall("time.now", {"city": "Paris"})] * 2
    assert not check_calls([WEATHER, TIME], two, answer, "multiple").valid


def test_parallel_matching_is_order_free_and_counts():
    answer = [
        {"time.now": {"city": ["Paris"]}},
        {"time.now": {"city": ["Lima"]}},
        {"weather.get": {"city": ["NYC"], "days": [3]}},
    ]
    paris, lima = ToolCall("time.now", {"city": "Paris"}), ToolCall("time.now", {"city": "Lima"})
    weather = ToolCall("weather.get", {"city": "NYC", "days": 3})
    for calls in ([paris, lima, weather], [weather, lima, paris], [lima, weather, paris]):
        assert check_calls([WEATHER, TIME], calls, answer, "parallel_multiple").valid
    assert (
        "wrong number of calls: 2, expected 3"
        in check_calls([WEATHER, TIME], [paris, weather], answer, "parallel").error
    )
    twice = check_calls([WEATHER, TIME], [paris, paris, weather], answer, "parallel")  # each call matches once
    assert not twice.valid and "expected call 1 (time.now)" in twice.error
    four = [paris, lima, weather, weather]
    assert not check_calls([WEATHER, TIME], four, answer, "live_parallel").valid
