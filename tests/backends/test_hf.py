"""opdx.backends.hf: sampling with generate and the log-probs it records."""

import pytest
import torch

from opdx.backends.hf import HFModel
from opdx.config import asset_path
from opdx.policy import TokenScores
from opdx.rollout import SamplingParams, decode_responses

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
    """A bfloat16 student: generate's head computes in float32 as TokenScores' does, so most
    recorded log-probs equal the scoring forward's exactly (the rest differ by the bfloat16 body's
    rounding between the cached decode and one forward); with generate's own bfloat16 head the
    median difference is about 1e-3."""
    import contextlib

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import opdx.policy

    path = asset_path("tiny/student")
    tokenizer = AutoTokenizer.from_pretrained(path)
    medians = []
    for own_head in (False, True):
        if own_head:
            monkeypatch.setattr(opdx.policy, "float32_head", lambda lm_head: contextlib.nullcontext())
        sampler = HFModel(AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16), tokenizer)
        torch.manual_seed(0)
        rollout = sampler.sample(PROMPTS * 4, 4, 16)
        mask = rollout.response_mask_B_T
        medians.append((sampler.logprobs(rollout) - rollout.logp_sampling_B_T)[mask].abs().median().item())
    float32_head, bfloat16_head = medians
    assert float32_head <= 1e-6 < 1e-4 < bfloat16_head, medians
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
