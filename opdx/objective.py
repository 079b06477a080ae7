"""Gradient estimators of on-policy distillation: stop-gradient OPD and unbiased OPD+, one
registry (config group ``estimator``), each on a support (``estimator.support``): the sampled
token, the teacher's top-k plus a tail category, or the full vocabulary.

Shapes: B sequences, T token positions, V vocabulary. p = student, q = teacher, and for the
sampled token of position n, log u_n = log q(y_n|s_n) - log p(y_n|s_n).

Token advantages with discount gamma (to maximise):

    stopgrad:  A_n = -f(u_n)  + sum_{m>n} gamma^(m-n) (-f(u_m))
    unbiased:  A_n = w_f(u_n) + sum_{m>n} gamma^(m-n) (-f(u_m)),   w_f(u) = -f(u) + u f'(u)

and the surrogate whose gradient estimates grad J^f, J^f = E_{y~p}[sum_n f(u_n)]:

    L = -(1/B) sum_b sum_n mask_bn * stopgrad(A_bn) * log p(y_bn | s_bn).

With gamma = 1 the unbiased estimate is exact for grad J^f; with gamma = 0 it is exact for the
per-state gradient sum_n grad D_f(q || p)(s_n) with the state distribution held fixed.

On a dense support S (``topk``, ``full``) the own term is taken in expectation over the
support's categories, exactly, and the later rewards are the later states' divergences D^S:
the unbiased estimator is then exact for J^S = E_{y~p}[sum_n D^S(s_n)] at gamma = 1 (J^full is
J^f; J^topk, on K + 1 categories, is a lower bound of it) and for its per-state gradient at
gamma = 0 (``dense_state_terms``; docs/opd-math.md, "Dense supports").

Each estimator says what it needs from the teacher (``teacher_support``: the sampled tokens'
log-probs, its top-k, or its logits, made chunk by chunk from its hidden states), checks the
switches of its ``EstimatorConfig`` and computes its loss from one ``LossInputs``;
``build_estimator`` is the one constructor, and the estimator object (never its name) is what the
loss layer passes around. The conventions and
derivations are those of ``docs/opd-math.md``.

Every normaliser (the loss's 1/B, ``token_mean``'s token count, the batch baseline's mean,
whitening's standard deviation) is the whole batch's: ``batch_totals`` takes them over every rank
(``reduce``, a sum over ranks: ``opdx.dist.global_sum``) and every micro-batch before any backward,
and a loss given those ``BatchTotals`` is one micro-batch's share of the whole batch's loss. So the
summed gradients of the micro-batches and ranks are exactly the gradient of the whole batch in
one process. Without totals a loss normalises by its own inputs (one process, one batch).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import Tensor

from opdx.config import EstimatorConfig, RuntimeConfig
from opdx.divergences import Divergence, get_divergence
from opdx.logits import DenseScores, TopK

Reduce = Callable[[Tensor], Tensor]


def local(x: Tensor) -> Tensor:
    """The sum over ranks of a one-process run: ``x`` itself."""
    return x


@dataclass(frozen=True)
class LossInputs:
    """What an estimator's loss reads: one batch of B sequences with T response positions (V the
    vocabulary), the student's scores with grad and everything else constant.

    - ``student_scores``: log p_theta of the sampled tokens [B, T], or when the estimator
      ``needs_dense`` its next-token logits at each position (``HeadLogits``, made chunk by
      chunk: never a [B, T, V] tensor); with grad.
    - ``teacher_scores``: log q of the same tokens [B, T], or the teacher's ``teacher_support``
      scores (``DenseScores``: logits, or the top-k).
    - ``mask_B_T``: the response tokens (bool); off the mask any value, -inf included, is ignored.
    - ``tokens_B_T``: the sampled token ids (int64); on a dense support the estimator reads the
      sampled tokens' log-probs from the logits with them (later states' effect, the metrics). On
      the sampled support the scores are already those of the tokens: None is fine there.
    - ``logp_sampling_B_T``: the log-probs the sampler recorded for the tokens (the distribution
      actually sampled from), which ``rollout_correction`` compares with; None without it.
    """

    student_scores: Tensor | DenseScores
    teacher_scores: Tensor | DenseScores
    mask_B_T: Tensor
    tokens_B_T: Tensor | None = None
    logp_sampling_B_T: Tensor | None = None


@dataclass(frozen=True)
class LossTerms:
    """An estimator's loss (a scalar with grad) and, detached for the metrics, the student's
    log-probs of the sampled tokens, log u and the advantages, each [B, T]."""

    loss: Tensor
    logp_student_B_T: Tensor
    log_u_B_T: Tensor
    advantages_B_T: Tensor


@dataclass(frozen=True)
class BatchTotals:
    """The whole batch's normalisers, over every rank and micro-batch, fixed before any backward:
    ``sequences`` (B), response ``tokens``, and for the batch baseline and whitening the mean and
    standard deviation (n - 1) of the advantages on response tokens (None without either). Scalars."""

    sequences: Tensor
    tokens: Tensor
    advantage_mean: Tensor | None = None
    advantage_std: Tensor | None = None


def batch_totals(mask_B_T: Tensor, advantages_B_T: Tensor | None = None, reduce: Reduce = local) -> BatchTotals:
    """The normalisers of a batch whose (local, whole) response mask is ``mask_B_T``, summed over
    ranks by ``reduce``; given ``advantages_B_T`` (for the batch baseline or whitening) also their
    mean and standard deviation on the response tokens."""
    mask_B_T = mask_B_T.bool()
    sequences = reduce(torch.tensor(float(mask_B_T.shape[0]), dtype=torch.float64))
    tokens = reduce(mask_B_T.sum().to(torch.float64))
    if advantages_B_T is None:
        return BatchTotals(sequences, tokens)
    values = advantages_B_T[mask_B_T]
    count = reduce(values.new_tensor(float(values.numel())))
    mean = reduce(values.sum()) / count
    variance = reduce((values - mean).square().sum()) / (count - 1) if count > 1 else values.new_zeros(())
    return BatchTotals(sequences, tokens, mean, variance.sqrt())


class Estimator(ABC):
    """A gradient estimator bound to its ``EstimatorConfig``: the advantage of a category's own
    term (``own_advantage``) on the config's ``support``.

    On ``support=sampled`` it is the policy-gradient surrogate of the sampled tokens; on a dense
    support (``topk``, ``full``) each state's own term is its expectation over the support's
    categories, computed exactly (``dense_state_terms``), and later states enter through their
    exact per-state divergences (docs/opd-math.md, "Dense supports")."""

    name: ClassVar[str]
    description: ClassVar[str]

    def __init__(self, config: EstimatorConfig, chunk_size: int = RuntimeConfig.dense_chunk) -> None:
        self.config = config
        self.chunk_size = chunk_size  # states per chunk of a dense support's logits (``dense_state_terms``)

    @property
    def teacher_support(self) -> str:
        """What the teacher must give: ``sampled`` (the sampled tokens' log-probs), ``topk`` (its
        top-k at each position) or ``full`` (its logits: the full support, and the state baseline)."""
        return "full" if self.config.state_baseline else self.config.support

    @property
    def needs_dense(self) -> bool:
        """Whether the loss reads next-token distributions (``DenseScores``) of both models rather
        than the sampled tokens' log-probs: on a dense support, or for the state baseline."""
        return self.teacher_support != "sampled"

    def check(self, plain_sampling: bool) -> None:
        """Raise ValueError if the config's switches (or warped sampling) do not apply to this
        estimator on its support."""
        c = self.config
        if c.rollout_correction == "per_decision" and (c.batch_baseline or c.whiten or c.state_baseline):
            raise ValueError(
                "estimator.rollout_correction=per_decision weighs each reward by its prefix's importance ratio: "
                "a baseline subtracted after it (batch_baseline, whiten, state_baseline) is no longer unbiased; "
                "leave them off"
            )
        if not self.needs_dense:
            return
        dense = c.support != "sampled"
        setting = f"estimator.support={c.support}" if dense else "estimator.state_baseline"
        if not plain_sampling:
            raise ValueError(
                f"{setting} needs the student's own distribution: sampling.temperature=1, top_k=0, top_p=1"
            )
        if c.state_baseline and (dense or c.batch_baseline or c.whiten):
            raise ValueError(
                "estimator.state_baseline centres the sampled token's own advantage: it goes with "
                "estimator.support=sampled, without batch_baseline or whiten"
            )
        if dense and (c.log_ratio_clip, c.batch_baseline, c.whiten, c.rollout_correction) != (None, False, False, None):
            raise ValueError(
                f"estimator.support={c.support} takes each state's divergence exactly: estimator.log_ratio_clip, "
                "batch_baseline, whiten and rollout_correction do not apply to it (leave them at null / false / false "
                "/ null)"
            )

    @staticmethod
    @abstractmethod
    def own_advantage(divergence: Divergence, log_u: Tensor) -> Tensor:
        """The advantage of a token's own term, before the discounted future rewards."""

    @staticmethod
    @abstractmethod
    def is_exact(divergence: str, gamma: float) -> bool:
        """Whether E[grad L] equals the true gradient for this divergence and discount on any
        support (``opdx verify``)."""

    @property
    def needs_advantage_totals(self) -> bool:
        """Whether the normalisers include the batch's advantage statistics (batch baseline,
        whitening): then they need every row's advantages, hence the student's log-probs, first."""
        return self.config.batch_baseline or self.config.whiten

    def loss(self, inputs: LossInputs, divergence: Divergence, totals: BatchTotals | None = None) -> LossTerms:
        """The loss of ``inputs`` for ``divergence``, normalised by the whole batch's ``totals``
        (``batch_totals``; None: the inputs' own), and for the metrics the student's log-probs of
        the sampled tokens, log u_B_T and the advantages A_B_T (after baseline / whitening; on a
        dense support those the sampled token would have had, with the dense future rewards)."""
        if self.config.support != "sampled":
            return self._dense_loss(inputs, divergence, totals)
        mask_B_T = inputs.mask_B_T
        logp_student_B_T, advantages_B_T, log_u_B_T = self._sampled_advantages(inputs, divergence)
        totals = totals or batch_totals(mask_B_T, advantages_B_T if self.needs_advantage_totals else None)
        advantages_B_T = normalise_advantages(advantages_B_T, mask_B_T, self.config, totals)
        loss = policy_gradient_loss(
            logp_student_B_T, advantages_B_T, mask_B_T, self.config, totals, inputs.logp_sampling_B_T
        )
        return LossTerms(loss, logp_student_B_T.detach(), log_u_B_T, advantages_B_T)

    def advantages(self, inputs: LossInputs, divergence: Divergence) -> Tensor:
        """The advantages A_B_T before baseline and whitening (what ``batch_totals`` needs of them)."""
        return self._sampled_advantages(inputs, divergence)[1]

    def _sampled_advantages(self, inputs: LossInputs, divergence: Divergence) -> tuple[Tensor, Tensor, Tensor]:
        """The sampled tokens' log p [B, T] (with grad), their advantages A_B_T (``token_advantages``;
        with ``state_baseline``, less b(s) = sum_y p(y|s) a(u_y), from the full distributions the
        inputs then hold) and log u_B_T."""
        if not self.config.state_baseline:
            logp_student_B_T, logp_teacher_B_T, baseline_B_T = inputs.student_scores, inputs.teacher_scores, 0.0
        else:
            terms, mask_B_T = self._state_terms(inputs, divergence)
            # as the sampled scores are: on the CPU, the student's with grad
            logp_student_B_T, logp_teacher_B_T, baseline_B_T = (
                on_rows(values_S, mask_B_T).cpu()
                for values_S in (terms.logp_token_S, terms.logq_token_S, terms.mean_advantage_S)
            )
        advantages_B_T, log_u_B_T = token_advantages(
            logp_student_B_T, logp_teacher_B_T, inputs.mask_B_T, divergence, self, inputs.logp_sampling_B_T
        )
        advantages_B_T = torch.where(inputs.mask_B_T.bool(), advantages_B_T - baseline_B_T, 0.0)
        return logp_student_B_T, advantages_B_T, log_u_B_T

    def _state_terms(self, inputs: LossInputs, divergence: Divergence) -> tuple[StateTerms, Tensor]:
        """``dense_state_terms`` at the states of the response mask, and the mask (bool, on the
        student's device)."""
        student, teacher = inputs.student_scores, inputs.teacher_scores
        if inputs.tokens_B_T is None or isinstance(student, Tensor) or isinstance(teacher, Tensor):
            raise ValueError(
                f"estimator.support={self.config.support} (state_baseline={self.config.state_baseline}) reads both "
                "models' next-token distributions (DenseScores) and the sampled tokens (LossInputs.tokens_B_T)"
            )
        mask_B_T = inputs.mask_B_T.bool()
        terms = dense_state_terms(
            student.at(mask_B_T), teacher.at(mask_B_T), inputs.tokens_B_T[mask_B_T], divergence, self, self.chunk_size
        )
        return terms, mask_B_T.to(terms.surrogate_S.device)

    def _dense_loss(self, inputs: LossInputs, divergence: Divergence, totals: BatchTotals | None) -> LossTerms:
        """L = (1/B) sum_b sum_n mask_bn [ S_bn - sg(F_bn) log p(y_bn | s_bn) ]: S the state's own
        surrogate (``dense_state_terms``: its value D^S(s), its gradient -sum_e a(u_e) grad p_e)
        and F_bn = sum_{m>n} gamma^(m-n) (-D^S(s_bm)) the later states' exact divergences."""
        terms, mask_B_T = self._state_terms(inputs, divergence)
        gamma = self.config.gamma
        logp_student_B_T = on_rows(terms.logp_token_S if gamma > 0 else terms.logp_token_S.detach(), mask_B_T)
        log_u_B_T = on_rows(terms.logq_token_S - terms.logp_token_S.detach(), mask_B_T)
        future_B_T = discounted_future_sum(on_rows(-terms.divergence_S, mask_B_T), gamma)
        totals = totals or batch_totals(mask_B_T)
        per_token_B_T = on_rows(terms.surrogate_S, mask_B_T) - future_B_T * logp_student_B_T
        loss = per_token_B_T.sum() / normaliser(totals, self.config.token_mean, per_token_B_T.dtype)
        advantages_B_T = torch.where(mask_B_T, self.own_advantage(divergence, log_u_B_T) + future_B_T, 0.0)
        return LossTerms(loss, logp_student_B_T.detach().cpu(), log_u_B_T.cpu(), advantages_B_T.cpu())


