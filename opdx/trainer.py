"""The on-policy distillation loop.

    opdx train                                   # CPU default: tiny teacher -> student, arith
    opdx train divergence=forward_kl estimator=stopgrad trainer.steps=600

``train_step``: sample G responses to each of P prompts from the student (the ``rollout``
backend), score the sampled tokens with the teacher (their log-probs, or full logits for the
analytic estimator), recompute the student's log-probs with grad through ``Learner.policy`` (the
one module a data-parallel wrapper wraps), take the estimator's loss, backward, clip the gradient
norm, AdamW step, LR schedule, and hand the new weights to the sampler. ``train`` runs the steps,
evaluates every ``eval_every`` steps on the held-out split and writes an atomic checkpoint every
``checkpoint_every`` steps that ``trainer.resume=<run dir>`` continues from.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor
from tqdm import tqdm
from transformers import PreTrainedModel, get_scheduler

from opdx.backends import Sampler, Scorer
from opdx.backends.hf import TokenScores
from opdx.benchmarks import Benchmark, Mixture, Problem
from opdx.checkpoint import CHECKPOINT_DIR, load_checkpoint, save_checkpoint, usable_checkpoint
from opdx.config import TrainerConfig
from opdx.dist import Ranks, active, barrier, broadcast, global_max, global_min, global_sum, wrap
from opdx.divergences import Divergence
from opdx.evaluation import components_table, eval_problem_count, evaluate_split, markdown_table
from opdx.files import atomic_write_text
from opdx.metrics import LOGGERS, SilentLogger, read_metrics, timed
from opdx.models import checkpoint_activations
from opdx.objective import LossTerms
from opdx.outcome import accuracy_change, collapse_reason
from opdx.rollout import Rollout
from opdx.run import Parts, Run, start
from opdx.seeding import generator, isolated, seed_global

SUMMARY_FILE = "summary.json"


class NonFiniteError(Exception):
    """``trainer.max_bad_steps`` steps in a row had non-finite values; the message names them."""


# trainer.schedule -> transformers' scheduler: linear warmup over trainer.warmup_steps, then this
SCHEDULERS = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}


@dataclass
class Learner:
    """What a training step uses: the backends, the student and the module of its with-grad
    forward (``policy``, which a DDP / FSDP2 wrapper would wrap), the optimizer and LR schedule."""

    run: Run
    rollout: Sampler
    teacher: Scorer
    student: PreTrainedModel
    policy: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ranks: Ranks


def build_learner(run: Run, parts: Parts) -> Learner:
    """The student's with-grad module (``TokenScores``), wrapped for ``trainer.strategy`` under
    torchrun (``opdx.dist.wrap``) and handed to the sampler; AdamW on it and its ``lr_schedule``."""
    t = run.config.trainer
    if t.gradient_checkpointing:
        checkpoint_activations(parts.student, on=True)
    policy = TokenScores(parts.student, t.logprob_chunk, len(parts.tokenizer))
    layers = getattr(parts.student.get_decoder(), "layers", [])
    policy = wrap(policy, t.strategy, layers, parts.device, forward_methods=("generate",))
    parts.rollout.update_weights(policy)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    scheduler = lr_schedule(optimizer, t)
    return Learner(run, parts.rollout, parts.teacher, parts.student, policy, optimizer, scheduler, parts.ranks)


def lr_schedule(optimizer: torch.optim.Optimizer, trainer: TrainerConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """transformers' schedule for ``trainer.schedule``: the LR rises linearly from 0 over
    ``warmup_steps`` steps, then stays (constant) or decays to 0 at ``steps`` (cosine, linear)."""
    name = SCHEDULERS[trainer.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=trainer.warmup_steps, num_training_steps=trainer.steps)


def prompts_for_step(benchmark: Benchmark, seed: int, step: int, count: int) -> list[Problem]:
    """The step's prompts, a function of (seed, step) alone so a resumed run draws the same: uniform
    over the train split, or for a mixture by component weight (``Mixture.draw``)."""
    rng = generator(seed, "prompts", step)
    if isinstance(benchmark, Mixture):
        return benchmark.draw(count, rng)
    indices = torch.randint(len(benchmark.train), (count,), generator=rng)
    return [benchmark.train[i] for i in indices.tolist()]


def eval_metrics(result: dict[str, float], benchmark: str, role: str = "") -> dict[str, float]:
    """An eval's metrics as logged: ``eval/<benchmark>/<role>metric``, and a mixture component's
    ``c/metric`` as ``eval/<c>/<role>metric`` (``role``: "" for the student, "teacher/")."""
    logged = {}
    for key, value in result.items():
        component, _, metric = key.rpartition("/")
        logged[f"eval/{component or benchmark}/{role}{metric}"] = value
    return logged


def nonfinite_parts(terms: LossTerms, mask_B_T: torch.Tensor) -> dict[str, int]:
    """What of a step is not finite on the response tokens of any rank: the student's or the
    teacher's log-probs (through log u = log q - log p), the advantages, the loss; the count of each."""
    parts = {
        "student_logprobs": terms.logp_student_B_T[mask_B_T],
        "teacher_logprobs": terms.log_u_B_T[mask_B_T],
        "advantages": terms.advantages_B_T[mask_B_T],
        "loss": terms.loss.detach().reshape(1),
    }
    local = torch.tensor([int((~torch.isfinite(values)).sum()) for values in parts.values()])
    counts = dict(zip(parts, global_sum(local).tolist(), strict=True))  # every rank skips together
    if counts["student_logprobs"]:
        counts["teacher_logprobs"] = 0  # log u is not finite because log p is not
    return {name: int(count) for name, count in counts.items() if count}


