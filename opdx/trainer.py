"""The on-policy distillation loop.

    opdx train                                   # CPU default: tiny teacher -> student, arith
    opdx train divergence=forward_kl estimator=stopgrad trainer.steps=600

Each step: draw P prompts, sample G responses each from the student, score the sampled tokens
with the teacher (one no-grad forward), recompute the student's log-probs with grad, take the
OPD / OPD+ loss (or the analytic one), clip the gradient norm, AdamW step, LR schedule. Every
``eval_every`` steps evaluate on the held-out split; every ``checkpoint_every`` steps write an
atomic checkpoint that ``trainer.resume=<run dir>`` continues from.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import PreTrainedModel

from opdx.benchmarks import Benchmark, get_benchmark
from opdx.checkpoint import load_checkpoint, restore_rng_states, save_checkpoint
from opdx.config import RunConfig, TrainerConfig
from opdx.divergences import Divergence, get_divergence
from opdx.evaluation import evaluate_model
from opdx.logging import LOGGERS, read_metrics, timed
from opdx.models import load_pair, resolve_device
from opdx.objective import LossOptions, analytic_loss, sampled_loss, token_advantages
from opdx.rollout import Rollout, SamplingParams, gather_logprobs, sample, sequence_logits, sequence_logprobs

SUMMARY_FILE = "summary.json"


def lr_lambda(trainer: TrainerConfig):
    """Linear warmup, then constant, or cosine / linear decay towards 0 at ``steps``."""

    def factor(step: int) -> float:
        if step < trainer.warmup_steps:
            return (step + 1) / trainer.warmup_steps
        progress = (step - trainer.warmup_steps) / max(1, trainer.steps - trainer.warmup_steps)
        return {"constant": 1.0, "cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress}[
            trainer.schedule
        ]

    return factor


def prompts_for_step(benchmark: Benchmark, seed: int, step: int, count: int) -> list:
    """The step's prompts, a function of (seed, step) alone so a resumed run draws the same."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return [benchmark.train[i] for i in torch.randint(len(benchmark.train), (count,), generator=generator).tolist()]


def rollout_metrics(rollout: Rollout, log_u_B_T: torch.Tensor, advantages_B_T: torch.Tensor, div: Divergence) -> dict:
    """Reward, advantage and sampled divergence statistics over the response tokens."""
    mask_B_T = rollout.response_mask_B_T
    log_u = log_u_B_T[mask_B_T]
    advantages = advantages_B_T[mask_B_T]
    f_u = div.f(log_u)
    return {
        "reward/token_mean": -f_u.mean().item(),
        "reward/sequence_mean": -(div.f(log_u_B_T) * mask_B_T).sum(-1).mean().item(),
        "adv/mean": advantages.mean().item(),
        "adv/std": advantages.std().item() if advantages.numel() > 1 else 0.0,
        "adv/min": advantages.min().item(),
        "adv/max": advantages.max().item(),
        "div/f_mean": f_u.mean().item(),
        "div/reverse_kl": (-log_u).mean().item(),
        "div/forward_kl": (log_u.exp() * log_u).mean().item(),
        "div/log_u_mean": log_u.mean().item(),
        "rollout/len_mean": rollout.lengths_B.float().mean().item(),
        "rollout/eos_rate": rollout.finished_B.float().mean().item(),
    }


def score_with_teacher(teacher: PreTrainedModel, rollout: Rollout, estimator: str, chunk: int) -> torch.Tensor:
    """Teacher log q of the sampled tokens [B, T], or its full logits [B, T, V] for "analytic".

    The teacher is always scored at temperature 1 with no truncation: q is the teacher itself,
    whatever warp the student sampled with."""
    if estimator == "analytic":
        return sequence_logits(teacher, rollout)
    return sequence_logprobs(teacher, rollout, chunk_size=chunk)


