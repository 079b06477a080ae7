"""The on-policy distillation loop.

    opdx train                                   # CPU default: tiny teacher -> student, arith
    opdx train divergence=forward_kl estimator=stopgrad trainer.steps=600

``train_step``: sample G responses to each of P prompts from the student (the ``rollout``
backend), score the sampled tokens with the teacher (their log-probs, or for the dense estimator
supports its next-token distributions, made chunk by chunk in the loss), recompute the student's
scores with grad through ``Learner.policy`` (the one module a data-parallel wrapper wraps), take
the estimator's loss, backward, clip the gradient norm, AdamW step, LR schedule, and hand the new
weights to the sampler. ``train`` runs the steps, evaluates every ``eval_every`` steps on the
held-out split and writes an atomic checkpoint every ``checkpoint_every`` steps that
``trainer.resume=<run dir>`` continues from.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor
from tqdm import tqdm
from transformers import PreTrainedModel, get_scheduler

from opdx.backends import Sampler, Scorer, teacher_scores
from opdx.benchmarks import Benchmark, Problem
from opdx.checkpoint import CHECKPOINT_DIR, CheckpointError, load_checkpoint, save_checkpoint, usable_checkpoint
from opdx.config import EstimatorConfig, TrainerConfig
from opdx.dist import (
    Ranks,
    accumulating,
    barrier,
    broadcast,
    drop_unsynced_gradients,
    gather,
    global_sum,
    micro_batches,
    whole,
    wrap,
)
from opdx.evaluation import eval_problem_count, evaluate_split
from opdx.files import atomic_write_text
from opdx.logits import DenseScores
from opdx.lora import MERGED_DIR, has_adapters, save_merged
from opdx.metrics import LOGGERS, SilentLogger, nonfinite_names, timed, track_cpu_memory
from opdx.models import checkpoint_activations
from opdx.monitor import Monitor
from opdx.objective import Estimator, LossInputs, LossTerms, batch_totals, other_estimator, reference_estimator
from opdx.pipeline import Ahead, InStep
from opdx.policy import TokenScores, full_weights
from opdx.rollout import Rollout
from opdx.run import Parts, Run, start
from opdx.samples import SampleLog
from opdx.seeding import generator, isolated
from opdx.step_metrics import (
    component_metrics,
    eval_metrics,
    nonfinite_parts,
    rollout_metrics,
    sequence_metrics,
    staleness_metrics,
)
from opdx.summary import SUMMARY_FILE, LoopState, make_summary, print_summary


class NonFiniteError(Exception):
    """``trainer.max_bad_steps`` steps in a row had non-finite values; the message names them."""


class EarlyWarningStop(Exception):
    """``trainer.stop_on_warning``: an early warning (``opdx.monitor``) fired; the message names it."""


def nonfinite_advice(parts: str, estimator: EstimatorConfig) -> str:
    """The likely cause of non-finite ``parts`` (``nonfinite_parts``' names, comma-separated) and
    what to change: non-finite log-probs come from a model's arithmetic (or a token the trainer's
    warped distribution excludes), non-finite advantages or loss with finite log-probs from an
    untruncated importance weight or an advantage that grew without bound in u."""
    if "teacher_logprobs" in parts:
        return "A float16 teacher that overflows is a common cause (model.teacher_dtype=bfloat16 or float32)"
    if "student_logprobs" in parts:
        return (
            "Common causes: a float16 student that overflows, or a sampled token outside the trainer's "
            "sampling.top_k / top_p (a sampler that warps differently)"
        )
    if estimator.rollout_correction == "per_decision" and estimator.per_decision_cap is None:
        return (
            "Both models' log-probs were finite: the per_decision importance weight may have overflowed "
            "(rollout/sequence_log_ratio_max); estimator.per_decision_cap truncates it"
        )
    return (
        "Both models' log-probs were finite: an advantage grew without bound in u = q/p (as in a diverging "
        "run: stop-gradient forward_kl or pearson); estimator.log_ratio_clip bounds u"
    )


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
    rollouts: InStep | None = None  # where each step's batch comes from (opdx.pipeline); set by build_learner


def build_learner(run: Run, parts: Parts) -> Learner:
    """The student's with-grad module (``TokenScores``), wrapped for ``trainer.strategy`` under
    torchrun (``opdx.dist.wrap``) and handed to the sampler; AdamW on it and its ``lr_schedule``."""
    t = run.config.trainer
    if t.gradient_checkpointing:
        checkpoint_activations(parts.student, on=True)
    compute_dtype = getattr(torch, run.config.model.dtype)  # bf16 compute over float32 weights when bf16-mixed
    policy = TokenScores(parts.student, run.config.runtime.logprob_chunk, len(parts.tokenizer), compute_dtype)
    layers = getattr(parts.student.get_decoder(), "layers", [])
    mixed = compute_dtype if t.precision == "bf16-mixed" else None  # FSDP2 gathers bf16 copies of the weights
    policy = wrap(policy, t.strategy, layers, parts.device, forward_methods=("generate",), param_dtype=mixed)
    parts.rollout.update_weights(policy, 0)
    parts.teacher.update_weights(policy, 0)  # a teacher sharing the student's model (teacher=self) scores through it
    trained = [parameter for parameter in policy.parameters() if parameter.requires_grad]  # a LoRA student's adapters
    optimizer = torch.optim.AdamW(trained, lr=t.lr, weight_decay=t.weight_decay)
    scheduler = lr_schedule(optimizer, t)
    learner = Learner(run, parts.rollout, parts.teacher, parts.student, policy, optimizer, scheduler, parts.ranks)
    learner.rollouts = InStep(parts.rollout, lambda step: sample_batch(learner, step), rollout_seed(learner))
    return learner


def rollout_seed(learner: Learner) -> tuple[int, ...]:
    """What a step's rollout seeds its generator with, besides the step: the run's seed, and the
    rank when there are several."""
    ranks = learner.ranks
    return (learner.run.config.seed, *([ranks.rank] if ranks.world > 1 else []))


def sample_batch(learner: Learner, step: int) -> Rollout:
    """Step ``step``'s rollout: this rank's share of its prompts, ``trainer.samples_per_prompt``
    samples each, ``trainer.rollout_batch_size`` sequences per sampling call, on the global
    generator as seeded by the caller (``opdx.pipeline``)."""
    run, t = learner.run, learner.run.config.trainer
    problems = learner.ranks.share(prompts_for_step(run.benchmark, run.config.seed, step, t.prompts_per_step))
    group, new_tokens = t.samples_per_prompt, run.config.sampling.max_new_tokens
    per_call = max(1, (t.rollout_batch_size or group * len(problems)) // group)  # prompts per sampling call
    calls = [problems[i : i + per_call] for i in range(0, len(problems), per_call)]
    return Rollout.concat([learner.rollout.sample(c, group, new_tokens, run.sampling) for c in calls])


def lr_schedule(optimizer: torch.optim.Optimizer, trainer: TrainerConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """transformers' schedule for ``trainer.schedule``: the LR rises linearly from 0 over
    ``warmup_steps`` steps, then stays (constant) or decays to 0 at ``steps`` (cosine, linear)."""
    name = SCHEDULERS[trainer.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=trainer.warmup_steps, num_training_steps=trainer.steps)


def prompts_for_step(benchmark: Benchmark, seed: int, step: int, count: int) -> list[Problem]:
    """The step's prompts, a function of (seed, step) alone so a resumed run draws the same
    (``Benchmark.draw``: uniform over a plain benchmark's train split, by weight over components)."""
    return benchmark.draw(count, generator(seed, "prompts", step))


def train_step(learner: Learner, step: int, samples: SampleLog | None = None) -> dict[str, float]:
    """Step ``step`` of OPD: the step's rollout (``sample_batch``, from ``learner.rollouts``: sampled
    now or ahead, ``opdx.pipeline``) -> teacher scores -> loss -> backward -> clip -> optimizer and
    LR step -> the new weights to the sampler. Returns the step's metrics, over all ranks
    (``time/*``: this rank's seconds; ``time/rollout`` is the time the step waited for its batch).

    The rollout samples with the global generator seeded for (seed, "rollout", step, and the rank
    when there are several). The loss's normalisers are the global batch's, so the summed gradients
    of the ranks are the gradient of the whole batch. A step where anything that reaches the update
    is not finite on any rank (log-probs on response tokens, advantages, loss, gradient norm)
    changes nothing (no parameter, optimizer or schedule update): its metrics say ``train/skipped``
    1 and which part was not finite (``nonfinite/*``, the count of tokens). ``samples`` keeps a few
    of the rollout's rows as text, with the log u the loss used (none on a skipped step)."""
    run, t = learner.run, learner.run.config.trainer
    metrics: dict[str, float] = {}
    learner.policy.train()
    with timed(metrics, "rollout"):
        rollout = learner.rollouts.take(step)
    terms, bad = accumulate_gradients(learner.policy, learner.teacher, run, rollout, metrics)
    if not bad and t.probe_every and (step + 1) % t.probe_every == 0:
        probe_gradients(learner, rollout, metrics)
    with timed(metrics, "update"):
        if not bad:
            grad_norm = torch.nn.utils.clip_grad_norm_(learner.policy.parameters(), t.grad_clip)
            grad_norm = whole(grad_norm)  # the global norm
            if not torch.isfinite(grad_norm):
                bad["grad_norm"] = 1
        if not bad:
            learner.optimizer.step()
            metrics["train/lr"] = learner.scheduler.get_last_lr()[0]
            learner.scheduler.step()
        # freed before the rollout and eval (the optimizer's sharded parameters: not the module's views)
        learner.optimizer.zero_grad(set_to_none=True)
        learner.rollouts.push(learner.policy, step + 1)  # a skipped step's too: versions count steps
    metrics |= sequence_metrics(rollout) | staleness_metrics(rollout, step)
    metrics["train/skipped"] = float(bool(bad))
    if samples is not None:
        samples.add(run.benchmark, rollout, "train", "sampled", None if bad else terms.log_u_B_T)
    if bad:
        return metrics | {f"nonfinite/{name}": float(count) for name, count in bad.items()}
    metrics |= rollout_metrics(rollout, terms, run.divergence, run.estimator.config.log_ratio_clip)
    components = run.benchmark.components
    if len(components) > 1:
        metrics |= component_metrics(rollout, terms, run.divergence, [c.name for c in components])
    metrics["train/loss"] = global_sum(terms.loss.detach()).item()
    metrics["train/grad_norm"] = grad_norm.item()
    step_time = metrics["time/rollout"] + metrics["time/teacher"] + metrics["time/update"]
    metrics["perf/tokens_per_s"] = global_sum(rollout.response_mask_B_T.sum()).item() / step_time
    return metrics


def probe_gradients(learner: Learner, rollout: Rollout, metrics: dict[str, float]) -> None:
    """``trainer.probe_every``: on the step's batch, the gradient of the other estimator (stop-gradient
    OPD beside an OPD+ run, OPD+ beside an OPD run; the same divergence, support and switches) next
    to the run's own, which stays in place for the update. Adds ``probe/cosine`` (of the two),
    ``probe/relative_difference`` (||g_other - g_run|| / ||g_run||) and ``probe/grad_norm_other``,
    before clipping and over all ranks, and the probe's seconds as ``time/probe``; a probe whose
    gradient is not finite adds ``probe/skipped`` 1 instead. Where the teacher gives its logits
    (``full`` in its ``supports``), also the gradient of the exact reference (``reference_estimator``:
    OPD+ on the full support) and the cosines of the run's and the other's with it,
    ``probe/reference_cosine`` and ``probe/reference_cosine_other``.

    For reverse_kl the two estimators have the same expectation (w_f(u) = -f(u) - 1: a baseline),
    so the figures measure the batch's sampling noise; for every other f they add the bias of
    stop-gradient OPD (docs/opd-math.md, "What the probe measures")."""
    run = learner.run
    params = [param for group in learner.optimizer.param_groups for param in group["params"]]  # FSDP2: the shards
    run_grads = [param.grad for param in params]
    other = other_estimator(run.estimator, run.sampling.is_plain)
    reference = reference_estimator(run.estimator, run.sampling.is_plain)
    with timed(metrics, "probe"):
        grads = [estimator_gradients(learner, rollout, other, params)]
        if reference is not None and "full" in learner.teacher.supports:
            same = reference.config == other.config  # stop-gradient OPD on the full support: OPD+ there is both
            grads.append(grads[0] if same else estimator_gradients(learner, rollout, reference, params))
    for param, grad in zip(params, run_grads, strict=True):  # every gradient as it was, None included
        param.grad = grad
    if any(g is None for g in grads):
        metrics["probe/skipped"] = 1.0
        return
    dot, run_square, other_square, difference = gradient_products(run_grads, grads[0])
    metrics["probe/cosine"] = cosine(dot, run_square, other_square)
    metrics["probe/relative_difference"] = math.sqrt(difference / run_square) if run_square > 0 else math.nan
    metrics["probe/grad_norm_other"] = math.sqrt(other_square)
    if len(grads) > 1:
        for key, ours in (("probe/reference_cosine", run_grads), ("probe/reference_cosine_other", grads[0])):
            metrics[key] = cosine(*gradient_products(ours, grads[1])[:3])


def cosine(dot: float, first_square: float, second_square: float) -> float:
    """<a, b> / (||a|| ||b||) from the inner product and the squared norms; nan for a zero gradient."""
    both = first_square * second_square
    return dot / math.sqrt(both) if both > 0 else math.nan


def estimator_gradients(
    learner: Learner, rollout: Rollout, estimator: Estimator, params: list[Tensor]
) -> list[Tensor | None] | None:
    """The gradients of ``params`` that ``estimator``'s loss on ``rollout`` gives (they replace the
    parameters' own, which the caller keeps and restores); None where a part was not finite."""
    for param in params:
        param.grad = None
    _, bad = accumulate_gradients(
        learner.policy, learner.teacher, replace(learner.run, estimator=estimator), rollout, {}
    )
    return None if bad else [param.grad for param in params]


def gradient_products(first: list[Tensor | None], second: list[Tensor | None]) -> tuple[float, float, float, float]:
    """<a, b>, ||a||^2, ||b||^2 and ||a - b||^2 of two gradients given as lists over the same
    parameters (None: a parameter without gradient in ``first``, left out), over all ranks: float32
    products summed in float64, with no float64 copy of a large gradient; under FSDP2 each rank's
    shards summed over the ranks (DDP: every rank holds the whole gradient)."""
    pairs = [(a, b) for a, b in zip(first, second, strict=True) if a is not None]
    sums = torch.zeros(4, dtype=torch.float64, device=pairs[0][0].device)
    for ours, theirs in pairs:
        a, b = ((x.to_local() if isinstance(x, DTensor) else x).float() for x in (ours, theirs))
        squares = [(a * b).sum(dtype=torch.float64), a.square().sum(dtype=torch.float64)]
        squares += [b.square().sum(dtype=torch.float64), (a - b).square().sum(dtype=torch.float64)]
        sums += torch.stack(squares)
    if isinstance(pairs[0][0], DTensor):
        sums = global_sum(sums)
    dot, first_square, second_square, difference = sums.tolist()
    return dot, first_square, second_square, difference


def accumulate_gradients(
    policy: nn.Module, teacher: Scorer, run: Run, rollout: Rollout, metrics: dict[str, float]
) -> tuple[LossTerms, dict[str, int]]:
    """The teacher's scores, the student's with-grad scores, the loss and its backward, one
    micro-batch of ``trainer.micro_batch_size`` sequences at a time (with several, the rows taken
    longest response first, ``Rollout.longest_first``, and each micro-batch cut to its own longest
    response, ``Rollout.trimmed``), gradients added to ``policy``'s
    (the caller zeroes them: under FSDP2 through the optimizer, whose parameters are the sharded
    ones; the module may hold unsharded views between steps). The normalisers are the whole
    batch's over every rank and micro-batch (``batch_totals``), so the summed gradient equals the
    whole batch's in one forward; with several micro-batches the batch baseline and whitening take
    a no-grad pass over the batch for its advantages first. Returns the batch's terms (the loss
    summed, the rest [B, T] in the rollout's row order) and what was not finite (then the [B, T]
    terms are None and nothing was applied: the gradients are partial)."""
    estimator, dense = run.estimator, run.estimator.needs_dense
    mask = rollout.response_mask_B_T
    rows = micro_batches(mask.shape[0], run.config.trainer.micro_batch_size)
    order_B = rollout.longest_first() if len(rows) > 1 else torch.arange(mask.shape[0])
    parts = [rollout] if len(rows) == 1 else [rollout.select(order_B[part].tolist()).trimmed() for part in rows]

    def in_row_order(tensors_b_t: list[Tensor]) -> Tensor:
        """The micro-batches' [b, t] tensors as one [B, T] in the rollout's rows (0 in trimmed columns)."""
        joined_B_T = torch.cat([nn.functional.pad(x_b_t, (0, mask.shape[1] - x_b_t.shape[1])) for x_b_t in tensors_b_t])
        return joined_B_T[order_B.argsort()]

    def scores_of(part: Rollout) -> Tensor | DenseScores:
        with timed(metrics, "teacher"):
            return teacher_scores(teacher, part, estimator.teacher_support, estimator.config.top_k)

    def inputs(part: Rollout, student: Tensor, scores: Tensor) -> LossInputs:
        return LossInputs(student, scores, part.response_mask_B_T, part.response_tokens_B_T, part.logp_sampling_B_T)

    scores = [scores_of(part) for part in parts] if not dense else [None] * len(parts)
    advantages_B_T = None
    prepass = estimator.needs_advantage_totals and len(parts) > 1  # a sampled estimator: log-probs only
    if prepass:
        with timed(metrics, "update"), torch.no_grad():
            advantages_B_T = in_row_order([
                estimator.advantages(inputs(part, policy(part, run.sampling), score), run.divergence)
                for part, score in zip(parts, scores, strict=True)
            ])  # fmt: skip
    later = estimator.needs_advantage_totals and not prepass  # from the one micro-batch's own forward
    totals = None if later else batch_totals(mask, advantages_B_T, global_sum)
    each: list[LossTerms] = []
    bad: dict[str, int] = {}
    for i, (part, score) in enumerate(zip(parts, scores, strict=True)):
        score = scores_of(part) if score is None else score  # hidden states: one micro-batch's at a time
        with timed(metrics, "update"), accumulating(policy, last=i == len(parts) - 1):
            student = policy(part, run.sampling, logits=dense)
            if totals is None:  # one micro-batch: the advantages' statistics from this very forward
                advantages_B_T = estimator.advantages(inputs(part, student, score), run.divergence)
                totals = batch_totals(mask, advantages_B_T, global_sum)
            terms = estimator.loss(inputs(part, student, score), run.divergence, totals)
            bad = nonfinite_parts(terms, part.response_mask_B_T)
            if bad:
                drop_unsynced_gradients(policy)  # earlier micro-batches' (FSDP2 keeps them apart)
                break
            terms.loss.backward()
        each.append(terms)
        del student, score  # a micro-batch's hidden states are not kept while the next one's are made
    loss = torch.stack([terms.loss.detach() for terms in each]).sum() if each else torch.tensor(torch.nan)
    joined = [None if bad else in_row_order([getattr(terms, key) for terms in each]) for key in TERMS]
    return LossTerms(loss, *joined), bad


TERMS = ("logp_student_B_T", "log_u_B_T", "advantages_B_T")  # the [B, T] fields of LossTerms


PENDING = "pending_rollouts"  # a checkpoint's batches sampled ahead of its step (opdx.pipeline.Ahead), by rank and step


def pending_batches(extra: dict[str, Any], ranks: Ranks) -> dict[int, Rollout]:
    """This rank's batches sampled ahead of a checkpoint's step (``extra[PENDING]``: each rank's
    ``{step: rollout}``, by rank), or none when the checkpoint was saved on another number of
    ranks (each rank samples its own rows, with its own seed: they are sampled again)."""
    by_rank = extra.get(PENDING, [])
    if isinstance(by_rank, dict):  # saved by a one-process run before they were kept by rank
        by_rank = [by_rank]
    if len(by_rank) == ranks.world:
        return by_rank[ranks.rank]
    if any(by_rank):
        print(f"the batches sampled ahead on {len(by_rank)} ranks are sampled again on {ranks.world}")
    return {}


def train(run: Run, run_dir: Path) -> dict[str, Any]:
    """Run (or resume) one distillation run into ``run_dir``; returns the summary. Under torchrun
    every rank runs this; rank 0 alone writes the metrics, the summary and the final student."""
    cfg, t, bench = run.config, run.config.trainer, run.benchmark.name
    run_dir.mkdir(parents=True, exist_ok=True)
    if not run.sampling.is_plain:
        warped = f"sampling with {run.sampling}: u = q/p uses the log-probs of that warped distribution"
        print(f"{warped}, not the raw student; the teacher q is scored at temperature 1 (a server's too)")
    parts = start(run)
    learner, ranks = build_learner(run, parts), parts.ranks
    track_cpu_memory(cfg.runtime.track_memory)

    def evaluate(role: str, step: int, samples: SampleLog | None = None) -> dict[str, float]:
        """The teacher's or the student's eval, sampling from its own random stream (seed, role, step)."""
        sampler, teacher = (parts.teacher, None) if role == "teacher" else (parts.rollout, parts.teacher)
        rank = [ranks.rank] if ranks.world > 1 else []
        with isolated(cfg.seed, f"eval/{role}", step, *rank):
            return evaluate_split(
                sampler, parts.tokenizer, run.benchmark, cfg.eval, run.sampling, cfg.sampling.max_new_tokens, teacher,
                ranks.main, ranks, samples,
            )  # fmt: skip

    def sample_log(step: int, eval_step: bool) -> SampleLog | None:
        """Where the step's sample texts go (rank 0 alone writes them): at the eval steps, and every
        ``logger.samples_every``."""
        every = cfg.logger.samples_every
        wanted = eval_step if every is None else eval_step or step % every == 0
        return SampleLog(parts.tokenizer, cfg.logger.samples) if wanted and cfg.logger.samples and ranks.main else None

    checkpoint = usable_checkpoint(run_dir, ranks) if t.resume else None
    if checkpoint:
        extra = load_checkpoint(checkpoint, learner.policy, learner.optimizer)
        learner.rollout.update_weights(learner.policy, extra["step"])  # a sampler with its own copy takes them
        learner.scheduler.load_state_dict(extra["scheduler"])
        try:
            start_step, state = extra["step"], LoopState.from_dict(extra["state"])
        except ValueError as error:
            raise CheckpointError(f"{checkpoint}: {error}") from None
        print(f"resuming {run_dir} from step {start_step}")
    else:
        start_step, state = 0, LoopState()
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
        state.teacher_eval = evaluate("teacher", 0)
        samples = sample_log(0, eval_step=True)
        state.initial_eval = state.best_eval = {**evaluate("student", 0, samples), "step": 0}
        if samples is not None:
            logger.samples(samples.rows, step=0)
        initial = {k: v for k, v in state.initial_eval.items() if k != "step"}
        logger.log(eval_metrics(initial, bench) | eval_metrics(state.teacher_eval, bench, "teacher/"), step=0)

    restored = pending_batches(extra if checkpoint else {}, ranks)
    if t.max_staleness is not None:
        sampled = learner.rollouts
        learner.rollouts = Ahead(
            sampled.sampler, sampled.sample, sampled.seed, t.max_staleness, start_step, t.steps, restored
        )
    elif restored:
        print(f"the {len(restored)} batches the run had sampled ahead are sampled again (trainer.max_staleness=null)")
    started, monitor = time.perf_counter() - state.elapsed, Monitor(cfg.monitor, state.monitor)
    progress = tqdm(
        range(start_step, t.steps), initial=start_step, total=t.steps, desc="opdx train", mininterval=1,
        disable=not ranks.main,
    )  # fmt: skip
    try:
        for step in progress:
            done = step + 1
            eval_step = done % t.eval_every == 0 or done == t.steps
            samples = sample_log(done, eval_step)
            metrics = train_step(learner, step, samples)
            skipped = bool(metrics["train/skipped"])
            state.skipped_steps += skipped
            state.bad_streak = state.bad_streak + 1 if skipped else 0
            metrics["train/skipped_steps"] = state.skipped_steps
            if skipped:
                postfix = {"skipped": nonfinite_names(metrics)}
            else:
                postfix = {"loss": f"{metrics['train/loss']:.3f}", "rkl": f"{metrics['div/reverse_kl']:.2f}"}
            if state.bad_streak >= t.max_bad_steps:
                logger.log(metrics, step=done)
                logger.finish()
                advice = nonfinite_advice(postfix["skipped"], run.estimator.config)
                raise NonFiniteError(
                    f"{state.bad_streak} steps in a row (to step {done}) were skipped because {postfix['skipped']} "
                    f"were not finite (trainer.max_bad_steps={t.max_bad_steps}). Nothing of them was applied; the last "
                    f"checkpoint in {run_dir / CHECKPOINT_DIR} is intact. {advice}; "
                    f"resume with trainer.resume={run_dir}"
                )
            if eval_step:
                with timed(metrics, "eval"):
                    result = evaluate("student", done, samples)
                metrics |= eval_metrics(result, bench)
                if result["greedy_acc"] >= state.best_eval["greedy_acc"]:
                    state.best_eval = {**result, "step": done}
                state.final_eval = {**result, "step": done}
                progress.set_postfix(**postfix, acc=f"{result['greedy_acc']:.3f}")
            else:
                progress.set_postfix(**postfix, refresh=False)
            monitored, warnings = monitor.update(done, metrics)
            metrics |= monitored
            for warning in warnings if ranks.main else []:
                progress.write(str(warning))
            if samples is not None:
                logger.samples(samples.rows, step=done)
            logger.log(metrics, step=done)
            state.elapsed, state.monitor = time.perf_counter() - started, monitor.to_dict()
            stop = bool(warnings) and t.stop_on_warning and done < t.steps  # at the last step the run is done anyway
            if done % t.checkpoint_every == 0 or done == t.steps or stop:
                extra = {"scheduler": learner.scheduler.state_dict(), "state": state.to_dict()}
                extra[PENDING] = gather(learner.rollouts.pending())  # sampled ahead: resumed, not resampled
                save_checkpoint(run_dir, done, learner.policy, learner.optimizer, extra, ranks)
            if stop:
                logger.finish()
                raise EarlyWarningStop(
                    f"{warnings[0]} (trainer.stop_on_warning). The checkpoint of step {done} is in "
                    f"{run_dir / CHECKPOINT_DIR}; resume with trainer.resume={run_dir} (a warning fires once per run)"
                )
    finally:
        learner.rollouts.close()
    progress.close()
    if state.final_eval is None:  # resumed at or past trainer.steps: nothing ran, evaluate once
        state.final_eval = {**evaluate("student", start_step), "step": start_step}

    weights = get_model_state_dict(learner.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    export = getattr(torch, t.export_dtype) if t.export_dtype else None  # checkpoints keep the master dtype
    merged: dict[str, Tensor] = {}
    if cfg.model.lora.r and cfg.model.lora.save_merged:  # every rank joins each gather, rank 0 keeps them
        for name, tensor in full_weights(learner.policy, export or parts.student.dtype):
            if ranks.main:
                merged[name] = tensor.cpu()
    summary = {}
    if ranks.main:
        names = {"divergence": run.divergence.name, "estimator": run.estimator.name, "benchmark": bench}
        summary = make_summary(cfg, names, state, run_dir, eval_problem_count(run.benchmark, cfg.eval))
        student_weights = {key.removeprefix("model."): value.to(export) for key, value in weights.items()}
        parts.student.save_pretrained(run_dir / "student", state_dict=student_weights)  # LoRA: the adapters alone
        if merged:
            save_merged(parts.student, merged, run_dir / MERGED_DIR)
            parts.tokenizer.save_pretrained(run_dir / MERGED_DIR)
        if export is not None and not has_adapters(parts.student):  # config.json says the weights' dtype
            parts.student.config.dtype = export
            parts.student.config.save_pretrained(run_dir / "student")
        parts.tokenizer.save_pretrained(run_dir / "student")
        atomic_write_text(run_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
        logger.summary(summary)
        logger.finish()
        print_summary(summary)
    barrier()
    return broadcast(summary)
