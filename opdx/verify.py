"""Exact check of the OPD estimators by enumerating every response.

    opdx verify                 # exact expectations: table + exit code
    opdx verify --samples 4096  # Monte-Carlo: error vs number of sampled responses
    opdx verify --loss mypackage.losses:opd_loss   # anyone's loss against the exact gradient

A tabular autoregressive student p_theta and teacher q over a vocabulary of V tokens and
responses of length T have V^T responses, so E_{y~p}[grad L(y)] is the finite sum
sum_y p(y) grad L(y) with p(y) held constant. It is compared with the true gradient:

- gamma = 1: grad J^S, J^S(theta) = sum_y p(y) sum_n D^S(s_n(y)), by autograd (on the sampled
  support, J^f = sum_y p(y) sum_n f(u_n(y)), which equals J^full);
- gamma = 0: the per-state gradient grad sum_y pbar(y) sum_n D^S(s_n(y)), with the state
  distribution pbar frozen, by autograd.

D^S is the state's divergence on the estimator's support: D_f(q || p) for ``sampled`` and
``full``, D_f on the teacher's top ``TOP_K`` tokens plus a tail category for ``topk``. A single
categorical state (T = 1) checks the per-state identity (1) of docs/opd-math.md directly. OPD+
must match to float64 round-off for every support, f and gamma; stop-gradient OPD only for
reverse_kl. Results go to stdout and to outputs/verify/ as markdown and CSV.

A second table samples from the student as it was one and two updates earlier and takes the
loss and the true gradient at the current one (``stale_table``): with
``rollout_correction=per_decision`` the estimators must match as above; the current token's ratio
alone (``tis``, uncapped) and no correction are shown beside, biased. A third scores the text of
each response with a teacher of another tokenizer, span by span (``cross_tokenizer_table``,
``opdx.spans``).

``--loss module:function`` checks anyone's OPD loss the same way (``conformance_table``). The
function is called once per response with

    loss(student_logits, teacher_logits, tokens, mask, divergence, gamma) -> scalar Tensor

- ``student_logits`` [1, T, V] float64, with grad: the student's next-token logits at each
  response position (log p of the sampled tokens: ``log_softmax(...).gather(tokens)``);
- ``teacher_logits`` [1, T, V] float64: the teacher's, constant;
- ``tokens`` [1, T] int64: the response, sampled from the student; ``mask`` [1, T] bool, all True;
- ``divergence``: a registered name without parameters (``forward_kl``, ``js``, ...: D_f with the
  student as base measure, docs/opd-math.md); ``gamma``: 0.0 or 1.0;

and returns the loss to minimise for that one response. Its expected gradient must be the
gradient of J^f at gamma = 1 and the per-state gradient at gamma = 0. It may raise
NotImplementedError for a divergence or gamma it does not take. Each case is ``exact``,
``scaled`` (the right direction at another scale: a per-token mean, a constant factor),
``biased`` or ``not supported``; the command exits 1 when a supported case is not exact.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor

from opdx.config import SUPPORTS, EstimatorConfig, load_option
from opdx.divergences import DIVERGENCES, Divergence, build_divergence, parameters
from opdx.logits import HeadLogits, TopKOfLogits
from opdx.objective import ESTIMATORS, LossInputs
from opdx.rollout import gather_logprobs
from opdx.spans import shared_spans, span_advantages, span_sums, token_ends

TOLERANCE = 1e-9
TOP_K = 1  # of the tabular policy's 3 tokens: the teacher's most likely one and a tail of two
# the table's supports: (estimator.support, estimator.state_baseline) by label
VARIANTS = {
    "sampled": ("sampled", False),
    "sampled+baseline": ("sampled", True),
    **{support: (support, False) for support in SUPPORTS if support != "sampled"},
}


@dataclass
class TabularProblem:
    """Student logits (parameters) and teacher logits for every prefix state of a tabular policy.

    ``responses_Y_T`` lists all V^T responses; ``states_Y_T`` the row of the logit table for
    the state s_n = y_<n of each response position.
    """

    logits_student_S_V: Tensor
    logits_teacher_S_V: Tensor
    responses_Y_T: Tensor
    states_Y_T: Tensor

    @classmethod
    def random(cls, vocab: int = 3, length: int = 3, seed: int = 0, scale: float = 1.0) -> TabularProblem:
        generator = torch.Generator().manual_seed(seed)
        prefixes = [p for n in range(length) for p in itertools.product(range(vocab), repeat=n)]
        state_of_prefix = {prefix: i for i, prefix in enumerate(prefixes)}
        responses = list(itertools.product(range(vocab), repeat=length))
        states = [[state_of_prefix[y[:n]] for n in range(length)] for y in responses]
        shape = (len(prefixes), vocab)
        return cls(
            logits_student_S_V=scale * torch.randn(shape, generator=generator, dtype=torch.float64),
            logits_teacher_S_V=scale * torch.randn(shape, generator=generator, dtype=torch.float64),
            responses_Y_T=torch.tensor(responses),
            states_Y_T=torch.tensor(states),
        )

    def token_logprobs(self, logits_S_V: Tensor) -> Tensor:
        """log-probability of each response token under a logit table, [Y, T]."""
        logp_Y_T_V = torch.log_softmax(logits_S_V[self.states_Y_T], dim=-1)
        return logp_Y_T_V.gather(-1, self.responses_Y_T.unsqueeze(-1)).squeeze(-1)


def state_divergence(logits_student_S_V: Tensor, logits_teacher_S_V: Tensor, div: Divergence, support: str) -> Tensor:
    """D^S at each state [S] from [S, V] logits, differentiable in both, written apart from the
    estimators' code: ``Divergence.full`` for the sampled and full supports; on ``topk`` the
    probabilities of the teacher's top ``TOP_K`` tokens and 1 minus their sum (the tail)."""
    if support != "topk":
        return div.full(logits_student_S_V, logits_teacher_S_V)
    p_S_V, q_S_V = logits_student_S_V.softmax(-1), logits_teacher_S_V.softmax(-1)
    top_S_J = q_S_V.argsort(-1, descending=True)[..., :TOP_K]

    def categories(r_S_V: Tensor) -> Tensor:
        r_S_J = r_S_V.gather(-1, top_S_J)
        return torch.cat([r_S_J, 1 - r_S_J.sum(-1, keepdim=True)], -1)

    p_S_E, q_S_E = categories(p_S_V), categories(q_S_V)
    return (p_S_E * div.f(q_S_E.log() - p_S_E.log())).sum(-1)


