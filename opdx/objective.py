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

Each estimator says what it needs from the teacher (``needs_teacher_logits``: the sampled
tokens' log-probs, or full [B, T, V] logits), checks the switches of its ``EstimatorConfig`` and
computes its loss from one ``LossInputs``; ``build_estimator`` is the one constructor, and the
estimator object (never its name) is what the loss layer passes around. The conventions and
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
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from opdx.config import EstimatorConfig
from opdx.divergences import Divergence, get_divergence

Reduce = Callable[[Tensor], Tensor]


def local(x: Tensor) -> Tensor:
    """The sum over ranks of a one-process run: ``x`` itself."""
    return x


@dataclass(frozen=True)
class LossInputs:
    """What an estimator's loss reads: one batch of B sequences with T response positions (V the
    vocabulary), the student's scores with grad and everything else constant.

    - ``student_scores``: log p_theta of the sampled tokens [B, T], or next-token logits
      [B, T, V] when the estimator ``needs_teacher_logits``; with grad.
    - ``teacher_scores``: log q of the same tokens [B, T], or logits [B, T, V], likewise.
    - ``mask_B_T``: the response tokens (bool); off the mask any value, -inf included, is ignored.
    - ``tokens_B_T``: the sampled token ids (int64); on a dense support the estimator reads the
      sampled tokens' log-probs from the logits with them (later states' effect, the metrics). On
      the sampled support the scores are already those of the tokens: None is fine there.
    - ``logp_sampling_B_T``: the log-probs the sampler recorded for the tokens (the distribution
      actually sampled from), which ``rollout_correction`` compares with; None without it.
    """

    student_scores: Tensor
    teacher_scores: Tensor
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

    def __init__(self, config: EstimatorConfig) -> None:
        self.config = config

    @property
    def needs_teacher_logits(self) -> bool:
        """Whether the teacher's (and the student's) full next-token logits [B, T, V] are needed,
        rather than the sampled tokens' log-probs: on a dense support, or for the state baseline."""
        return self.config.support != "sampled" or self.config.state_baseline

    def check(self, plain_sampling: bool) -> None:
        """Raise ValueError if the config's switches (or warped sampling) do not apply to this
        estimator on its support."""
        c = self.config
        if not self.needs_teacher_logits:
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
        with ``state_baseline``, less b(s) = sum_y p(y|s) a(u_y), from the logits the inputs then
        hold) and log u_B_T."""
        if not self.config.state_baseline:
            logp_student_B_T, logp_teacher_B_T, baseline_B_T = inputs.student_scores, inputs.teacher_scores, 0.0
        else:
            logits_student_B_T_V, logits_teacher_B_T_V = inputs.student_scores, inputs.teacher_scores.detach()
            if inputs.tokens_B_T is None:
                raise ValueError("estimator.state_baseline needs the sampled tokens (LossInputs.tokens_B_T)")
            mask_B_T = inputs.mask_B_T.to(logits_student_B_T_V.device).bool()
            tokens_S = inputs.tokens_B_T.to(mask_B_T.device)[mask_B_T]
            terms = dense_state_terms(
                logits_student_B_T_V[mask_B_T], logits_teacher_B_T_V[mask_B_T], tokens_S, divergence, self
            )
            # as the sampled scores are: on the CPU, the student's with grad
            logp_student_B_T, logp_teacher_B_T, baseline_B_T = (
                on_rows(values_S, mask_B_T).cpu()
                for values_S in (terms.logp_token_S, terms.logq_token_S, terms.mean_advantage_S)
            )
        advantages_B_T, log_u_B_T = token_advantages(
            logp_student_B_T, logp_teacher_B_T, inputs.mask_B_T, divergence, self
        )
        advantages_B_T = torch.where(inputs.mask_B_T.bool(), advantages_B_T - baseline_B_T, 0.0)
        return logp_student_B_T, advantages_B_T, log_u_B_T

    def _dense_loss(self, inputs: LossInputs, divergence: Divergence, totals: BatchTotals | None) -> LossTerms:
        """L = (1/B) sum_b sum_n mask_bn [ S_bn - sg(F_bn) log p(y_bn | s_bn) ]: S the state's own
        surrogate (``dense_state_terms``: its value D^S(s), its gradient -sum_e a(u_e) grad p_e)
        and F_bn = sum_{m>n} gamma^(m-n) (-D^S(s_bm)) the later states' exact divergences."""
        logits_student_B_T_V, logits_teacher_B_T_V = inputs.student_scores, inputs.teacher_scores.detach()
        if inputs.tokens_B_T is None:
            raise ValueError(
                f"estimator.support={self.config.support} needs the sampled tokens (LossInputs.tokens_B_T)"
            )
        device = logits_student_B_T_V.device
        tokens_B_T, mask_B_T = inputs.tokens_B_T.to(device), inputs.mask_B_T.to(device).bool()
        gamma = self.config.gamma
        terms = dense_state_terms(
            logits_student_B_T_V[mask_B_T], logits_teacher_B_T_V[mask_B_T], tokens_B_T[mask_B_T], divergence, self,
            self.config.support, self.config.top_k,
        )  # fmt: skip
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