def distillation_loss(
    student: PreTrainedModel,
    rollout: Rollout,
    teacher_scores: torch.Tensor,
    div: Divergence,
    cfg: RunConfig,
    params: SamplingParams,
    options: LossOptions,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss (with grad) and, for metrics, log p_B_T, log u_B_T and the advantages A_B_T."""
    est, mask_B_T = cfg.estimator, rollout.response_mask_B_T
    if est.name == "analytic":
        logits_student_B_T_V = sequence_logits(student, rollout, params)
        device = logits_student_B_T_V.device
        tokens_B_T, mask_on_device_B_T = rollout.response_tokens_B_T.to(device), mask_B_T.to(device)
        logp_student_B_T = gather_logprobs(logits_student_B_T_V, tokens_B_T)
        logp_teacher_B_T = gather_logprobs(teacher_scores, tokens_B_T)
        advantages_B_T, log_u_B_T = token_advantages(logp_student_B_T, logp_teacher_B_T, mask_on_device_B_T, div)
        loss = analytic_loss(logits_student_B_T_V, teacher_scores, mask_on_device_B_T, div, est.token_mean)
        return loss, logp_student_B_T.cpu(), log_u_B_T.cpu(), advantages_B_T.cpu()
    logp_student_B_T = sequence_logprobs(student, rollout, params, cfg.trainer.logprob_chunk)
    loss, advantages_B_T, log_u_B_T = sampled_loss(
        logp_student_B_T, teacher_scores, mask_B_T, div, est.name, est.gamma, options
    )
    return loss, logp_student_B_T, log_u_B_T, advantages_B_T


def train(cfg: RunConfig, run_dir: Path) -> dict[str, Any]:
    """Run (or resume) one distillation run into ``run_dir``; returns the summary."""
    t = cfg.trainer
    run_dir.mkdir(parents=True, exist_ok=True)
    if t.threads:
        torch.set_num_threads(t.threads)
    device = resolve_device(t.device)
    torch.manual_seed(cfg.seed)
    benchmark_kwargs = {k: v for k, v in cfg.benchmark.items() if k != "name"}
    benchmark = get_benchmark(cfg.benchmark["name"], **benchmark_kwargs)
    bench = cfg.benchmark["name"]
    div = get_divergence(
        cfg.divergence.name, **({} if cfg.divergence.alpha is None else {"alpha": cfg.divergence.alpha})
    )
    est = cfg.estimator
    options = LossOptions(est.log_ratio_clip, est.token_mean, est.batch_baseline, est.whiten)
    params = SamplingParams(t.temperature, t.top_k, t.top_p)
    if not params.is_plain:
        print(f"sampling with {params}: u = q/p uses the log-probs of that warped distribution, not the raw student")

    print(f"{bench}: {len(benchmark.train)} train prompts, {len(benchmark.eval)} eval problems")  # data before models
    student, teacher, tokenizer = load_pair(cfg.model, device)
    if t.gradient_checkpointing:
        student.activation_checkpointing_enable({"use_reentrant": False})
    optimizer = torch.optim.AdamW(student.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t))

    def run_eval(model) -> dict[str, float]:
        return evaluate_model(model, tokenizer, benchmark, cfg, teacher if model is student else None, progress=True)

    checkpoint = load_checkpoint(run_dir) if t.resume else None
    if checkpoint:
        student.load_state_dict(checkpoint["student"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        restore_rng_states(checkpoint["rng"])
        start_step, state = checkpoint["step"], checkpoint["state"]
        print(f"resuming {run_dir} from step {start_step}")
    else:
        start_step, state = 0, {"elapsed": 0.0}
    logger = LOGGERS[cfg.logger.name](
        run_dir,
        cfg_dict(cfg),
        resume_from_step=start_step if checkpoint else None,
        project=cfg.logger.project,
        group=cfg.logger.group,
        tags=[*cfg.logger.tags, cfg.divergence.name, cfg.estimator.name, cfg.model.name, bench],
        name=run_dir.name,
    )
    if not checkpoint:
        state["teacher_eval"] = run_eval(teacher)
        state["initial_eval"] = state["best_eval"] = {**run_eval(student), "step": 0}
        initial = {f"eval/{bench}/{k}": v for k, v in state["initial_eval"].items() if k != "step"}
        logger.log({**initial, **{f"eval/{bench}/teacher/{k}": v for k, v in state["teacher_eval"].items()}}, step=0)

    started = time.perf_counter() - state["elapsed"]
    progress = tqdm(range(start_step, t.steps), initial=start_step, total=t.steps, desc="opdx train", mininterval=1)
    for step in progress:
        metrics: dict[str, float] = {}
        problems = prompts_for_step(benchmark, cfg.seed, step, t.prompts_per_step)
        student.train()
        with timed(metrics, "rollout"):
            rollout = sample(student, tokenizer, problems, t.samples_per_prompt, t.max_new_tokens, params)
        mask_B_T = rollout.response_mask_B_T
        with timed(metrics, "teacher"), torch.no_grad():
            teacher_scores = score_with_teacher(teacher, rollout, est.name, t.logprob_chunk)
        with timed(metrics, "update"):
            loss, logp_student_B_T, log_u_B_T, advantages_B_T = distillation_loss(
                student, rollout, teacher_scores, div, cfg, params, options
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), t.grad_clip)
            optimizer.step()
            lr_used = scheduler.get_last_lr()[0]
            scheduler.step()
        metrics.update(rollout_metrics(rollout, log_u_B_T, advantages_B_T, div))
        mismatch_B_T = (rollout.logp_sampling_B_T - logp_student_B_T.detach()).abs()
        metrics["rollout/logprob_mismatch"] = mismatch_B_T[mask_B_T].max().item()
        metrics["train/loss"] = loss.item()
        metrics["train/grad_norm"] = grad_norm.item()
        metrics["train/lr"] = lr_used
        step_time = metrics["time/rollout"] + metrics["time/teacher"] + metrics["time/update"]
        metrics["perf/tokens_per_s"] = mask_B_T.sum().item() / step_time
        done = step + 1
        if done % t.eval_every == 0 or done == t.steps:
            with timed(metrics, "eval"):
                result = run_eval(student)
            metrics.update({f"eval/{bench}/{k}": v for k, v in result.items()})
            if result["greedy_acc"] >= state["best_eval"]["greedy_acc"]:
                state["best_eval"] = {**result, "step": done}
            state["final_eval"] = {**result, "step": done}
            progress.set_postfix(
                loss=f"{loss.item():.3f}", rkl=f"{metrics['div/reverse_kl']:.2f}", acc=f"{result['greedy_acc']:.3f}"
            )
        else:
            progress.set_postfix(loss=f"{loss.item():.3f}", rkl=f"{metrics['div/reverse_kl']:.2f}", refresh=False)
        logger.log(metrics, step=done)
        state["elapsed"] = time.perf_counter() - started
        if done % t.checkpoint_every == 0 or done == t.steps:
            save_checkpoint(
                run_dir,
                {
                    "step": done,
                    "student": student.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "state": state,
                },
            )
    progress.close()
    if "final_eval" not in state:  # resumed at or past trainer.steps: nothing ran, evaluate once
        state["final_eval"] = {**run_eval(student), "step": start_step}

    student.save_pretrained(run_dir / "student")
    tokenizer.save_pretrained(run_dir / "student")
    summary = make_summary(cfg, state, run_dir)
    (run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    logger.summary(summary)
    logger.finish()
    print_summary(summary)
    return summary


def cfg_dict(cfg: RunConfig) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def make_summary(cfg: RunConfig, state: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Initial / final / best eval beside the teacher's, key choices, wall time, step-time split."""
    records = [r for r in read_metrics(run_dir) if "time/update" in r]
    mean = {k: sum(r[k] for r in records) / len(records) for k in ("time/rollout", "time/teacher", "time/update")}
    return {
        "model": cfg.model.name,
        "divergence": cfg.divergence.name,
        "alpha": cfg.divergence.alpha,
        "estimator": cfg.estimator.name,
        "gamma": cfg.estimator.gamma,
        "benchmark": cfg.benchmark["name"],
        "seed": cfg.seed,
        "steps": cfg.trainer.steps,
        "group": cfg.logger.group,
        "teacher_eval": state["teacher_eval"],
        "initial_eval": state["initial_eval"],
        "final_eval": state["final_eval"],
        "best_eval": state["best_eval"],
        "wall_time_s": round(state["elapsed"], 1),
        "mean_step_time_s": {k.removeprefix("time/"): round(v, 4) for k, v in mean.items()},
    }


def print_summary(summary: dict[str, Any]) -> None:
    rows = [("teacher", summary["teacher_eval"]), ("student before", summary["initial_eval"])]
    rows += [("student after", summary["final_eval"]), ("student best", summary["best_eval"])]
    keys = [k for k in summary["final_eval"] if k != "step"]
    print(f"\n{summary['divergence']} / {summary['estimator']} on {summary['benchmark']}, {summary['steps']} steps:")
    print(f"  {'':<15}" + "".join(f"{k:>22}" for k in keys))
    for label, values in rows:
        print(f"  {label:<15}" + "".join(f"{values[k]:>22.4f}" if k in values else f"{'-':>22}" for k in keys))
    split = ", ".join(f"{k} {v:.3f}s" for k, v in summary["mean_step_time_s"].items())
    print(f"  wall time {summary['wall_time_s']:.0f}s; mean step: {split}")