def train_step(learner: Learner, step: int) -> dict[str, float]:
    """Step ``step`` of OPD: the step's prompts (this rank's share) -> rollout -> teacher scores ->
    loss -> backward -> clip -> optimizer and LR step. Returns the step's metrics, over all ranks
    (``time/*``: this rank's seconds).

    The rollout samples with the global generator seeded for (seed, "rollout", step, and the rank
    when there are several). The loss's normalisers are the global batch's, so the summed gradients
    of the ranks are the gradient of the whole batch. A step where anything that reaches the update
    is not finite on any rank (log-probs on response tokens, advantages, loss, gradient norm)
    changes nothing (no parameter, optimizer or schedule update): its metrics say ``train/skipped``
    1 and which part was not finite (``nonfinite/*``, the count of tokens)."""
    run, t, estimator, ranks = learner.run, learner.run.config.trainer, learner.run.estimator, learner.ranks
    problems = ranks.share(prompts_for_step(run.benchmark, run.config.seed, step, t.prompts_per_step))
    seed_global(run.config.seed, "rollout", step, *([ranks.rank] if ranks.world > 1 else []))
    metrics: dict[str, float] = {}
    learner.policy.train()
    with timed(metrics, "rollout"):
        rollout = learner.rollout.sample(problems, t.samples_per_prompt, t.max_new_tokens, run.sampling)
    with timed(metrics, "teacher"), torch.no_grad():
        if estimator.needs_teacher_logits:
            teacher_scores = learner.teacher.logits(rollout)
        else:
            teacher_scores = learner.teacher.logprobs(rollout)
    with timed(metrics, "update"):
        student_scores = learner.policy(rollout, run.sampling, logits=estimator.needs_teacher_logits)
        terms = estimator.loss(
            student_scores,
            teacher_scores,
            rollout.response_tokens_B_T,
            rollout.response_mask_B_T,
            run.divergence,
            rollout.logp_sampling_B_T,
            reduce=global_sum,
        )
        learner.optimizer.zero_grad(set_to_none=True)
        bad = nonfinite_parts(terms, rollout.response_mask_B_T)
        if not bad:
            terms.loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(learner.policy.parameters(), t.grad_clip)
            grad_norm = grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm  # the global norm
            if not torch.isfinite(grad_norm):
                bad["grad_norm"] = 1
        if bad:
            learner.optimizer.zero_grad(set_to_none=True)
        else:
            learner.optimizer.step()
            metrics["train/lr"] = learner.scheduler.get_last_lr()[0]
            learner.scheduler.step()
            learner.rollout.update_weights(learner.policy)
    sequences = global_sum(torch.tensor([rollout.lengths_B.sum(), rollout.finished_B.sum(), len(rollout.lengths_B)]))
    metrics["rollout/len_mean"] = (sequences[0] / sequences[2]).item()
    metrics["rollout/eos_rate"] = (sequences[1] / sequences[2]).item()
    metrics["train/skipped"] = float(bool(bad))
    if bad:
        return metrics | {f"nonfinite/{name}": float(count) for name, count in bad.items()}
    metrics.update(rollout_metrics(rollout, terms, run.divergence))
    if isinstance(run.benchmark, Mixture):
        metrics.update(component_metrics(rollout, terms, run.divergence, run.benchmark.names))
    metrics["train/loss"] = global_sum(terms.loss.detach()).item()
    metrics["train/grad_norm"] = grad_norm.item()
    step_time = metrics["time/rollout"] + metrics["time/teacher"] + metrics["time/update"]
    metrics["perf/tokens_per_s"] = global_sum(rollout.response_mask_B_T.sum()).item() / step_time
    return metrics