class StopGradient(Estimator):
    name = "stopgrad"
    description = "OPD: advantage -f(u) under stop-gradient (biased unless reverse_kl)"

    @staticmethod
    def own_advantage(divergence: Divergence, log_u: Tensor) -> Tensor:
        return divergence.opd_advantage(log_u)

    @staticmethod
    def is_exact(divergence: str, gamma: float) -> bool:
        return divergence == "reverse_kl"  # the only f whose u f'(u) is a constant (docs/opd-math.md)


class Unbiased(Estimator):
    name = "unbiased"
    description = "OPD+: advantage w_f(u) = -f(u) + u f'(u) (unbiased for every f)"

    @staticmethod
    def own_advantage(divergence: Divergence, log_u: Tensor) -> Tensor:
        return divergence.unbiased_advantage(log_u)

    @staticmethod
    def is_exact(divergence: str, gamma: float) -> bool:
        return True


ESTIMATORS: dict[str, type[Estimator]] = {cls.name: cls for cls in (StopGradient, Unbiased)}


def on_support(logp_S_V: Tensor, teacher: Tensor | TopK) -> tuple[Tensor, Tensor]:
    """log p and log q over the categories of a dense support at each state, [S, E] each, from the
    student's next-token log-probs [S, V] and the teacher's: its log-probs [S, V] (``full``: every
    token, E = V) or its ``TopK`` (``topk``: the teacher's k most likely tokens and one tail category
    holding the rest of each model's mass, E = k + 1; the student's tail a log-sum-exp over the
    other tokens, never 1 minus a sum). Differentiable with respect to the student's log-probs."""
    if not isinstance(teacher, TopK):
        return logp_S_V, teacher
    tail_S = torch.logsumexp(logp_S_V.scatter(-1, teacher.ids, -torch.inf), dim=-1)
    logp_S_E = torch.cat([logp_S_V.gather(-1, teacher.ids), tail_S.unsqueeze(-1)], dim=-1)
    return logp_S_E, torch.cat([teacher.logq, teacher.logq_tail.unsqueeze(-1)], dim=-1).to(logp_S_E.dtype)


