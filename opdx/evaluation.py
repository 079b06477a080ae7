"""Held-out evaluation with the benchmark's verifier, shared by `opdx eval` and the trainer:
greedy accuracy, avg@n, pass@k, and the student's per-token reverse KL to the teacher on its
own samples. Models are used through their backends (``opdx.backends``): a sampler for the
answers and, for the KL, the teacher's scorer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd
import torch
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from opdx.backends import Sampler, Scorer
from opdx.benchmarks import Benchmark, Problem
from opdx.config import EvalConfig
from opdx.dist import ONE_RANK, Ranks, global_sum
from opdx.rollout import PLAIN_SAMPLING, Rollout, SamplingParams, decode_responses
from opdx.samples import SampleLog
from opdx.summary import markdown_table


def pass_at_k(n: int, correct: int, k: int) -> float:
    """Unbiased pass@k from n samples of which ``correct`` are right (Chen et al. 2021):
    1 - C(n - c, k) / C(n, k), the chance that k of the n samples, drawn without replacement,
    contain a right one."""
    if not 0 < k <= n or not 0 <= correct <= n:
        raise ValueError(f"pass@k needs 0 < k <= n and 0 <= correct <= n, got n={n}, correct={correct}, k={k}")
    if n - correct < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - correct + 1, n + 1))


def pass_at_k_values(n: int) -> list[int]:
    """The k reported for n samples: powers of two up to n, and n (k = 1 is avg@n)."""
    return sorted({2**i for i in range(1, n.bit_length()) if 2**i <= n} | ({n} if n > 1 else set()))


@torch.no_grad()
def evaluate(
    sampler: Sampler,
    tokenizer: PreTrainedTokenizerBase,
    benchmark: Benchmark,
    problems: Sequence[Problem],
    n_samples: int = 0,
    max_new_tokens: int = 32,
    params: SamplingParams = PLAIN_SAMPLING,
    teacher: Scorer | None = None,
    batch_size: int = 2000,
    progress: bool = False,
    ranks: Ranks = ONE_RANK,
    samples: SampleLog | None = None,
) -> dict[str, float]:
    """``greedy_acc``; with ``n_samples`` > 0 also ``avg@n`` (mean score over n samples per
    problem), ``pass@k`` for k in ``pass_at_k_values(n)`` (a score of 1 counts as correct) and,
    given the teacher, ``reverse_kl_per_token`` = mean over sampled tokens of log p(y) - log q(y),
    an estimate of KL(p || q) per token (p = the sampling distribution, warped when ``params``
    change temperature / top-k / top-p). ``batch_size`` bounds the sequences per generate call;
    ``progress`` shows a bar of decoding steps (up to ``max_new_tokens`` per generate call).

    Over several ranks each evaluates its share of ``problems`` (padded to the same number of
    generate calls, which a sharded student needs; the padding is not counted) and the sums and
    counts behind every metric are added over the ranks. ``samples`` keeps a few of the greedy
    and the sampled rollouts as text, with their log u where the teacher scored them."""
    counted = len(ranks.share(problems))
    problems = ranks.share(problems) + problems[:1] * (-(-len(problems) // ranks.world) - counted)
    greedy_scores: list[float] = []
    sampled_scores_P_G: list[list[float]] = []
    neg_log_u_sum, token_count = 0.0, 0
    prompts_per_batch = max(1, batch_size // max(1, n_samples))
    starts = range(0, len(problems), prompts_per_batch)
    generate_calls = len(starts) * (2 if n_samples else 1)
    bar = tqdm(
        total=generate_calls * max_new_tokens, desc=f"eval {benchmark.name}", unit="step", disable=not progress,
        leave=False, mininterval=1,
    )  # fmt: skip

    def generate(batch: Sequence[Problem], samples: int, greedy: bool) -> Rollout:
        rollout = sampler.sample(batch, samples, max_new_tokens, params, greedy, on_step=bar.update)
        bar.update(-bar.n % max_new_tokens)  # a call that stopped early (every sequence ended) counts in full
        return rollout

    for start in starts:
        batch = problems[start : start + prompts_per_batch]
        greedy = generate(batch, 1, greedy=True)
        responses = decode_responses(tokenizer, greedy)
        greedy_scores += [benchmark.score(p, r) for p, r in zip(batch, responses, strict=True)]
        if samples is not None:
            samples.add(benchmark, greedy, "eval", "greedy")
        if n_samples:
            rollout = generate(batch, n_samples, greedy=False)
            responses = decode_responses(tokenizer, rollout)
            for i, problem in enumerate(batch):
                group = responses[i * n_samples : (i + 1) * n_samples]
                sampled_scores_P_G.append([benchmark.score(problem, r) for r in group])
            log_u_B_T = None
            if teacher is not None:
                logp_teacher_B_T = teacher.logprobs(rollout)
                log_u_B_T = logp_teacher_B_T - rollout.logp_sampling_B_T
                neg_log_u_sum -= log_u_B_T[rollout.response_mask_B_T].sum().item()
                token_count += int(rollout.response_mask_B_T.sum())
            if samples is not None:
                samples.add(benchmark, rollout, "eval", "sampled", log_u_B_T)
    bar.close()
    sampled_scores_P_G = sampled_scores_P_G[:counted]
    ks = pass_at_k_values(n_samples) if n_samples else []
    sums = [sum(greedy_scores[:counted]), counted, sum(map(sum, sampled_scores_P_G)), neg_log_u_sum, token_count]
    sums += [sum(pass_at_k(n_samples, sum(s == 1.0 for s in scores), k) for scores in sampled_scores_P_G) for k in ks]
    if ranks.world > 1:
        sums = global_sum(torch.tensor(sums, dtype=torch.float64)).tolist()
    greedy_sum, problem_count, sampled_sum, neg_log_u_sum, token_count, *pass_sums = sums
    metrics = {"greedy_acc": greedy_sum / problem_count}
    if n_samples:
        metrics[f"avg@{n_samples}"] = sampled_sum / (problem_count * n_samples)
        for k, passes in zip(ks, pass_sums, strict=True):
            metrics[f"pass@{k}"] = passes / problem_count
    if token_count:
        metrics["reverse_kl_per_token"] = neg_log_u_sum / token_count
    return metrics


def format_side_by_side(results: dict[str, dict[str, float]]) -> str:
    """A markdown table: one row per metric, one column per model (teacher, student, ...)."""
    table = pd.DataFrame(results)
    table.index.name = "metric"
    return markdown_table(table)


def evaluate_split(
    sampler: Sampler,
    tokenizer: PreTrainedTokenizerBase,
    benchmark: Benchmark,
    config: EvalConfig,
    params: SamplingParams,
    max_new_tokens: int,
    teacher: Scorer | None = None,
    progress: bool = False,
    ranks: Ranks = ONE_RANK,
    samples: SampleLog | None = None,
) -> dict[str, float]:
    """``evaluate`` with the ``eval`` settings on the first ``config.problems`` eval problems,
    sampling with ``params`` (the run's temperature / top-k / top-p) and ``config.max_new_tokens``
    tokens, else ``max_new_tokens`` (``sampling.max_new_tokens``); shared over ``ranks``.

    A benchmark of several components (``benchmark=mixture``) is evaluated one component at a time
    (its first ``config.problems`` problems, with its teacher where the sampler or scorer routes by
    component): each metric of component c as ``c/<metric>``, and unprefixed the mean of the
    components weighted by their sampling weights."""
    components = benchmark.components
    if len(components) > 1:
        results = {
            c.name: evaluate_split(
                sampler, tokenizer, c.benchmark, config, params, max_new_tokens, teacher, progress, ranks, samples
            )
            for c in components
        }
        return weighted_means(results, {c.name: c.weight for c in components}) | {
            f"{name}/{key}": value for name, one in results.items() for key, value in one.items()
        }
    return evaluate(
        sampler,
        tokenizer,
        benchmark,
        benchmark.eval[: config.problems],
        config.n,
        config.max_new_tokens or max_new_tokens,
        params,
        teacher,
        config.batch_size,
        progress,
        ranks,
        samples,
    )


def eval_problem_count(benchmark: Benchmark, config: EvalConfig) -> int:
    """How many problems ``evaluate_split`` grades: the first ``config.problems`` of each
    component's eval split."""
    return sum(min(config.problems, len(component.eval)) for component in benchmark.components)


def weighted_means(results: dict[str, dict[str, float]], weights: dict[str, float]) -> dict[str, float]:
    """Each metric that every result has, averaged over the results with ``weights`` (summing to 1)."""
    shared = [key for key in next(iter(results.values())) if all(key in one for one in results.values())]
    return {key: sum(weights[name] * one[key] for name, one in results.items()) for key in shared}
