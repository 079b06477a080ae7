"""Held-out evaluation with the benchmark's verifier, shared by `opdx eval` and the trainer:
greedy accuracy, avg@n, pass@k, and the student's per-token reverse KL to the teacher on its
own samples.

    opdx eval model=smollm2_135m benchmark=bfcl eval.problems=50 eval.n=8
    opdx eval eval.run=outputs/2026-11-26/10-00-00      # a trained run's student
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from opdx.benchmarks import Benchmark, Problem
from opdx.config import RunConfig
from opdx.rollout import PLAIN_SAMPLING, Rollout, SamplingParams, decode_responses, sample, sequence_logprobs

EVAL_FILE = "eval.json"


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
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    benchmark: Benchmark,
    problems: Sequence[Problem],
    n_samples: int = 0,
    max_new_tokens: int = 32,
    params: SamplingParams = PLAIN_SAMPLING,
    teacher: PreTrainedModel | None = None,
    batch_size: int = 2000,
    progress: bool = False,
) -> dict[str, float]:
    """``greedy_acc``; with ``n_samples`` > 0 also ``avg@n`` (mean score over n samples per
    problem), ``pass@k`` for k in ``pass_at_k_values(n)`` (a score of 1 counts as correct) and,
    given the teacher, ``reverse_kl_per_token`` = mean over sampled tokens of log p(y) - log q(y),
    an estimate of KL(p || q) per token (p = the sampling distribution, warped when ``params``
    change temperature / top-k / top-p). ``batch_size`` bounds the sequences per generate call;
    ``progress`` shows a bar of decoding steps (up to ``max_new_tokens`` per generate call)."""
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
        rollout = sample(model, tokenizer, batch, samples, max_new_tokens, params, greedy, on_step=bar.update)
        bar.update(-bar.n % max_new_tokens)  # a call that stopped early (every sequence ended) counts in full
        return rollout

    for start in starts:
        batch = problems[start : start + prompts_per_batch]
        greedy = generate(batch, 1, greedy=True)
        responses = decode_responses(tokenizer, greedy)
        greedy_scores += [benchmark.score(p, r) for p, r in zip(batch, responses, strict=True)]
        if n_samples:
            rollout = generate(batch, n_samples, greedy=False)
            responses = decode_responses(tokenizer, rollout)
            for i, problem in enumerate(batch):
                group = responses[i * n_samples : (i + 1) * n_samples]
                sampled_scores_P_G.append([benchmark.score(problem, r) for r in group])
            if teacher is not None:
                logp_teacher_B_T = sequence_logprobs(teacher, rollout)
                log_u_B_T = logp_teacher_B_T - rollout.logp_sampling_B_T
                neg_log_u_sum -= log_u_B_T[rollout.response_mask_B_T].sum().item()
                token_count += int(rollout.response_mask_B_T.sum())
    bar.close()
    metrics = {"greedy_acc": sum(greedy_scores) / len(greedy_scores)}
    if n_samples:
        metrics[f"avg@{n_samples}"] = sum(map(sum, sampled_scores_P_G)) / (len(sampled_scores_P_G) * n_samples)
        for k in pass_at_k_values(n_samples):
            passes = [pass_at_k(n_samples, sum(s == 1.0 for s in scores), k) for scores in sampled_scores_P_G]
            metrics[f"pass@{k}"] = sum(passes) / len(passes)
    if token_count:
        metrics["reverse_kl_per_token"] = neg_log_u_sum / token_count
    return metrics


def format_side_by_side(results: dict[str, dict[str, float]]) -> str:
    """A markdown table: one row per metric, one column per model (teacher, student, ...)."""
    columns = list(results)
    metrics = list(dict.fromkeys(k for values in results.values() for k in values))
    lines = ["| metric | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for metric in metrics:
        cells = [f"{results[c][metric]:.4f}" if metric in results[c] else "-" for c in columns]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_eval(out_dir: Path, record: dict[str, Any]) -> Path:
    path = out_dir / EVAL_FILE
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def evaluate_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    benchmark: Benchmark,
    cfg: RunConfig,
    teacher: PreTrainedModel | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """``evaluate`` with the run's ``eval`` settings on the first ``eval.problems`` eval problems,
    sampling with the run's temperature / top-k / top-p."""
    t = cfg.trainer
    return evaluate(
        model,
        tokenizer,
        benchmark,
        benchmark.eval[: cfg.eval.problems],
        cfg.eval.n,
        cfg.eval.max_new_tokens or t.max_new_tokens,
        SamplingParams(t.temperature, t.top_k, t.top_p),
        teacher,
        cfg.eval.batch_size,
        progress,
    )


def student_of_run(run_dir: Path) -> tuple[Path | None, dict[str, torch.Tensor] | None]:
    """A run's trained student: its saved ``student/`` directory, else the last checkpoint's weights."""
    if (run_dir / "student" / "config.json").exists():
        return run_dir / "student", None
    from opdx.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(run_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"eval.run={run_dir} has neither student/ nor checkpoint.pt")
    return None, checkpoint["student"]


def run_eval(cfg: RunConfig, out_dir: Path) -> dict[str, Any]:
    """`opdx eval`: teacher and student side by side on the benchmark; writes eval.json."""
    from opdx.benchmarks import get_benchmark
    from opdx.models import load_pair, resolve_device

    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.trainer.device)
    state_dict = None
    if cfg.eval.run:
        student_dir, state_dict = student_of_run(Path(cfg.eval.run))
        if student_dir is not None:
            cfg.model.student = str(student_dir)
    benchmark = get_benchmark(cfg.benchmark["name"], **{k: v for k, v in cfg.benchmark.items() if k != "name"})
    print(f"{benchmark.name}: {len(benchmark.eval)} eval problems")  # the data before the models: fail fast
    start = time.perf_counter()
    student, teacher, tokenizer = load_pair(cfg.model, device)
    if state_dict is not None:
        student.load_state_dict(state_dict)
    load_seconds = time.perf_counter() - start
    results, seconds = {}, {}
    for role, model in (("teacher", teacher), ("student", student)):
        start = time.perf_counter()
        results[role] = evaluate_model(
            model, tokenizer, benchmark, cfg, teacher=teacher if role == "student" else None, progress=True
        )
        seconds[role] = round(time.perf_counter() - start, 1)
    record = {
        "model": cfg.model.name,
        "teacher": cfg.model.teacher,
        "student": cfg.model.student,
        "run": cfg.eval.run,
        "benchmark": cfg.benchmark["name"],
        "problems": min(cfg.eval.problems, len(benchmark.eval)),
        "n": cfg.eval.n,
        "max_new_tokens": cfg.eval.max_new_tokens or cfg.trainer.max_new_tokens,
        "results": results,
        "seconds": {"load": round(load_seconds, 1), **seconds},
    }
    path = write_eval(out_dir, record)
    print(f"\n{record['benchmark']}: {record['problems']} problems, n={record['n']} ({cfg.model.name})")
    print(format_side_by_side(results))
    print(f"written to {path}")
    return record
