"""opdx.backends.hf: sampling with generate and the log-probs it records."""

from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM

from opdx.backends.hf import HFModel
from opdx.benchmarks import privileged
from opdx.config import asset_path
from opdx.policy import TokenScores
from opdx.prompts import encode_prompts
from opdx.rollout import SamplingParams, decode_responses, pad

PROMPTS = ["12+7=", "3-45+6=", "9="]


@pytest.fixture(scope="module")
def student():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = asset_path("tiny/student")
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize(
    "params", [SamplingParams(), SamplingParams(temperature=0.7, top_k=5), SamplingParams(top_p=0.8)]
)
def test_recorded_logprobs_are_those_of_the_sampling_distribution(student, params):
    model, tokenizer = student
    torch.manual_seed(0)
    rollout = HFModel(model, tokenizer).sample(PROMPTS, 4, 12, params)
    assert rollout.response_tokens_B_T.shape[0] == 12
    mask = rollout.response_mask_B_T
    recomputed = TokenScores(model)(rollout, params)
    torch.testing.assert_close(recomputed[mask], rollout.logp_sampling_B_T[mask], atol=2e-5, rtol=0)
    if not params.is_plain:  # the raw student's log-probs differ from the warped ones
        assert (TokenScores(model)(rollout)[mask] - rollout.logp_sampling_B_T[mask]).abs().max() > 1e-2
    assert bool((rollout.logp_sampling_B_T[mask] > -float("inf")).all())


def test_a_bfloat16_model_samples_and_records_with_the_float32_head_of_the_scoring_forward(monkeypatch):
    """A bfloat16 student: generate's head computes in float32 as TokenScores' does (its logits
    are float32), so the recorded log-probs differ from the scoring forward's only by the bfloat16
    body's rounding between the cached decode and one forward: a median of at most 1e-6 where the
    CPU emulates bfloat16, about 3e-4 where it has bfloat16 dot products (AVX512-BF16). With
    generate's own bfloat16 head the median is about 1e-3 or more: at least 4 times larger."""
    import contextlib

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import opdx.policy

    path = asset_path("tiny/student")
    tokenizer = AutoTokenizer.from_pretrained(path)
    medians, head_dtypes = [], []
    for own_head in (False, True):
        if own_head:
            monkeypatch.setattr(opdx.policy, "float32_head", lambda lm_head: contextlib.nullcontext())
        sampler = HFModel(AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16), tokenizer)
        head_dtypes.append(set())
        hook = sampler.model.get_output_embeddings().register_forward_hook(
            lambda module, args, output: head_dtypes[-1].add(output.dtype)
        )
        torch.manual_seed(0)
        rollout = sampler.sample(PROMPTS * 4, 4, 16)
        hook.remove()
        mask = rollout.response_mask_B_T
        medians.append((sampler.logprobs(rollout) - rollout.logp_sampling_B_T)[mask].abs().median().item())
    float32_head, bfloat16_head = medians
    assert float32_head <= 1e-3 < bfloat16_head and 4 * float32_head < bfloat16_head, medians
    assert head_dtypes == [{torch.float32}, {torch.bfloat16}]
    assert sampler.model.get_output_embeddings().forward.__self__ is sampler.model.get_output_embeddings()


def test_greedy_samples_of_a_shared_prompt_equal_those_of_it_alone(student):
    model, tokenizer = student
    grouped = HFModel(model, tokenizer).sample(PROMPTS, 3, 10, greedy=True)
    single = HFModel(model, tokenizer).sample(PROMPTS, 1, 10, greedy=True)
    assert torch.equal(grouped.response_tokens_B_T[::3], single.response_tokens_B_T)
    torch.testing.assert_close(grouped.logp_sampling_B_T[::3], single.logp_sampling_B_T, atol=1e-5, rtol=0)


def test_a_static_cache_samples_as_the_dynamic_one(student):
    model, tokenizer = student
    dynamic, static = HFModel(model, tokenizer), HFModel(model, tokenizer, cache="static")
    assert torch.equal(
        static.sample(PROMPTS, 1, 10, greedy=True).response_tokens_B_T,
        dynamic.sample(PROMPTS, 1, 10, greedy=True).response_tokens_B_T,
    )
    torch.manual_seed(5)
    rollout = static.sample(PROMPTS, 2, 10, SamplingParams(temperature=0.7))
    mask = rollout.response_mask_B_T
    recomputed = TokenScores(model)(rollout, SamplingParams(temperature=0.7))
    torch.testing.assert_close(recomputed[mask], rollout.logp_sampling_B_T[mask], atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="rollout.cache='paged' is invalid; valid: dynamic, static"):
        HFModel(model, tokenizer, cache="paged")


def test_greedy_is_deterministic_and_decodes_text(student):
    model, tokenizer = student
    first = decode_responses(tokenizer, HFModel(model, tokenizer).sample(PROMPTS, 1, 12, greedy=True))
    second = decode_responses(tokenizer, HFModel(model, tokenizer).sample(PROMPTS, 1, 12, greedy=True))
    assert first == second
    assert all(set(text) <= set("0123456789+-*/()=;# ") for text in first)


def test_on_step_counts_decoding_steps_and_changes_nothing(student):
    model, tokenizer = student
    steps = []
    torch.manual_seed(3)
    counted = HFModel(model, tokenizer).sample(
        PROMPTS, 2, 12, SamplingParams(temperature=0.8), on_step=lambda: steps.append(1)
    )
    torch.manual_seed(3)
    plain = HFModel(model, tokenizer).sample(PROMPTS, 2, 12, SamplingParams(temperature=0.8))
    assert len(steps) == counted.response_tokens_B_T.shape[1] > 1
    assert torch.equal(counted.response_tokens_B_T, plain.response_tokens_B_T)
    assert torch.equal(counted.logp_sampling_B_T, plain.logp_sampling_B_T)


