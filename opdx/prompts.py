"""Prompt rendering: a problem's chat messages and tool schemas to token ids, the same for every
backend (the Hugging Face sampler, the scorers, and any other), so they all see identical ids.

    encode_prompts(tokenizer, problems)   # -> one list of token ids per problem
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from opdx.benchmarks import Problem

TOOLS_INSTRUCTION = (
    "You can call these functions. To call one, answer with "
    '<tool_call>{"name": <function name>, "arguments": <arguments as a JSON object>}</tool_call>, '
    "one block per call.\n<tools>\n"
)


def chat_messages(problem: Problem, template_has_tools: bool) -> list[dict[str, str]]:
    """System (if any) and user messages; tool schemas go into the system message when the
    chat template cannot take ``tools=`` itself."""
    system = problem.system
    if problem.tools and not template_has_tools:
        schemas = "\n".join(json.dumps(tool) for tool in problem.tools)
        system = f"{system}\n\n" if system else ""
        system += f"{TOOLS_INSTRUCTION}{schemas}\n</tools>"
    messages = [{"role": "system", "content": system}] if system else []
    return [*messages, {"role": "user", "content": problem.prompt}]


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Problem | str]) -> list[list[int]]:
    """Token ids of each prompt (a Problem, or a bare user message): the chat template when the
    tokenizer has one (with the problem's tool schemas, through ``tools=`` when the template
    handles them), else the plain encoding with the tokenizer's own special tokens (BOS for the
    tiny tokenizer)."""
    problems = [Problem(prompt=p, answer="") if isinstance(p, str) else p for p in prompts]
    if not tokenizer.chat_template:
        if any(p.system or p.tools for p in problems):
            raise ValueError("system messages and tools need a tokenizer with a chat template")
        return tokenizer([p.prompt for p in problems])["input_ids"]
    template_has_tools = "tools" in tokenizer.chat_template
    return [
        tokenizer.apply_chat_template(
            chat_messages(problem, template_has_tools),
            tools=problem.tools if template_has_tools else None,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        for problem in problems
    ]