def true_gradient(problem: TabularProblem, div: Divergence, gamma: float, support: str = "sampled") -> Tensor:
    """grad J^S (gamma = 1) or the frozen-state per-state gradient (gamma = 0) on ``support``, [S, V]."""
    theta = problem.logits_student_S_V.clone().requires_grad_(True)
    states_Y_T = problem.states_Y_T
    if gamma == 1 and support == "sampled":
        logp_Y_T = problem.token_logprobs(theta)
        log_u_Y_T = problem.token_logprobs(problem.logits_teacher_S_V) - logp_Y_T
        objective = (logp_Y_T.sum(-1).exp() * div.f(log_u_Y_T).sum(-1)).sum()
    elif gamma in (0, 1):
        weight_Y = problem.token_logprobs(theta if gamma == 1 else theta.detach()).sum(-1).exp()
        per_state_Y_T = state_divergence(theta[states_Y_T], problem.logits_teacher_S_V[states_Y_T], div, support)
        objective = (weight_Y * per_state_Y_T.sum(-1)).sum()
    else:
        raise ValueError(f"the exact gradient is defined here for gamma in {{0, 1}}, got {gamma!r}")
    (grad,) = torch.autograd.grad(objective, theta)
    return grad


def response_gradients(
    problem: TabularProblem, loss_of: Callable[..., Tensor], logp_sampling_Y_T: Tensor | None = None
) -> Tensor:
    """grad L(y) for every response y, [Y, S, V]: L(y) = ``loss_of(student_logits_1_T_V,
    teacher_logits_1_T_V, tokens_1_T, mask_1_T)`` of the response's rows of the logit tables (the
    student's with grad), its tokens and an all-True mask; with ``logp_sampling_Y_T`` also the log-probs
    [1, T] of its tokens under the policy that sampled it."""
    grads = []
    for y in range(problem.responses_Y_T.shape[0]):
        theta = problem.logits_student_S_V.clone().requires_grad_(True)
        states_1_T, tokens_1_T = problem.states_Y_T[y : y + 1], problem.responses_Y_T[y : y + 1]
        mask_1_T = torch.ones_like(tokens_1_T, dtype=torch.bool)
        sampling = () if logp_sampling_Y_T is None else (logp_sampling_Y_T[y : y + 1],)
        loss = loss_of(theta[states_1_T], problem.logits_teacher_S_V[states_1_T], tokens_1_T, mask_1_T, *sampling)
        grads.append(torch.autograd.grad(loss, theta)[0])
    return torch.stack(grads)