def mean_std_min_max(values: torch.Tensor) -> tuple[float, float, float, float]:
    """Mean, standard deviation (n - 1), min and max of ``values`` over all ranks."""
    if not active():
        std = values.std().item() if values.numel() > 1 else 0.0
        return values.mean().item(), std, values.min().item(), values.max().item()
    v = values.double()
    count, total, squares = global_sum(torch.stack([v.new_tensor(v.numel()), v.sum(), v.square().sum()])).tolist()
    mean = total / count
    variance = max(squares - count * mean * mean, 0.0) / (count - 1) if count > 1 else 0.0
    low = global_min(v.min() if v.numel() else v.new_tensor(torch.inf))
    high = global_max(v.max() if v.numel() else v.new_tensor(-torch.inf))
    return mean, variance**0.5, low.item(), high.item()


def rollout_metrics(rollout: Rollout, terms: LossTerms, div: Divergence) -> dict[str, float]:
    """Reward, advantage and sampled divergence statistics over the response tokens of all ranks,
    and the largest gap between the sampler's and the trainer's log-probs of a sampled token."""
    mask_B_T = rollout.response_mask_B_T
    log_u = terms.log_u_B_T[mask_B_T]
    f_u = div.f(log_u)
    adv_mean, adv_std, adv_min, adv_max = mean_std_min_max(terms.advantages_B_T[mask_B_T])
    mismatch_B_T = (rollout.logp_sampling_B_T - terms.logp_student_B_T).abs()
    if active():
        tokens = global_sum(torch.tensor(float(log_u.numel())))
        sums = global_sum(torch.stack([-f_u.sum(), (-log_u).sum(), (log_u.exp() * log_u).sum(), log_u.sum()]))
        reward, reverse_kl, forward_kl, log_u_mean = (sums / tokens).tolist()
        per_sequence = -(div.f(terms.log_u_B_T) * mask_B_T).sum()
        sequences = global_sum(torch.stack([per_sequence, torch.tensor(float(mask_B_T.shape[0]))]))
        sequence_reward = (sequences[0] / sequences[1]).item()
    else:
        reward, reverse_kl = -f_u.mean().item(), (-log_u).mean().item()
        forward_kl, log_u_mean = (log_u.exp() * log_u).mean().item(), log_u.mean().item()
        sequence_reward = -(div.f(terms.log_u_B_T) * mask_B_T).sum(-1).mean().item()
    return {
        "reward/token_mean": reward,
        "reward/sequence_mean": sequence_reward,
        "adv/mean": adv_mean,
        "adv/std": adv_std,
        "adv/min": adv_min,
        "adv/max": adv_max,
        "div/f_mean": -reward,
        "div/reverse_kl": reverse_kl,
        "div/forward_kl": forward_kl,
        "div/log_u_mean": log_u_mean,
        "rollout/logprob_mismatch": global_max(mismatch_B_T[mask_B_T].max()).item(),
    }


