import json

import pytest
from transformers import AutoTokenizer

from opdx.benchmarks import Problem
from opdx.config import asset_path
from opdx.prompts import TOOLS_INSTRUCTION, chat_messages, encode_prompts


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(asset_path("tiny/student"))


def test_prompts_go_through_the_chat_template_when_there_is_one(tokenizer):
    templated = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    templated.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}=;{% endif %}"
    )
    ids = encode_prompts(templated, ["1+2"])
    assert isinstance(ids[0], list) and all(isinstance(i, int) for i in ids[0])
    assert templated.decode(ids[0]) == "1+2=;"


TOOL = {"type": "function", "function": {"name": "add", "description": "x+y", "parameters": {"type": "object"}}}


def test_tools_go_to_the_template_when_it_takes_them(tokenizer):
    from opdx.benchmarks import Problem

    templated = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    templated.chat_template = (
        "{% if tools %}{{ tools | length }}#{% endif %}{% for m in messages %}{{ m['content'] }};{% endfor %}="
    )
    problem = Problem(prompt="1+2", answer="3", system="0", tools=[TOOL, TOOL])
    assert templated.decode(encode_prompts(templated, [problem])[0]) == "2#0;1+2;="
    with pytest.raises(ValueError, match="chat template"):
        encode_prompts(tokenizer, [problem])


def test_tools_go_to_the_system_message_when_the_template_has_no_tools_support():
    problem = Problem(prompt="add 1 and 2", answer="", system="Answer with calls only.", tools=[TOOL])
    system, user = chat_messages(problem, template_has_tools=False)
    assert user == {"role": "user", "content": "add 1 and 2"}
    assert system["role"] == "system" and system["content"].startswith(
        "Answer with calls only.\n\n" + TOOLS_INSTRUCTION
    )
    assert json.loads(system["content"].split("<tools>\n")[1].split("\n</tools>")[0]) == TOOL
    assert chat_messages(problem, template_has_tools=True) == [
        {"role": "system", "content": "Answer with calls only."},
        user,
    ]
    assert chat_messages(Problem(prompt="hi", answer=""), template_has_tools=False) == [
        {"role": "user", "content": "hi"}
    ]