@dataclass(frozen=True)
class StateTerms:
    """What a dense support gives at each state (``dense_state_terms``), [S] each: the own
    surrogate (with grad), D^S and the mean own advantage b (detached), and the sampled token's
    log p (with grad where the student's logits have it) and log q."""

    surrogate_S: Tensor
    divergence_S: Tensor
    mean_advantage_S: Tensor
    logp_token_S: Tensor
    logq_token_S: Tensor


def dense_state_terms(
    student: DenseScores,
    teacher: DenseScores,
    tokens_S: Tensor,
    divergence: Divergence,
    estimator: Estimator,
    chunk_size: int = RuntimeConfig.dense_chunk,
) -> StateTerms:
    """At each of S states (the student's logits, ``HeadLogits`` over [S]; the teacher's logits
    for the full support or its ``TopK`` for ``topk``; the sampled token ``tokens_S``), with p_e,
    q_e the categories' probabilities (``on_support``), u_e = q_e / p_e and a = ``estimator.own_advantage``:

        D^S = sum_e p_e f(u_e),   S = sg(D^S) - sum_e sg(a(u_e)) (p_e - sg(p_e)),   b = sum_e p_e a(u_e)

    so S's value is D^S and its gradient -sum_e a(u_e) grad p_e, the sampled token's
    -a(u) grad log p in expectation over the categories (for ``unbiased`` the exact grad D^S,
    equation (1) on the categories). Categories whose student probability underflows to 0 are
    left out (as ``Divergence.full``).

    States go ``chunk_size`` at a time, both models' logits made for the chunk alone from their
    hidden states (``DenseScores.chunk``) and let go once the chunk's [C] terms are taken. With
    grad, the student's logits come out of a non-reentrant ``torch.utils.checkpoint`` of its head
    (which keeps nothing but the hidden states it reads) into ``_ChunkTerms``, which keeps nothing
    of size V either and writes their gradient out in backward; so the loss's extra memory,
    forward and backward, is a few float32 [chunk_size, V] tensors whatever S is
    (``scripts/bench_loss.py``)."""
    tokens_S = tokens_S.reshape(-1)
    parts = []
    for start in range(0, len(tokens_S), chunk_size):
        chunk = (student, teacher, tokens_S, divergence, estimator, start, start + chunk_size)
        if torch.is_grad_enabled():
            logits_C_V = torch.utils.checkpoint.checkpoint(
                student.chunk, start, start + chunk_size, use_reentrant=False
            )
            parts.append(_ChunkTerms.apply(logits_C_V, *chunk))
        else:
            parts.append(_ChunkTerms.forward(None, student.chunk(start, start + chunk_size), *chunk))
    return StateTerms(*(torch.cat(column) for column in zip(*parts, strict=True)))