def component_metrics(rollout: Rollout, terms: LossTerms, div: Divergence, components: list[str]) -> dict[str, float]:
    """Per mixture component c (its teacher's scale differs from the others'), over the response
    tokens of its rows on all ranks: ``reward/<c>/token_mean`` (mean -f(u)), ``adv/<c>/mean`` and
    ``adv/<c>/std`` (n - 1), ``div/<c>/reverse_kl`` (mean -log u), ``rollout/<c>/len_mean`` and
    ``rollout/<c>/share`` (its fraction of the step's sequences). A component with no token this
    step gets none of them."""
    mask_B_T = rollout.response_mask_B_T
    sources = [getattr(problem, "source", None) for problem in rollout.problems or []]
    sums_K_7 = torch.zeros(len(components), 7, dtype=torch.float64)  # per component: 7 sums
    for c, name in enumerate(components):
        rows_B = torch.tensor([source == name for source in sources], dtype=torch.bool)
        in_rows_B_T = mask_B_T & rows_B[:, None]
        log_u, adv = terms.log_u_B_T[in_rows_B_T].double(), terms.advantages_B_T[in_rows_B_T].double()
        sums_K_7[c] = torch.stack([
            log_u.new_tensor(float(log_u.numel())), -div.f(log_u).sum(), adv.sum(), adv.square().sum(), -log_u.sum(),
            rows_B.sum().double(), (rollout.lengths_B * rows_B).sum().double(),
        ])  # fmt: skip
    tokens, reward, adv_sum, adv_squares, neg_log_u, rows, lengths = global_sum(sums_K_7).T.tolist()
    sequences = sum(rows)
    metrics = {}
    for c, name in enumerate(components):
        if not tokens[c]:
            continue
        n, mean = tokens[c], adv_sum[c] / tokens[c]
        variance = max(adv_squares[c] - n * mean * mean, 0.0) / (n - 1) if n > 1 else 0.0
        metrics |= {
            f"reward/{name}/token_mean": reward[c] / n,
            f"adv/{name}/mean": mean,
            f"adv/{name}/std": variance**0.5,
            f"div/{name}/reverse_kl": neg_log_u[c] / n,
            f"rollout/{name}/len_mean": lengths[c] / rows[c],
            f"rollout/{name}/share": rows[c] / sequences,
        }
    return metrics