def per_response_gradients(
    problem: TabularProblem,
    div: Divergence,
    estimator: str,
    gamma: float,
    variant: str = "sampled",
    correction: str | None = None,
    logp_sampling_Y_T: Tensor | None = None,
) -> Tensor:
    """grad L(y) of the one-response surrogate of ``estimator`` on a support of ``VARIANTS`` for
    every response y, [Y, S, V]; with a ``correction`` (``rollout_correction``: ``tis`` uncapped,
    or ``per_decision``) for responses sampled by another policy, whose log-probs of their tokens
    are ``logp_sampling_Y_T``."""
    support, baseline = VARIANTS[variant]
    config = EstimatorConfig(
        name=estimator,
        gamma=gamma,
        support=support,
        top_k=TOP_K,
        state_baseline=baseline,
        rollout_correction=correction,
        tis_cap=math.inf,
    )
    est = ESTIMATORS[estimator](config)

    def loss_of(
        student_1_T_V: Tensor,
        teacher_1_T_V: Tensor,
        tokens_1_T: Tensor,
        mask_1_T: Tensor,
        logp_sampling_1_T: Tensor | None = None,
    ) -> Tensor:
        if not est.needs_dense:  # the sampled tokens' log-probs
            student, teacher = (gather_logprobs(logits, tokens_1_T) for logits in (student_1_T_V, teacher_1_T_V))
        else:
            student, teacher = HeadLogits(student_1_T_V), HeadLogits(teacher_1_T_V)
            teacher = TopKOfLogits(teacher, tokens_1_T, TOP_K) if est.teacher_support == "topk" else teacher
        return est.loss(LossInputs(student, teacher, mask_1_T, tokens_1_T, logp_sampling_1_T), div).loss

    return response_gradients(problem, loss_of, logp_sampling_Y_T)


def compare(estimate: Tensor, truth: Tensor) -> tuple[float, float]:
    """Relative error ||estimate - truth|| / ||truth|| and cosine similarity."""
    rel_error = ((estimate - truth).norm() / truth.norm()).item()
    cosine = torch.nn.functional.cosine_similarity(estimate.flatten(), truth.flatten(), dim=0).item()
    return rel_error, cosine


def checked(estimate: Tensor, truth: Tensor, must_be_exact: bool, **keys: object) -> dict[str, object]:
    """A table row: ``keys``, the relative error and cosine of ``estimate`` against ``truth``, and
    whether it is ``ok`` (within ``TOLERANCE`` where it ``must_be_exact``)."""
    rel_error, cosine = compare(estimate, truth)
    ok = rel_error < TOLERANCE if must_be_exact else True
    return keys | {"rel_error": rel_error, "cosine": cosine, "must_be_exact": must_be_exact, "ok": ok}


def divergence_for(name: str, params: dict[str, float] | None = None) -> Divergence:
    """The divergence ``name`` with the parameters of its YAML file, ``params`` replacing those it takes."""
    config = load_option("divergence", name)
    config.update({key: value for key, value in (params or {}).items() if key in parameters(name)})
    return build_divergence(config)


def exact_table(vocab: int = 3, length: int = 3, seed: int = 0, params: dict[str, float] | None = None) -> pd.DataFrame:
    """One row per setting x divergence x gamma x support x estimator: relative error and cosine."""
    rows = []
    settings = {f"tabular V={vocab} T={length}": length, "single state T=1": 1}
    for setting, setting_length in settings.items():
        problem = TabularProblem.random(vocab, setting_length, seed)
        gammas = (0.0, 1.0) if setting_length > 1 else (0.0,)
        weight_Y = problem.token_logprobs(problem.logits_student_S_V).sum(-1).exp()
        for name, gamma, variant in itertools.product(DIVERGENCES, gammas, VARIANTS):
            div = divergence_for(name, params)
            truth = true_gradient(problem, div, gamma, VARIANTS[variant][0])
            for estimator, cls in ESTIMATORS.items():
                grads_Y_S_V = per_response_gradients(problem, div, estimator, gamma, variant)
                estimate = torch.einsum("y,ysv->sv", weight_Y, grads_Y_S_V)
                keys = {"setting": setting, "divergence": name, "gamma": gamma, "support": variant}
                rows.append(checked(estimate, truth, cls.is_exact(name, gamma), **keys, estimator=estimator))
    return pd.DataFrame(rows)


STALE_UPDATES = (1, 2)  # how many updates older than the trained policy the sampling policy is
STALE_STEP = 1.0  # step size of each update (gradient descent on reverse_kl's J^f over the logit table)
# the weightings compared on stale samples, by rollout_correction: None treats them as the current
# policy's; tis (uncapped) weighs by the current token's ratio alone
STALE_CORRECTIONS = {"none": None, "token ratio": "tis", "per_decision": "per_decision"}


def policy_versions(problem: TabularProblem, updates: int) -> list[Tensor]:
    """The student's logit table [S, V] before and after each of ``updates`` updates:
    theta_k+1 = theta_k - STALE_STEP grad J(theta_k), J reverse_kl's sequence objective."""
    div = divergence_for("reverse_kl")
    versions = [problem.logits_student_S_V]
    for _ in range(updates):
        step_S_V = true_gradient(replace(problem, logits_student_S_V=versions[-1]), div, 1.0)
        versions.append(versions[-1] - STALE_STEP * step_S_V)
    return versions


