import json

import pytest
import torch

from opdx.models import asset_path
from opdx.rollout import (
    Rollout,
    SamplingParams,
    decode_responses,
    response_mask,
    sample,
    sequence_logits,
    sequence_logprobs,
)

PROMPTS = ["12+7=", "3-45+6=", "9="]


@pytest.fixture(scope="module")
def student():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = asset_path("tiny/student")
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def test_response_mask_includes_first_eos_only():
    tokens = torch.tensor([[5, 6, 2, 0, 0], [5, 5, 5, 5, 5], [2, 7, 2, 0, 0]])
    mask, finished = response_mask(tokens, eos_token_id=2)
    assert mask.int().tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert finished.tolist() == [True, False, True]


@pytest.mark.parametrize(
    "params", [SamplingParams(), SamplingParams(temperature=0.7, top_k=5), SamplingParams(top_p=0.8)]
)
def test_recorded_logprobs_are_those_of_the_sampling_distribution(student, params):
    model, tokenizer = student
    torch.manual_seed(0)
    rollout = sample(model, tokenizer, PROMPTS, 4, 12, params)
    assert rollout.response_tokens_B_T.shape[0] == 12
    mask = rollout.response_mask_B_T
    recomputed = sequence_logprobs(model, rollout, params)
    torch.testing.assert_close(recomputed[mask], rollout.logp_sampling_B_T[mask], atol=2e-5, rtol=0)
    if not params.is_plain:  # the raw student's log-probs differ from the warped ones
        assert (sequence_logprobs(model, rollout)[mask] - rollout.logp_sampling_B_T[mask]).abs().max() > 1e-2
    assert bool((rollout.logp_sampling_B_T[mask] > -float("inf")).all())


def test_chunking_and_left_padding_do_not_change_logprobs(student):
    model, tokenizer = student
    torch.manual_seed(1)
    rollout = sample(model, tokenizer, PROMPTS, 2, 10)
    full = sequence_logprobs(model, rollout, chunk_size=128)
    torch.testing.assert_close(sequence_logprobs(model, rollout, chunk_size=3), full)
    alone = Rollout(
        rollout.prompt_tokens_B_L[-1:, -2:],
        rollout.prompt_mask_B_L[-1:, -2:],
        rollout.response_tokens_B_T[-1:],
        rollout.response_mask_B_T[-1:],
    )  # "9=" has BOS + 2 tokens: drop its left padding
    alone.prompt_tokens_B_L = rollout.prompt_tokens_B_L[-1:, -3:]
    alone.prompt_mask_B_L = rollout.prompt_mask_B_L[-1:, -3:]
    mask = rollout.response_mask_B_T[-1]
    torch.testing.assert_close(sequence_logprobs(model, alone)[0][mask], full[-1][mask], atol=5e-5, rtol=0)


def test_chunked_logprobs_backprop_like_full_logits(student):
    model, tokenizer = student
    torch.manual_seed(2)
    rollout = sample(model, tokenizer, PROMPTS, 2, 8)
    mask = rollout.response_mask_B_T
    chunked = (sequence_logprobs(model, rollout, chunk_size=2) * mask).sum()
    grads_chunked = torch.autograd.grad(chunked, list(model.parameters()))
    logits = sequence_logits(model, rollout)
    full = (logits.log_softmax(-1).gather(-1, rollout.response_tokens_B_T[..., None]).squeeze(-1) * mask).sum()
    grads_full = torch.autograd.grad(full, list(model.parameters()))
    for a, b in zip(grads_chunked, grads_full, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_greedy_is_deterministic_and_decodes_text(student):
    model, tokenizer = student
    first = decode_responses(tokenizer, sample(model, tokenizer, PROMPTS, 1, 12, greedy=True))
    second = decode_responses(tokenizer, sample(model, tokenizer, PROMPTS, 1, 12, greedy=True))
    assert first == second
    assert all(set(text) <= set("0123456789+-*/()=;# ") for text in first)


def test_prompts_go_through_the_chat_template_when_there_is_one(student):
    from opdx.rollout import encode_prompts

    _, tokenizer = student
    templated = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    templated.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}=;{% endif %}"
    )
    ids = encode_prompts(templated, ["1+2"])
    assert isinstance(ids[0], list) and all(isinstance(i, int) for i in ids[0])
    assert templated.decode(ids[0]) == "1+2=;"


TOOL = {"type": "function", "function": {"name": "add", "description": "x+y", "parameters": {"type": "object"}}}


def test_tools_go_to_the_template_when_it_takes_them(student):
    from opdx.benchmarks import Problem
    from opdx.rollout import encode_prompts

    _, tokenizer = student
    templated = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    templated.chat_template = (
        "{% if tools %}{{ tools | length }}#{% endif %}{% for m in messages %}{{ m['content'] }};{% endfor %}="
    )
    problem = Problem(prompt="1+2", answer="3", system="0", tools=[TOOL, TOOL])
    assert templated.decode(encode_prompts(templated, [problem])[0]) == "2#0;1+2;="
    with pytest.raises(ValueError, match="chat template"):
        encode_prompts(tokenizer, [problem])


def test_tools_go_to_the_system_message_when_the_template_has_no_tools_support():
    from opdx.benchmarks import Problem
    from opdx.rollout import TOOLS_INSTRUCTION, chat_messages

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


def test_gradient_checkpointing_gives_the_same_gradients(student):
    """trainer.gradient_checkpointing recomputes layers in backward: same gradients, less memory."""
    model, tokenizer = student
    rollout = sample(model, tokenizer, PROMPTS, 2, 8)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": False})
        model.train()
        model.zero_grad()
        sequence_logprobs(model, rollout)[rollout.response_mask_B_T].sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    model.activation_checkpointing_disable()
    model.eval()
    for without, with_checkpointing in zip(*grads, strict=True):
        torch.testing.assert_close(with_checkpointing, without, rtol=1e-5, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in grads[0])


def test_on_step_counts_decoding_steps_and_changes_nothing(student):
    model, tokenizer = student
    steps = []
    torch.manual_seed(3)
    counted = sample(model, tokenizer, PROMPTS, 2, 12, SamplingParams(temperature=0.8), on_step=lambda: steps.append(1))
    torch.manual_seed(3)
    plain = sample(model, tokenizer, PROMPTS, 2, 12, SamplingParams(temperature=0.8))
    assert len(steps) == counted.response_tokens_B_T.shape[1] > 1
    assert torch.equal(counted.response_tokens_B_T, plain.response_tokens_B_T)
    assert torch.equal(counted.logp_sampling_B_T, plain.logp_sampling_B_T)