def on_support(logp_S_V: Tensor, logq_S_V: Tensor, support: str, top_k: int) -> tuple[Tensor, Tensor]:
    """log p and log q over the categories of ``support`` at each state, [S, E] each, from the
    models' next-token log-probs [S, V] (any leading shape for S): ``full``: every token (E = V);
    ``topk``: the teacher's ``top_k`` most likely tokens and one tail category holding the rest of
    each model's mass (E = K + 1; the tail's log-prob a log-sum-exp over the other tokens, never 1
    minus a sum). Differentiable with respect to the student's log-probs."""
    if support == "full":
        return logp_S_V, logq_S_V
    if support != "topk":
        raise ValueError(f"support={support!r} has no categories here; dense supports: topk, full")
    ids_S_J = logq_S_V.topk(min(top_k, logq_S_V.shape[-1]), dim=-1).indices
    tail_S_V = torch.ones_like(logq_S_V, dtype=torch.bool).scatter(-1, ids_S_J, False)

    def categories(logr_S_V: Tensor) -> Tensor:
        tail_S = torch.logsumexp(logr_S_V.masked_fill(~tail_S_V, -torch.inf), dim=-1)
        return torch.cat([logr_S_V.gather(-1, ids_S_J), tail_S.unsqueeze(-1)], dim=-1)

    return categories(logp_S_V), categories(logq_S_V)


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
    logits_student_S_V: Tensor,
    logits_teacher_S_V: Tensor,
    tokens_S: Tensor,
    divergence: Divergence,
    estimator: Estimator,
    support: str = "full",
    top_k: int = 16,
    chunk_size: int = 1024,
) -> StateTerms:
    """At each state (rows S of next-token logits, the sampled token ``tokens_S``), with p_e, q_e
    the categories' probabilities (``on_support``), u_e = q_e / p_e and a = ``estimator.own_advantage``:

        D^S = sum_e p_e f(u_e),   S = sg(D^S) - sum_e sg(a(u_e)) (p_e - sg(p_e)),   b = sum_e p_e a(u_e)

    so S's value is D^S and its gradient -sum_e a(u_e) grad p_e, the sampled token's
    -a(u) grad log p in expectation over the categories (for ``unbiased`` the exact grad D^S,
    equation (1) on the categories). Categories whose student probability underflows to 0 are
    left out (as ``Divergence.full``). States go ``chunk_size`` at a time; with grad, autograd
    keeps each chunk's float32 log-probs for backward, so the whole [S, V] is held then."""
    vocab = logits_student_S_V.shape[-1]
    student_S_V, teacher_S_V = logits_student_S_V.reshape(-1, vocab), logits_teacher_S_V.reshape(-1, vocab).detach()
    tokens_S = tokens_S.reshape(-1, 1).to(student_S_V.device)
    dtype = torch.promote_types(student_S_V.dtype, torch.float32)
    parts: list[tuple[Tensor, ...]] = []
    for start in range(0, student_S_V.shape[0], chunk_size):
        chunk = slice(start, start + chunk_size)
        logp_S_V, logq_S_V = (torch.log_softmax(x_S_V[chunk].to(dtype), -1) for x_S_V in (student_S_V, teacher_S_V))
        logp_S_E, logq_S_E = on_support(logp_S_V, logq_S_V, support, top_k)
        p_S_E = logp_S_E.exp()
        kept_S_E = p_S_E.detach() > 0
        log_u_S_E = torch.where(kept_S_E, logq_S_E - logp_S_E.detach(), 0.0)
        divergence_S = torch.where(kept_S_E, p_S_E.detach() * divergence.f(log_u_S_E), 0.0).sum(-1)
        advantage_S_E = torch.where(kept_S_E, estimator.own_advantage(divergence, log_u_S_E), 0.0)
        surrogate_S = divergence_S - (advantage_S_E * (p_S_E - p_S_E.detach())).sum(-1)
        mean_advantage_S = (p_S_E.detach() * advantage_S_E).sum(-1)
        logp_token_S, logq_token_S = (x_S_V.gather(-1, tokens_S[chunk]).squeeze(-1) for x_S_V in (logp_S_V, logq_S_V))
        parts.append((surrogate_S, divergence_S, mean_advantage_S, logp_token_S, logq_token_S))
    return StateTerms(*(torch.cat(column) for column in zip(*parts, strict=True)))