def test_every_stop_id_ends_a_sample_and_its_mask(student):
    """The token greedy decoding emits first becomes a stop id: every response is that one token."""
    model, tokenizer = student
    free = HFModel(model, tokenizer).sample(PROMPTS, 1, 6, greedy=True)
    first = free.response_tokens_B_T[0, 0].item()
    stopped = HFModel(model, tokenizer, stop_ids=[tokenizer.eos_token_id, first]).sample(PROMPTS[:1], 1, 6, greedy=True)
    assert stopped.response_mask_B_T.sum().item() == 1 and stopped.finished_B.tolist() == [True]


def test_a_model_with_non_finite_scores_is_named_not_a_traceback(student):
    from transformers import AutoModelForCausalLM

    from opdx.compat import PairError

    model, tokenizer = student
    broken = AutoModelForCausalLM.from_pretrained(asset_path("tiny/student"))
    with torch.no_grad():
        broken.get_output_embeddings().weight[3] = float("nan")
    with pytest.raises(PairError, match="gives non-finite next-token scores"):
        HFModel(broken, tokenizer).sample(PROMPTS, 2, 4)


def self_teacher_setup(**options):
    """The tiny student, a self-teacher on arith with ``options``, and a rollout of the student's."""
    from transformers import AutoTokenizer

    from opdx.backends.hf import load_self_teacher
    from opdx.benchmarks import get_benchmark
    from opdx.config import ModelConfig

    path = asset_path("tiny/student")
    student, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    if options.pop("lora", False):
        from opdx.config import LoraConfig
        from opdx.lora import add_adapters

        add_adapters(student, LoraConfig(r=4, alpha=8))
        torch.manual_seed(1)
        for name, parameter in student.named_parameters():
            if "lora_B" in name:
                parameter.data.normal_(0, 0.2)
    arith = get_benchmark("arith", train_size=50, eval_size=20)
    pair = ModelConfig(name="tiny", teacher=asset_path("tiny/teacher"), student=path)
    teacher = load_self_teacher(pair, tokenizer, torch.device("cpu"), student, arith, **options)
    torch.manual_seed(0)
    rollout = HFModel(student, tokenizer).sample(arith.eval[:3], 2, 8)
    return student, tokenizer, arith, teacher, rollout


def with_prompts(rollout, tokenizer, prompts):
    """``rollout`` with its prompts replaced by ``prompts`` (text), left-padded."""
    prompts_B_L, mask_B_L = pad(encode_prompts(tokenizer, prompts), tokenizer.pad_token_id, True)
    return replace(rollout, prompt_tokens_B_L=prompts_B_L, prompt_mask_B_L=mask_B_L)


def test_a_self_teacher_scores_with_the_students_own_module_on_the_privileged_prompt():
    student, tokenizer, arith, teacher, rollout = self_teacher_setup(weights="current", context="worked")
    assert teacher.model is student  # no copy
    shown = [privileged(arith, problem, "worked").prompt for problem in rollout.problems]
    assert all(prompt.endswith(";" + problem.prompt) for prompt, problem in zip(shown, rollout.problems, strict=True))
    scored = teacher.logprobs(rollout)
    assert torch.equal(scored, TokenScores(student)(with_prompts(rollout, tokenizer, shown)).detach())
    assert not torch.equal(scored, TokenScores(student)(rollout).detach())  # the context changes the scores
    with torch.no_grad():
        student.model.norm.weight.mul_(1.5)  # the current weights teach: a change shows at once
    assert not torch.equal(teacher.logprobs(rollout), scored)


def test_with_lora_the_initial_weights_teacher_is_the_frozen_base_and_the_adapters_come_back_on():
    student, tokenizer, arith, teacher, rollout = self_teacher_setup(weights="initial", context="reference", lora=True)
    assert teacher.model is student  # the base inside the LoRA student, no copy
    shown = with_prompts(rollout, tokenizer, [privileged(arith, p, "reference").prompt for p in rollout.problems])
    base = AutoModelForCausalLM.from_pretrained(asset_path("tiny/student"))
    torch.testing.assert_close(teacher.logprobs(rollout), TokenScores(base)(shown).detach())
    adapted = TokenScores(student)(shown).detach()
    assert (adapted - TokenScores(base)(shown).detach()).abs().max() > 1e-3  # the adapters are on again


def test_the_self_teacher_is_held_constant_in_the_students_gradient():
    """Its scores come without grad: the student's gradient is that of a frozen copy as teacher."""
    from opdx.backends import teacher_scores

    student, tokenizer, arith, teacher, rollout = self_teacher_setup(weights="current", context="reference")
    frozen = self_teacher_setup(weights="current", context="reference")[3]
    frozen.model.load_state_dict(student.state_dict())
    policy = TokenScores(student)
    gradients = []
    for scorer in (teacher, frozen):
        student.zero_grad()
        log_u = teacher_scores(scorer, rollout, "sampled", 0) - policy(rollout)
        (-(log_u * rollout.response_mask_B_T).sum()).backward()
        gradients.append([parameter.grad.clone() for parameter in student.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*gradients, strict=True))
    assert not student.model.norm.weight.grad.eq(0).all()


def test_bad_self_teacher_settings_are_refused_by_name():
    from opdx.config import ConfigError

    with pytest.raises(ConfigError, match="teacher.weights='best' is invalid; valid: current, initial"):
        self_teacher_setup(weights="best")
    with pytest.raises(ConfigError, match="teacher.context='hint' is invalid"):
        self_teacher_setup(context="hint")