def stale_table(vocab: int = 3, length: int = 3, seed: int = 0, params: dict[str, float] | None = None) -> pd.DataFrame:
    """One row per update lag x divergence x gamma x weighting x estimator: the responses sampled by
    the tabular student theta_0, the loss and the true gradient taken at theta_k, k in
    ``STALE_UPDATES`` (E[grad L] = sum_y mu(y) grad L(y), mu = p_theta_0). ``per_decision`` must be
    exact wherever the estimator is on its own samples."""
    problem = TabularProblem.random(vocab, length, seed)
    versions = policy_versions(problem, max(STALE_UPDATES))
    logp_sampling_Y_T = problem.token_logprobs(versions[0])
    weight_Y = logp_sampling_Y_T.sum(-1).exp()
    rows = []
    for updates in STALE_UPDATES:
        current = replace(problem, logits_student_S_V=versions[updates])
        for name, gamma in itertools.product(DIVERGENCES, (0.0, 1.0)):
            div = divergence_for(name, params)
            truth = true_gradient(current, div, gamma)
            for (weighting, correction), (estimator, cls) in itertools.product(
                STALE_CORRECTIONS.items(), ESTIMATORS.items()
            ):
                grads_Y_S_V = per_response_gradients(
                    current, div, estimator, gamma, correction=correction, logp_sampling_Y_T=logp_sampling_Y_T
                )
                estimate = torch.einsum("y,ysv->sv", weight_Y, grads_Y_S_V)
                exact = correction == "per_decision" and cls.is_exact(name, gamma)
                keys = {"updates": updates, "divergence": name, "gamma": gamma, "weighting": weighting}
                rows.append(checked(estimate, truth, exact, **keys, estimator=estimator))
    return pd.DataFrame(rows)


CHARS = "abc"  # the toy student's tokens: one character each
# the toy teachers' tokenizations (span_teacher_pieces): boundaries by position alone, or by content too
TEACHER_TOKENIZERS = ("pairs", "merges")
# the span estimators of the cross-tokenizer table: (own term unbiased, whole return) by label
SPAN_ESTIMATORS = {"causal stopgrad": (False, False), "causal unbiased": (True, False), "whole unbiased": (True, True)}


def span_teacher_pieces(text: str, tokenizer: str) -> list[str]:
    """A toy teacher's canonical tokenization of ``text``: ``pairs`` cuts it into pieces of two
    characters (the last one shorter), at places the position alone decides; ``merges`` makes
    every "ab" one token, left to right, so whether a token ends after an "a" depends on the
    character after it (as a BPE merge does)."""
    if tokenizer == "pairs":
        return [text[i : i + 2] for i in range(0, len(text), 2)]
    pieces, i = [], 0
    while i < len(text):
        size = 2 if text[i : i + 2] == "ab" else 1
        pieces.append(text[i : i + size])
        i += size
    return pieces