def on_rows(values_S: Tensor, mask_B_T: Tensor) -> Tensor:
    """[B, T] with ``values_S`` at the mask's positions (row-major, as ``x_B_T[mask_B_T]`` takes
    them) and 0 elsewhere; differentiable with respect to the values."""
    return values_S.new_zeros(mask_B_T.shape).index_put((mask_B_T,), values_S)


def build_estimator(config: EstimatorConfig, plain_sampling: bool = True) -> Estimator:
    """The estimator ``config.name`` with its switches checked; ValueError names a bad name and the
    valid ones, or the switch that does not apply."""
    if config.name not in ESTIMATORS:
        raise ValueError(f"estimator={config.name!r} is unknown; valid: {', '.join(ESTIMATORS)}")
    estimator = ESTIMATORS[config.name](config)
    estimator.check(plain_sampling)
    return estimator


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
) -> tuple[Tensor, Tensor]:
    """Advantages A_B_T (detached, 0 off the mask) of ``estimator`` (its own term, its config's
    ``gamma`` and ``log_ratio_clip``) and the per-token log u_B_T they come from.

    ``logp_student_B_T`` are the log-probs of the distribution the tokens were sampled from.
    """
    config = estimator.config
    mask_B_T = mask_B_T.bool()
    log_u_B_T = torch.where(mask_B_T, logp_teacher_B_T.detach() - logp_student_B_T.detach(), 0.0)
    if config.log_ratio_clip is not None:
        log_u_B_T = log_u_B_T.clamp(-config.log_ratio_clip, config.log_ratio_clip)
    rewards_B_T = torch.where(mask_B_T, divergence.opd_advantage(log_u_B_T), 0.0)
    advantages_B_T = estimator.own_advantage(divergence, log_u_B_T) + discounted_future_sum(rewards_B_T, config.gamma)
    return torch.where(mask_B_T, advantages_B_T, 0.0), log_u_B_T


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
    """
    mask_B_T = mask_B_T.bool()
    advantages_B_T = advantages_B_T.detach()
    logp_B_T = torch.where(mask_B_T, logp_student_B_T, 0.0)
    correction = config.rollout_correction
    if correction is None:
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
    )
    div = divergence if isinstance(divergence, Divergence) else get_divergence(divergence)
    inputs = LossInputs(student_logprobs, teacher_logprobs, mask, logp_sampling_B_T=rollout_logprobs)
    return cls(config).loss(inputs, div).loss