def train(run: Run, run_dir: Path) -> dict[str, Any]:
    """Run (or resume) one distillation run into ``run_dir``; returns the summary. Under torchrun
    every rank runs this; rank 0 alone writes the metrics, the summary and the final student."""
    cfg, t, bench = run.config, run.config.trainer, run.benchmark.name
    run_dir.mkdir(parents=True, exist_ok=True)
    if not run.sampling.is_plain:
        warped = f"sampling with {run.sampling}: u = q/p uses the log-probs of that warped distribution"
        print(f"{warped}, not the raw student; the teacher q is scored at temperature 1 (a server's too)")
    parts = start(run, train=True)
    learner, ranks = build_learner(run, parts), parts.ranks

    def evaluate(role: str, step: int) -> dict[str, float]:
        """The teacher's or the student's eval, sampling from its own random stream (seed, role, step)."""
        sampler, teacher = (parts.teacher, None) if role == "teacher" else (parts.rollout, parts.teacher)
        rank = [ranks.rank] if ranks.world > 1 else []
        with isolated(cfg.seed, f"eval/{role}", step, *rank):
            return evaluate_split(
                sampler, parts.tokenizer, run.benchmark, cfg.eval, run.sampling, t.max_new_tokens, teacher,
                ranks.main, ranks,
            )  # fmt: skip

    checkpoint = usable_checkpoint(run_dir, ranks) if t.resume else None
    if checkpoint:
        extra = load_checkpoint(checkpoint, learner.policy, learner.optimizer)
        learner.rollout.update_weights(learner.policy)  # a sampler holding its own copy takes the loaded weights
        learner.scheduler.load_state_dict(extra["scheduler"])
        start_step, state = extra["step"], extra["state"]
        print(f"resuming {run_dir} from step {start_step}")
    else:
        start_step, state = 0, {"elapsed": 0.0, "skipped_steps": 0, "bad_streak": 0}
    logger = (LOGGERS[cfg.logger.name] if ranks.main else SilentLogger)(
        run_dir,
        OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True),
        resume_from_step=start_step if checkpoint else None,
        project=cfg.logger.project,
        group=cfg.logger.group,
        tags=[*cfg.logger.tags, run.divergence.name, run.estimator.name, cfg.model.name, bench],
        name=run_dir.name,
    )
    if not checkpoint:
        state["teacher_eval"] = evaluate("teacher", 0)
        state["initial_eval"] = state["best_eval"] = {**evaluate("student", 0), "step": 0}
        initial = {k: v for k, v in state["initial_eval"].items() if k != "step"}
        logger.log(eval_metrics(initial, bench) | eval_metrics(state["teacher_eval"], bench, "teacher/"), step=0)

    started = time.perf_counter() - state["elapsed"]
    progress = tqdm(
        range(start_step, t.steps), initial=start_step, total=t.steps, desc="opdx train", mininterval=1,
        disable=not ranks.main,
    )  # fmt: skip
    for step in progress:
        metrics = train_step(learner, step)
        done = step + 1
        skipped = bool(metrics["train/skipped"])
        state["skipped_steps"] += skipped
        state["bad_streak"] = state["bad_streak"] + 1 if skipped else 0
        metrics["train/skipped_steps"] = state["skipped_steps"]
        if skipped:
            postfix = {"skipped": ",".join(k.removeprefix("nonfinite/") for k in metrics if k.startswith("nonfinite/"))}
        else:
            postfix = {"loss": f"{metrics['train/loss']:.3f}", "rkl": f"{metrics['div/reverse_kl']:.2f}"}
        if state["bad_streak"] >= t.max_bad_steps:
            logger.log(metrics, step=done)
            raise NonFiniteError(
                f"{state['bad_streak']} steps in a row (to step {done}) were skipped because {postfix['skipped']} "
                f"were not finite (trainer.max_bad_steps={t.max_bad_steps}). Nothing of them was applied; the last "
                f"checkpoint in {run_dir / CHECKPOINT_DIR} is intact. A float16 teacher that overflows is a common "
                f"cause (model.teacher_dtype=bfloat16 or float32); resume with trainer.resume={run_dir}"
            )
        if done % t.eval_every == 0 or done == t.steps:
            with timed(metrics, "eval"):
                result = evaluate("student", done)
            metrics.update(eval_metrics(result, bench))
            if result["greedy_acc"] >= state["best_eval"]["greedy_acc"]:
                state["best_eval"] = {**result, "step": done}
            state["final_eval"] = {**result, "step": done}
            progress.set_postfix(**postfix, acc=f"{result['greedy_acc']:.3f}")
        else:
            progress.set_postfix(**postfix, refresh=False)
        logger.log(metrics, step=done)
        state["elapsed"] = time.perf_counter() - started
        if done % t.checkpoint_every == 0 or done == t.steps:
            extra = {"scheduler": learner.scheduler.state_dict(), "state": state}
            save_checkpoint(run_dir, done, learner.policy, learner.optimizer, extra, ranks)
    progress.close()
    if "final_eval" not in state:  # resumed at or past trainer.steps: nothing ran, evaluate once
        state["final_eval"] = {**evaluate("student", start_step), "step": start_step}

    weights = get_model_state_dict(learner.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    summary = make_summary(run, state, run_dir) if ranks.main else {}
    if ranks.main:
        student_weights = {key.removeprefix("model."): value for key, value in weights.items()}
        parts.student.save_pretrained(run_dir / "student", state_dict=student_weights)
        parts.tokenizer.save_pretrained(run_dir / "student")
        atomic_write_text(run_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
        logger.summary(summary)
        logger.finish()
        print_summary(summary)
    barrier()
    return broadcast(summary)


def make_summary(run: Run, state: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Initial / final / best eval beside the teacher's, key choices, wall time, step-time split."""
    cfg = run.config
    records = read_metrics(run_dir)
    steps = [r for r in records if "time/update" in r]
    mean = {k: sum(r[k] for r in steps) / len(steps) for k in ("time/rollout", "time/teacher", "time/update")}
    before, after = state["initial_eval"]["greedy_acc"], state["final_eval"]["greedy_acc"]
    n = eval_problem_count(run.benchmark, cfg.eval)  # a mixture's weighted mean: as one pool (exact for equal weights)
    change = accuracy_change(before, after, n)
    return {
        "model": cfg.model.name,
        "divergence": run.divergence.name,
        "divergence_params": {k: v for k, v in cfg.divergence.items() if k != "name"},
        "estimator": run.estimator.name,
        "gamma": cfg.estimator.gamma,
        "benchmark": run.benchmark.name,
        "seed": cfg.seed,
        "steps": cfg.trainer.steps,
        "group": cfg.logger.group,
        "teacher_eval": state["teacher_eval"],
        "initial_eval": state["initial_eval"],
        "final_eval": state["final_eval"],
        "best_eval": state["best_eval"],
        "eval_problems": n,
        "skipped_steps": state["skipped_steps"],
        "greedy_acc_change": {"difference": change.difference, "ci95": [change.low, change.high]},
        "below_start": change.below_start,
        "collapse": collapse_reason(records, cfg.trainer.max_new_tokens, before, after),
        "wall_time_s": round(state["elapsed"], 1),
        "mean_step_time_s": {k.removeprefix("time/"): round(v, 4) for k, v in mean.items()},
    }


def print_summary(summary: dict[str, Any]) -> None:
    rows = {"teacher": summary["teacher_eval"], "student before": summary["initial_eval"]}
    rows |= {"student after": summary["final_eval"], "student best": summary["best_eval"]}
    table = pd.DataFrame(rows).T.drop(columns="step")
    per_component = components_table(rows)
    print(f"\n{summary['divergence']} / {summary['estimator']} on {summary['benchmark']}, {summary['steps']} steps:")
    if per_component is not None:
        print(markdown_table(per_component) + "\n")
    print(markdown_table(table[[key for key in table if "/" not in key]]))  # a mixture's: the weighted means
    change = accuracy_change(
        summary["initial_eval"]["greedy_acc"], summary["final_eval"]["greedy_acc"], summary["eval_problems"]
    )
    verdict = "within eval noise of the initial student"
    if change.below_start or change.low > 0:
        verdict = f"{'below' if change.below_start else 'above'} the initial student beyond eval noise"
    print(f"student greedy accuracy: {change} ({verdict})")
    print(f"collapse: {summary['collapse'] or 'no (rollouts end, accuracy above 0, metrics finite)'}")
    if summary["skipped_steps"]:
        skipped = summary["skipped_steps"]
        print(f"skipped steps: {skipped} (non-finite values, nothing of them applied; see nonfinite/*)")
    split = ", ".join(f"{k} {v:.3f}s" for k, v in summary["mean_step_time_s"].items())
    print(f"wall time {summary['wall_time_s']:.0f}s; mean step: {split}")