@dataclass
class SpanProblem:
    """The tabular student of ``problem`` over ``CHARS`` and a tabular teacher over its own
    pieces (``vocab``; a row of random logits per prefix of pieces, ``teacher``), each response's
    text tokenized by the teacher (``pieces_Y``), the span of each student token and of each
    teacher piece (``spans_Y``: ``opdx.spans.shared_spans``) and the teacher's log-prob of each
    span (``logq_Y_J``)."""

    problem: TabularProblem
    vocab: list[str]
    teacher: dict[tuple[str, ...], Tensor]
    pieces_Y: list[list[str]]
    spans_Y: list[tuple[list[int], list[int]]]
    logq_Y_J: list[Tensor]

    @cached_property
    def state_of(self) -> dict[tuple[int, ...], int]:
        """The row of the student's logit table of each prefix of characters (from the responses'
        own states: the prefix y_<n of a response is at ``states_Y_T[y, n]``)."""
        responses, states = self.problem.responses_Y_T.tolist(), self.problem.states_Y_T.tolist()
        return {tuple(y[:n]): row[n] for y, row in zip(responses, states, strict=True) for n in range(len(y))}

    @classmethod
    def random(cls, tokenizer: str, length: int = 3, seed: int = 0) -> SpanProblem:
        """A random tabular student over ``CHARS`` (responses of ``length``) and teacher of
        ``tokenizer``'s pieces (``span_teacher_pieces``), seeded by ``seed``."""
        problem = TabularProblem.random(len(CHARS), length, seed)
        texts = ["".join(CHARS[c] for c in y) for y in problem.responses_Y_T.tolist()]
        pieces_Y = [span_teacher_pieces(text, tokenizer) for text in texts]
        vocab = sorted({piece for pieces in pieces_Y for piece in pieces} | set(CHARS))
        contexts = sorted({tuple(pieces[:m]) for pieces in pieces_Y for m in range(len(pieces))})
        generator = torch.Generator().manual_seed(seed + 1)
        teacher = {c: torch.randn(len(vocab), generator=generator, dtype=torch.float64) for c in contexts}

        def logq_M(pieces: list[str]) -> Tensor:
            rows = [torch.log_softmax(teacher[tuple(pieces[:m])], -1)[vocab.index(p)] for m, p in enumerate(pieces)]
            return torch.stack(rows)

        spans_Y = [
            shared_spans(token_ends(text), token_ends(pieces)) for text, pieces in zip(texts, pieces_Y, strict=True)
        ]
        logq_Y_J = [
            span_sums(logq_M(pieces), teacher_spans, teacher_spans[-1] + 1)
            for pieces, (_, teacher_spans) in zip(pieces_Y, spans_Y, strict=True)
        ]
        return cls(problem, vocab, teacher, pieces_Y, spans_Y, logq_Y_J)

    def logq(self, context: tuple[str, ...], piece: str) -> Tensor:
        """log q(piece | the pieces before it)."""
        return torch.log_softmax(self.teacher[context], -1)[self.vocab.index(piece)]

    def terms(self, theta: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Each response's token log-probs [Y, T] under the logit table ``theta`` and its spans' log u [J]."""
        logp_Y_T = self.problem.token_logprobs(theta)
        log_u_Y = [logq - span_sums(logp_Y_T[y], self.spans_Y[y][0], len(logq)) for y, logq in enumerate(self.logq_Y_J)]
        return logp_Y_T, log_u_Y

    def span_divergence(self, theta: Tensor, y: int, j: int, div: Divergence) -> Tensor:
        """D_j = sum_w p(w | s_j) f(q(w | s_j) / p(w | s_j)) at response y's span j, over every text
        w of the span's length (with ``pairs``, a span is one teacher piece)."""
        student_spans, teacher_spans = self.spans_Y[y]
        if teacher_spans.count(j) != 1:
            raise ValueError(f"span {j} of response {y} holds {teacher_spans.count(j)} teacher pieces, not one")
        start, size = student_spans.index(j), student_spans.count(j)
        context = tuple(self.pieces_Y[y][: teacher_spans.index(j)])
        prefix = tuple(self.problem.responses_Y_T[y, :start].tolist())
        total = theta.new_zeros(())
        for w in itertools.product(range(len(CHARS)), repeat=size):
            logp = sum(torch.log_softmax(theta[self.state_of[prefix + w[:k]]], -1)[w[k]] for k in range(size))
            log_u = self.logq(context, "".join(CHARS[c] for c in w)) - logp
            total = total + logp.exp() * div.f(log_u)
        return total


def cross_tokenizer_table(length: int = 3, seed: int = 0, params: dict[str, float] | None = None) -> pd.DataFrame:
    """The span estimators (``opdx.spans``) against the exact gradient, by enumeration over a
    ``SpanProblem`` of each of ``TEACHER_TOKENIZERS``, and the variance of one response's gradient
    (E_y ||grad L(y) - E grad L||^2, ``variance``). The truth at gamma = 1: autograd of
    J = sum_y p(y) sum_j f(u_j(y)). At gamma = 0, for ``pairs`` alone (whose spans are fixed
    pieces of text, hence actions), autograd of sum_y pbar(y) sum_j D_j(s_j), pbar frozen. One row
    per tokenizer x divergence x gamma x estimator; OPD+ with the whole return must be exact at
    gamma = 1 for both, causal OPD+ for ``pairs``, stop-gradient OPD for ``pairs`` and reverse_kl."""
    rows = []
    for tokenizer in TEACHER_TOKENIZERS:
        span = SpanProblem.random(tokenizer, length, seed)
        for name, gamma in itertools.product(DIVERGENCES, (0.0, 1.0)):
            if gamma == 0 and tokenizer == "merges":  # a span there is no action: its end depends on later text
                continue
            div = divergence_for(name, params)
            theta = span.problem.logits_student_S_V.clone().requires_grad_(True)
            logp_Y_T, log_u_Y = span.terms(theta)
            if gamma == 1:
                objective = sum(logp_Y_T[y].sum().exp() * div.f(log_u).sum() for y, log_u in enumerate(log_u_Y))
            else:
                weight_Y = logp_Y_T.sum(-1).detach().exp()
                objective = sum(
                    weight_Y[y] * sum(span.span_divergence(theta, y, j, div) for j in range(len(log_u)))
                    for y, log_u in enumerate(log_u_Y)
                )
            (truth,) = torch.autograd.grad(objective, theta)
            for label, (unbiased, whole) in SPAN_ESTIMATORS.items():
                if whole and gamma == 0:
                    continue
                theta = span.problem.logits_student_S_V.clone().requires_grad_(True)
                logp_Y_T, log_u_Y = span.terms(theta)
                weight_Y = logp_Y_T.sum(-1).detach().exp()
                grads_Y_S_V = []
                for y, log_u in enumerate(log_u_Y):  # every student token takes its span's advantage
                    advantages_T = span_advantages(log_u, div, unbiased, gamma, whole)[span.spans_Y[y][0]]
                    loss = -(advantages_T * logp_Y_T[y]).sum()
                    grads_Y_S_V.append(torch.autograd.grad(loss, theta, retain_graph=True)[0])
                grads_Y_S_V = torch.stack(grads_Y_S_V)
                estimate = torch.einsum("y,ysv->sv", weight_Y, grads_Y_S_V)
                variance = torch.einsum("y,y->", weight_Y, (grads_Y_S_V - estimate).square().sum((1, 2))).item()
                exact = (unbiased and (whole or tokenizer == "pairs")) or (
                    name == "reverse_kl" and tokenizer == "pairs"
                )
                keys = {"teacher tokenizer": tokenizer, "divergence": name, "gamma": gamma}
                rows.append(checked(estimate, truth, exact, **keys, estimator=label) | {"variance": variance})
    return pd.DataFrame(rows)


def monte_carlo_table(
    samples: int,
    vocab: int = 3,
    length: int = 3,
    seed: int = 0,
    gamma: float = 1.0,
    params: dict[str, float] | None = None,
    repeats: int = 20,
) -> pd.DataFrame:
    """RMS relative error of the N-sample mean gradient, N = samples / 4^k, over ``repeats`` draws.

    The unbiased estimator's error falls like 1/sqrt(N); a biased one plateaus at its bias.
    """
    problem = TabularProblem.random(vocab, length, seed)
    probs_Y = problem.token_logprobs(problem.logits_student_S_V).sum(-1).exp()
    sample_sizes = sorted({max(1, samples // 4**k) for k in range(5)})
    generator = torch.Generator().manual_seed(seed + 1)
    rows = []
    for name in DIVERGENCES:
        div = divergence_for(name, params)
        truth = true_gradient(problem, div, gamma)
        for estimator, variant in (("stopgrad", "sampled"), ("unbiased", "sampled"), ("unbiased", "sampled+baseline")):
            grads_Y_S_V = per_response_gradients(problem, div, estimator, gamma, variant)
            for n in sample_sizes:
                counts_R_Y = torch.stack(
                    [
                        torch.bincount(torch.multinomial(probs_Y, n, True, generator=generator), minlength=len(probs_Y))
                        for _ in range(repeats)
                    ]
                ).to(torch.float64)
                estimates_R_S_V = torch.einsum("ry,ysv->rsv", counts_R_Y / n, grads_Y_S_V)
                errors_R = (estimates_R_S_V - truth).flatten(1).norm(dim=1) / truth.norm()
                rows.append(
                    {
                        "divergence": name,
                        "estimator": estimator + " state baseline" * VARIANTS[variant][1],
                        "samples": n,
                        "rms_rel_error": errors_R.square().mean().sqrt().item(),
                    }
                )
    return pd.DataFrame(rows)


UserLoss = Callable[[Tensor, Tensor, Tensor, Tensor, str, float], Tensor]


def load_loss(spec: str) -> UserLoss:
    """The callable ``module:function`` names; ValueError naming ``spec`` when it cannot be had."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"--loss {spec!r}: give module:function, e.g. mypackage.losses:opd_loss")
    try:
        loss = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"--loss {spec!r} cannot be loaded: {error}") from None
    if not callable(loss):
        raise ValueError(f"--loss {spec!r} is not callable")
    return loss


def conformance_table(loss: UserLoss, vocab: int = 3, length: int = 3, seed: int = 0) -> pd.DataFrame:
    """One row per parameter-free divergence x gamma in {0, 1}: E[grad loss] over every response
    of the tabular policy against the exact gradient (the module docstring gives the contract),
    with its relative error, cosine and verdict."""
    problem = TabularProblem.random(vocab, length, seed)
    weight_Y = problem.token_logprobs(problem.logits_student_S_V).sum(-1).exp()
    rows = []
    for name, gamma in itertools.product([n for n in DIVERGENCES if not parameters(n)], (0.0, 1.0)):
        truth = true_gradient(problem, divergence_for(name), gamma)
        row = {"divergence": name, "gamma": gamma, "rel_error": float("nan"), "cosine": float("nan")}
        try:
            # called at once, within this iteration: the late binding B023 warns of cannot bite
            grads_Y_S_V = response_gradients(problem, lambda *response: loss(*response, name, gamma))  # noqa: B023
        except NotImplementedError:
            rows.append(row | {"verdict": "not supported"})
            continue
        rel_error, cosine = compare(torch.einsum("y,ysv->sv", weight_Y, grads_Y_S_V), truth)
        verdict = "exact" if rel_error < TOLERANCE else "scaled" if cosine > 1 - TOLERANCE else "biased"
        rows.append(row | {"rel_error": rel_error, "cosine": cosine, "verdict": verdict})
    return pd.DataFrame(rows)


def run_conformance(spec: str, out_dir: Path, seed: int = 0) -> int:
    """Print and save ``spec``'s conformance table; the exit code (1 if a supported case is not exact)."""
    table = conformance_table(load_loss(spec), seed=seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    shown = table.assign(gamma=table["gamma"].map("{:g}".format))
    markdown = shown.to_markdown(index=False, floatfmt=("", "", ".1e", ".6f", ""))
    print(f"{spec}: E[grad loss] over all responses vs the exact gradient (gamma 1: J^f; gamma 0: per state)\n")
    print(markdown)
    (out_dir / "conformance.md").write_text(markdown + "\n")
    table.to_csv(out_dir / "conformance.csv", index=False)
    wrong = table[table.verdict.isin(["scaled", "biased"])]
    if len(wrong):
        print(f"\nNOT EXACT: {len(wrong)} case(s) ({', '.join(sorted(set(wrong.divergence)))}); written to {out_dir}/")
        return 1
    print(f"\nOK: every supported case is exact to < {TOLERANCE:g}; written to {out_dir}/")
    return 0


def render_exact(table: pd.DataFrame) -> pd.DataFrame:
    """Wide view: one row per setting/divergence/gamma, the relative error per support and estimator."""
    wide = table.pivot_table(
        index=["setting", "divergence", "gamma"], columns=["support", "estimator"], values="rel_error", sort=False
    )
    wide.columns = [f"{support} {estimator}" for support, estimator in wide.columns]
    wide = wide[[f"{variant} {estimator}" for variant in VARIANTS for estimator in ESTIMATORS]].reset_index()
    wide["gamma"] = wide["gamma"].map("{:g}".format)
    return wide


def report(table: pd.DataFrame, index: list[str], columns: list[str], title: str, path: Path) -> None:
    """Print ``title`` and ``table``'s relative errors wide (a row per ``index`` value, which must
    include ``gamma``, a column per ``columns`` value, — where a case does not exist) and write
    them to ``path``.md and the long table to ``path``.csv."""
    wide = table.pivot_table(index=index, columns=columns, values="rel_error", sort=False)
    wide.columns = [" ".join(map(str, key)) if isinstance(key, tuple) else key for key in wide.columns]
    wide = wide.reset_index().assign(gamma=lambda t: t["gamma"].map("{:g}".format))
    wide = wide.astype(object).where(wide.notna(), None)
    markdown = wide.to_markdown(
        index=False, floatfmt=[""] * len(index) + [".1e"] * (len(wide.columns) - len(index)), missingval="—"
    )
    print(f"\n{title}\n\n{markdown}")
    path.with_suffix(".md").write_text(markdown + "\n")
    table.to_csv(path.with_suffix(".csv"), index=False)


def run(
    samples: int | None, out_dir: Path, seed: int = 0, params: dict[str, float] | None = None, gamma: float = 1.0
) -> int:
    """Print and save the table; return the exit code (1 if an exact estimator deviates)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table = exact_table(seed=seed, params=params)
    wide = render_exact(table)
    markdown = wide.to_markdown(index=False, floatfmt=[""] * 3 + [".1e"] * (len(wide.columns) - 3))
    print(
        "Exact expectation over all responses: relative error of E[grad L] vs the true gradient on each support "
        f"(topk: the teacher's top {TOP_K} of 3 tokens and a tail)\n"
    )
    print(markdown)
    (out_dir / "exact.md").write_text(markdown + "\n")
    table.to_csv(out_dir / "exact.csv", index=False)
    failures = table[~table["ok"]]
    stopgrad = table[table.estimator == "stopgrad"]
    reverse_kl_error = stopgrad[stopgrad.divergence == "reverse_kl"].rel_error.max()
    biased = stopgrad[stopgrad.divergence != "reverse_kl"].rel_error
    print(
        f"\nOPD+ (unbiased) max rel.err {table[table.estimator == 'unbiased'].rel_error.max():.1e}; "
        f"reverse_kl OPD max rel.err {reverse_kl_error:.1e}; stop-gradient OPD of the other "
        f"divergences: rel.err {biased.min():.2f} to {biased.max():.2f} (biased)."
    )
    stale = stale_table(seed=seed, params=params)
    title = (
        "Samples from a stale policy: responses sampled by the student as it was 1 or 2 updates before, the "
        "loss and the true gradient at the current one; relative error of E[grad L] per weighting of the "
        "samples (rollout_correction: none, the current token's ratio, per_decision)"
    )
    report(stale, ["updates", "divergence", "gamma"], ["weighting", "estimator"], title, out_dir / "stale")
    per_decision = stale[(stale.weighting == "per_decision") & stale.must_be_exact].rel_error.max()
    token_ratio = stale[(stale.weighting == "token ratio") & (stale.estimator == "unbiased")].rel_error
    print(
        f"\nper_decision weights, where exact (OPD+; OPD for reverse_kl): max rel.err {per_decision:.1e}; OPD+ with "
        "the current token's ratio alone "
        f"{token_ratio.min():.2f} to {token_ratio.max():.2f} (biased: the states stay distributed as under the "
        "sampling policy)."
    )
    spans = cross_tokenizer_table(seed=seed, params=params)
    title = (
        "A teacher with another tokenizer: the toy student writes characters, the teacher scores the text in its "
        "own pieces (pairs: cut every two characters; merges: every 'ab' one piece), and each student token takes "
        "the advantage of its span (the text between two places where both tokenizations end a token); relative "
        "error of E[grad L] (docs/opd-math.md, 'Teachers with another tokenizer')"
    )
    report(spans, ["teacher tokenizer", "divergence", "gamma"], ["estimator"], title, out_dir / "cross_tokenizer")
    causal = spans[(spans["teacher tokenizer"] == "merges") & (spans.estimator == "causal unbiased")].rel_error
    at_one = spans[spans.gamma == 1].pivot_table(
        index=["teacher tokenizer", "divergence"], columns="estimator", values="variance"
    )
    ratio = at_one["whole unbiased"] / at_one["causal unbiased"]
    print(
        f"\nwhere exact: max rel.err {spans[spans.must_be_exact].rel_error.max():.1e}; causal OPD+ with the merges "
        f"tokenizer {causal.min():.3f} to {causal.max():.3f} (biased: a span's end depends on the text after it). "
        f"Variance of one response's gradient at gamma 1, whole return over causal: {ratio.min():.2f} to "
        f"{ratio.max():.2f}."
    )
    failures = pd.concat(
        [frame for frame in (failures, stale[~stale["ok"]], spans[~spans["ok"]]) if len(frame)] or [failures]
    )
    if samples:
        mc = monte_carlo_table(samples, seed=seed, gamma=gamma, params=params)
        mc_wide = mc.pivot_table(
            index=["divergence", "estimator"], columns="samples", values="rms_rel_error", sort=False
        )
        mc_wide.columns = [f"N={n}" for n in mc_wide.columns]
        mc_markdown = mc_wide.reset_index().to_markdown(index=False, floatfmt=".3f")
        print(f"\nMonte-Carlo (gamma={gamma:g}): RMS relative error of the N-sample gradient estimate\n")
        print(mc_markdown)
        (out_dir / "monte_carlo.md").write_text(mc_markdown + "\n")
        mc.to_csv(out_dir / "monte_carlo.csv", index=False)
    print(f"\nwritten to {out_dir}/")
    if len(failures):
        print(f"\nFAILED: {len(failures)} estimator(s) that must be exact deviate beyond {TOLERANCE:g}:")
        print(failures.to_string(index=False))
        return 1
    print(f"\nOK: every estimator that must be exact matches to < {TOLERANCE:g}.")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="opdx verify", description=__doc__.split("\n\n")[1] if __doc__ else None)
    parser.add_argument("--samples", type=int, default=None, help="also run the Monte-Carlo mode with up to N samples")
    parser.add_argument("--gamma", type=float, default=1.0, choices=(0.0, 1.0), help="discount of the Monte-Carlo mode")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random tabular student and teacher")
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a divergence parameter instead of its conf/divergence default, e.g. --param alpha=0.3",
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/verify"), help="where the markdown and CSV go")
    parser.add_argument(
        "--loss",
        metavar="MODULE:FUNCTION",
        help="check this loss function instead of opdx's (contract: opdx/verify.py)",
    )
    args = parser.parse_args(argv)
    if args.samples is not None and args.samples < 1:
        parser.error(f"--samples must be a positive integer, got {args.samples}")
    params = {}
    for item in args.param:
        name, _, value = item.partition("=")
        try:
            params[name] = float(value)
        except ValueError:
            parser.error(f"--param {item!r}: give NAME=NUMBER, e.g. --param alpha=0.3")
    try:
        if args.loss:
            return run_conformance(args.loss, args.out, args.seed)
        return run(args.samples, args.out, args.seed, params, args.gamma)
    except ValueError as error:
        parser.error(str(error))


if __name__ == "__main__":
    raise SystemExit(main())
