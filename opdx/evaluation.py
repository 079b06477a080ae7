"""Held-out evaluation with the benchmark's verifier: greedy accuracy, avg@n, and the student's
per-token reverse KL to the teacher on its own samples."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from opdx.benchmarks import Benchmark, Problem
from opdx.rollout import PLAIN_SAMPLING, SamplingParams, decode_responses, sample, sequence_logprobs


@torch.no_grad()
def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    benchmark: Benchmark,
    problems: Sequence[Problem],
    n_samples: int = 0,
    max_new_tokens: int = 32,
    params: SamplingParams = PLAIN_SAMPLING,
    teacher: PreTrainedModel | None = None,
    batch_size: int = 500,
) -> dict[str, float]:
    """``greedy_acc``; with ``n_samples`` > 0 ``avg@n`` (mean score over n samples per problem)
    and, given the teacher, ``reverse_kl_per_token`` = mean over sampled tokens of
    log p(y) - log q(y), an estimate of KL(p || q) per token (p = the sampling distribution,
    warped when ``params`` change temperature / top-k / top-p)."""
    greedy_scores: list[float] = []
    sampled_scores: list[float] = []
    log_ratio_sum, token_count = 0.0, 0
    for start in range(0, len(problems), batch_size):
        batch = problems[start : start + batch_size]
        prompts = [p.prompt for p in batch]
        greedy = sample(model, tokenizer, prompts, 1, max_new_tokens, greedy=True)
        responses = decode_responses(tokenizer, greedy)
        greedy_scores += [benchmark.score(p, r) for p, r in zip(batch, responses, strict=True)]
        if n_samples:
            rollout = sample(model, tokenizer, prompts, n_samples, max_new_tokens, params)
            responses = decode_responses(tokenizer, rollout)
            sampled_scores += [benchmark.score(batch[i // n_samples], r) for i, r in enumerate(responses)]
            if teacher is not None:
                logp_teacher_B_T = sequence_logprobs(teacher, rollout)
                log_ratio_B_T = rollout.logp_sampling_B_T - logp_teacher_B_T
                log_ratio_sum += log_ratio_B_T[rollout.response_mask_B_T].sum().item()
                token_count += int(rollout.response_mask_B_T.sum())
    metrics = {"greedy_acc": sum(greedy_scores) / len(greedy_scores)}
    if n_samples:
        metrics[f"avg@{n_samples}"] = sum(sampled_scores) / len(sampled_scores)
    if token_count:
        metrics["reverse_kl_per_token"] = log_ratio_sum / token_count
    return metrics