class _ChunkTerms(torch.autograd.Function):
    """The five [C] terms of ``dense_state_terms`` for states ``start`` to ``end`` from the
    student's logits z [C, V] there: the own surrogate S, D^S, b, the sampled token's log p and
    log q. Nothing is kept for backward but the arguments; there the logits are made again
    (``student.chunk``, without grad) and the gradient with respect to z written out rather than
    taped: with p_k = softmax(z)_k and a_k the own advantage of token k's category (one of the
    teacher's top-k: its own; any other token: the tail's),

        dS/dz_k = -p_k (a_k - b),     d log p_y / dz_k = [k = y] - p_k,

    since sum_e a_e dp_e/dz_k = p_k (a_k - sum_e p_e a_e) for categories that partition the
    vocabulary. ``ctx`` None: the forward alone, without autograd."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx | None,
        logits_C_V: Tensor,
        student: DenseScores,
        teacher: DenseScores,
        tokens_S: Tensor,
        divergence: Divergence,
        estimator: Estimator,
        start: int,
        end: int,
    ) -> tuple[Tensor, ...]:
        args = (teacher, tokens_S, divergence, estimator, start, end)
        with torch.no_grad():
            _, terms = _category_terms(logits_C_V, *args)
            surrogate_C = terms.divergence_C.clone()  # its value is D^S; its gradient comes in backward
        if ctx is not None:
            ctx.args, ctx.student, ctx.dtype = args, student, logits_C_V.dtype
            ctx.mark_non_differentiable(terms.divergence_C, terms.mean_advantage_C, terms.logq_token_C)
        return surrogate_C, terms.divergence_C, terms.mean_advantage_C, terms.logp_token_C, terms.logq_token_C

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        grad_surrogate_C, _, _, grad_logp_token_C, _ = grads
        _, tokens_S, _, _, start, end = ctx.args
        with torch.no_grad():
            logp_C_V, terms = _category_terms(ctx.student.chunk(start, end), *ctx.args, backward=True)
            p_C_V = logp_C_V.exp_()
            grad_C_V = torch.zeros_like(p_C_V)
            if grad_surrogate_C is not None:
                advantage_C_V = terms.token_advantage_C_V.sub_(terms.mean_advantage_C.unsqueeze(-1))
                grad_C_V.addcmul_(advantage_C_V.mul_(p_C_V), -grad_surrogate_C.unsqueeze(-1))
                del advantage_C_V
            del terms
            if grad_logp_token_C is not None:
                tokens_C = tokens_S[start:end].to(grad_C_V.device).unsqueeze(-1)
                grad_C_V.addcmul_(p_C_V, -grad_logp_token_C.unsqueeze(-1))
                grad_C_V.scatter_add_(-1, tokens_C, grad_logp_token_C.unsqueeze(-1).to(grad_C_V))
        return grad_C_V.to(ctx.dtype), *(None,) * 8


@dataclass(frozen=True)
class _CategoryTerms:
    """A chunk's D^S, b, the sampled token's log p and log q, [C] each, and for the backward each
    token's own advantage [C, V] (its category's a_k)."""

    divergence_C: Tensor
    mean_advantage_C: Tensor
    logp_token_C: Tensor
    logq_token_C: Tensor
    token_advantage_C_V: Tensor | None


def _category_terms(
    logits_C_V: Tensor,
    teacher: DenseScores,
    tokens_S: Tensor,
    divergence: Divergence,
    estimator: Estimator,
    start: int,
    end: int,
    backward: bool = False,
) -> tuple[Tensor, _CategoryTerms]:
    """The student's log-probs [C, V] (float32 at least) and the ``_CategoryTerms`` of states
    ``start`` to ``end`` from the student's logits there, without grad: for the forward D^S (each
    token's own advantage left out, None), for the ``backward`` each token's own advantage (D^S
    left out, 0). Each [C, V] intermediate is let go as soon as it is used."""
    logp_C_V = torch.log_softmax(logits_C_V.detach().to(torch.promote_types(logits_C_V.dtype, torch.float32)), -1)
    del logits_C_V
    tokens_C = tokens_S[start:end].to(logp_C_V.device).unsqueeze(-1)
    teacher_C = teacher.chunk(start, end)
    if isinstance(teacher_C, TopK):
        logq_token_C, ids_C_J = teacher_C.logq_token.to(logp_C_V), teacher_C.ids
    else:
        teacher_C, ids_C_J = torch.log_softmax(teacher_C.to(logp_C_V), -1), None
        logq_token_C = teacher_C.gather(-1, tokens_C).squeeze(-1)
    logp_C_E, logq_C_E = on_support(logp_C_V, teacher_C)
    del teacher_C
    p_C_E = logp_C_E.exp()
    dropped_C_E = p_C_E == 0
    log_u_C_E = logq_C_E.sub(logp_C_E).masked_fill_(dropped_C_E, 0.0)
    del logq_C_E, logp_C_E
    divergence_C = (
        p_C_E.new_zeros(()) if backward else divergence.f(log_u_C_E).mul_(p_C_E).masked_fill_(dropped_C_E, 0.0).sum(-1)
    )
    advantage_C_E = estimator.own_advantage(divergence, log_u_C_E).masked_fill_(dropped_C_E, 0.0)
    del log_u_C_E, dropped_C_E
    mean_advantage_C = (p_C_E * advantage_C_E).sum(-1)
    del p_C_E
    token_advantage_C_V = advantage_C_E if backward else None
    if backward and ids_C_J is not None:  # a token's own advantage: the tail's unless it is one of the k
        token_advantage_C_V = advantage_C_E[:, -1:].expand_as(logp_C_V).clone()
        token_advantage_C_V.scatter_(-1, ids_C_J, advantage_C_E[:, :-1])
    logp_token_C = logp_C_V.gather(-1, tokens_C).squeeze(-1)
    return logp_C_V, _CategoryTerms(divergence_C, mean_advantage_C, logp_token_C, logq_token_C, token_advantage_C_V)


def on_rows(values_S: Tensor, mask_B_T: Tensor) -> Tensor:
    """[B, T] with ``values_S`` at the mask's positions (row-major, as ``x_B_T[mask_B_T]`` takes
    them) and 0 elsewhere; differentiable with respect to the values."""
    return values_S.new_zeros(mask_B_T.shape).index_put((mask_B_T,), values_S)


def build_estimator(
    config: EstimatorConfig, plain_sampling: bool = True, chunk_size: int = RuntimeConfig.dense_chunk
) -> Estimator:
    """The estimator ``config.name`` with its switches checked, its dense supports' logits made
    ``chunk_size`` states at a time; ValueError names a bad name and the valid ones, or the switch
    that does not apply."""
    if config.name not in ESTIMATORS:
        raise ValueError(f"estimator={config.name!r} is unknown; valid: {', '.join(ESTIMATORS)}")
    estimator = ESTIMATORS[config.name](config, chunk_size)
    estimator.check(plain_sampling)
    return estimator


def other_estimator(estimator: Estimator, plain_sampling: bool = True) -> Estimator:
    """The estimator ``trainer.probe_every`` sets beside ``estimator``: stop-gradient OPD beside
    OPD+ and OPD+ beside OPD, with the same support, switches and chunk size (``check`` asks the
    same of both, so it holds for the other one too)."""
    name = "stopgrad" if estimator.name == "unbiased" else "unbiased"
    return build_estimator(replace(estimator.config, name=name), plain_sampling, estimator.chunk_size)


def reference_estimator(estimator: Estimator, plain_sampling: bool = True) -> Estimator | None:
    """The reference ``trainer.probe_every`` sets beside ``estimator`` where the teacher gives its
    logits: OPD+ on the full support with the same ``gamma``, ``token_mean`` and chunk size, its
    other switches off. Each visited state's divergence is differentiated exactly over the whole
    vocabulary, so at gamma 0 its gradient is the expectation, over each state's next token, of
    the sampled-token OPD+ gradient at the same states (docs/opd-math.md, "What the probe
    measures"). None with warped sampling (a dense support needs the student's own distribution)
    or when ``estimator`` is that reference already."""
    if not plain_sampling or (estimator.name == "unbiased" and estimator.config.support == "full"):
        return None
    exact = replace(
        estimator.config, name="unbiased", support="full", log_ratio_clip=None, batch_baseline=False, whiten=False,
        rollout_correction=None, state_baseline=False,
    )  # fmt: skip
    return build_estimator(exact, plain_sampling, estimator.chunk_size)


def discounted_future_sum(rewards_B_T: Tensor, gamma: float) -> Tensor:
    """sum_{m>n} gamma^(m-n) r_m for every n, i.e. gamma * G_{n+1} with G_n = r_n + gamma G_{n+1}."""
    future_B_T = torch.zeros_like(rewards_B_T)
    if gamma == 0:
        return future_B_T
    running_B = torch.zeros_like(rewards_B_T[:, 0])
    for n in range(rewards_B_T.shape[1] - 1, 0, -1):
        running_B = rewards_B_T[:, n] + gamma * running_B
        future_B_T[:, n - 1] = gamma * running_B
    return future_B_T


def token_advantages(
    logp_student_B_T: Tensor,
    logp_teacher_B_T: Tensor,
    mask_B_T: Tensor,
    divergence: Divergence,
    estimator: Estimator,
    logp_sampling_B_T: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Advantages A_B_T (detached, 0 off the mask) of ``estimator`` (its own term, its config's
    ``gamma`` and ``log_ratio_clip``) and the per-token log u_B_T they come from.

    ``logp_student_B_T`` are the trainer's log-probs of the tokens, u = q / p with them. With
    ``rollout_correction=per_decision``, ``logp_sampling_B_T`` are those of the policy that sampled
    them (mu), and each reward is weighed by the product of the ratios up to its own token
    (``per_decision_weights``): A_n = rho_1:n a(u_n) + sum_{m>n} gamma^(m-n) rho_1:m (-f(u_m)).
    """
    config = estimator.config
    mask_B_T = mask_B_T.bool()
    log_u_B_T = torch.where(mask_B_T, logp_teacher_B_T.detach() - logp_student_B_T.detach(), 0.0)
    if config.log_ratio_clip is not None:
        log_u_B_T = log_u_B_T.clamp(-config.log_ratio_clip, config.log_ratio_clip)
    own_B_T = estimator.own_advantage(divergence, log_u_B_T)
    rewards_B_T = torch.where(mask_B_T, divergence.opd_advantage(log_u_B_T), 0.0)
    if config.rollout_correction == "per_decision":
        if logp_sampling_B_T is None:
            raise ValueError("rollout_correction='per_decision' needs the sampler's log-probs of the tokens")
        rho_B_T = per_decision_weights(logp_student_B_T, logp_sampling_B_T, mask_B_T, config.per_decision_cap)
        own_B_T, rewards_B_T = rho_B_T * own_B_T, rho_B_T * rewards_B_T
    advantages_B_T = own_B_T + discounted_future_sum(rewards_B_T, config.gamma)
    return torch.where(mask_B_T, advantages_B_T, 0.0), log_u_B_T


def per_decision_weights(
    logp_student_B_T: Tensor, logp_sampling_B_T: Tensor, mask_B_T: Tensor, cap: float | None = None
) -> Tensor:
    """rho_1:n = prod_{k<=n} p(y_k | s_k) / mu(y_k | s_k) over the response tokens up to n, [B, T]
    (detached; 1 where p = mu), at most ``cap`` (None: not truncated).

    The reward of token n depends on y_1..y_n alone, so E_{y~mu}[rho_1:n g(y_1:n)] =
    E_{y~p}[g(y_1:n)] for any g of them: weighing each term of the on-policy gradient by the
    ratio of its own prefix makes the samples of mu count as samples of p (per-decision importance
    sampling: Precup, Sutton & Singh 2000). The current token's ratio alone (``tis``) leaves
    the states distributed as under mu. docs/opd-math.md, "Samples from another policy".
    """
    log_ratio_B_T = torch.where(mask_B_T.bool(), logp_student_B_T.detach() - logp_sampling_B_T.detach(), 0.0)
    rho_B_T = log_ratio_B_T.cumsum(-1).exp()
    return rho_B_T if cap is None else rho_B_T.clamp(max=cap)


def normalise_advantages(
    advantages_B_T: Tensor, mask_B_T: Tensor, config: EstimatorConfig, totals: BatchTotals
) -> Tensor:
    """Apply the optional batch baseline and whitening with the whole batch's statistics."""
    mask_B_T = mask_B_T.bool()
    if not (config.batch_baseline or config.whiten):
        return advantages_B_T
    centred_B_T = advantages_B_T - totals.advantage_mean
    if config.whiten:
        centred_B_T = centred_B_T / (totals.advantage_std + 1e-8)
    return torch.where(mask_B_T, centred_B_T, 0.0)


def policy_gradient_loss(
    logp_student_B_T: Tensor,
    advantages_B_T: Tensor,
    mask_B_T: Tensor,
    config: EstimatorConfig,
    totals: BatchTotals,
    logp_rollout_B_T: Tensor | None = None,
) -> Tensor:
    """L = -(1/B) sum mask * stopgrad(A) * log p, divided by the number of response tokens
    instead of B with ``config.token_mean``; B and the token count are the whole batch's
    (``totals``), the sum this micro-batch's share of it.

    With ``config.rollout_correction`` and the sampler's log-probs, each token is weighed by the
    importance ratio r = p / p_rollout of the trainer's and the sampler's distributions: ``tis``
    uses stopgrad(min(r, tis_cap)) * A * log p (truncated importance sampling), ``ppo`` the clipped
    surrogate min(r A, clip(r, 1 - ppo_clip, 1 + ppo_clip) A). Both have the plain gradient when r = 1.
    ``per_decision`` weighs the advantages themselves (``token_advantages``): the loss is the plain one.
    """
    mask_B_T = mask_B_T.bool()
    advantages_B_T = advantages_B_T.detach()
    logp_B_T = torch.where(mask_B_T, logp_student_B_T, 0.0)
    correction = config.rollout_correction
    if correction in (None, "per_decision"):
        objective_B_T = advantages_B_T * logp_B_T
    else:
        if logp_rollout_B_T is None:
            raise ValueError(f"rollout_correction={correction!r} needs the sampler's log-probs of the tokens")
        ratio_B_T = torch.exp(logp_B_T - torch.where(mask_B_T, logp_rollout_B_T.detach(), 0.0))
        if correction == "tis":
            objective_B_T = ratio_B_T.detach().clamp(max=config.tis_cap) * advantages_B_T * logp_B_T
        else:
            clipped_B_T = ratio_B_T.clamp(1 - config.ppo_clip, 1 + config.ppo_clip)
            objective_B_T = torch.minimum(ratio_B_T * advantages_B_T, clipped_B_T * advantages_B_T)
    objective_B_T = torch.where(mask_B_T, objective_B_T, 0.0)
    return -objective_B_T.sum() / normaliser(totals, config.token_mean, objective_B_T.dtype)


def normaliser(totals: BatchTotals, token_mean: bool, dtype: torch.dtype) -> Tensor:
    """The loss's divisor: the whole batch's response tokens with ``token_mean``, else B; at least 1."""
    return (totals.tokens if token_mean else totals.sequences).to(dtype).clamp(min=1)


def opd_loss(
    student_logprobs: Tensor,
    teacher_logprobs: Tensor,
    mask: Tensor,
    divergence: str | Divergence = "reverse_kl",
    estimator: str = "unbiased",
    gamma: float = 0.0,
    *,
    log_ratio_clip: float | None = None,
    token_mean: bool = False,
    batch_baseline: bool = False,
    whiten: bool = False,
    rollout_logprobs: Tensor | None = None,
    rollout_correction: str | None = None,
    tis_cap: float = 2.0,
    ppo_clip: float = 0.2,
    per_decision_cap: float | None = None,
) -> Tensor:
    """The OPD / OPD+ surrogate loss of the sampled tokens; a scalar.

    ``student_logprobs`` [B, T] (with grad): log p_theta of the sampled tokens;
    ``teacher_logprobs`` [B, T]: log q of the same tokens (constant); ``mask`` [B, T]: response
    tokens (off-mask entries may hold anything, -inf included, and affect nothing).
    ``estimator`` is "stopgrad" (OPD, -f(u)) or "unbiased" (OPD+, w_f(u)); the keyword switches
    are those of ``EstimatorConfig``, and ``rollout_logprobs`` [B, T] the sampler's log-probs that
    ``rollout_correction`` compares with. Raises ValueError naming a bad value.
    """
    cls = ESTIMATORS.get(estimator)
    if cls is None:
        raise ValueError(f"unknown estimator {estimator!r}; valid estimators: {', '.join(ESTIMATORS)}")
    config = EstimatorConfig(
        name=cls.name,
        gamma=gamma,
        log_ratio_clip=log_ratio_clip,
        token_mean=token_mean,
        batch_baseline=batch_baseline,
        whiten=whiten,
        rollout_correction=rollout_correction,
        tis_cap=tis_cap,
        ppo_clip=ppo_clip,
        per_decision_cap=per_decision_cap,
    )
    div = divergence if isinstance(divergence, Divergence) else get_divergence(divergence)
    inputs = LossInputs(student_logprobs, teacher_logprobs, mask, logp_sampling_B_T=rollout_logprobs)
    checked_estimator = cls(config)
    checked_estimator.check(plain_sampling=True)
    return checked_estimator.loss(inputs, div).loss
