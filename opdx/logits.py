"""Next-token distributions made chunk by chunk: what the dense estimator supports read.

A model's logits at every response position of a batch, [B, T, V] float32, would be the largest
tensor of a step (4.6 GiB for 4 x 2,048 positions of a 151,936-token vocabulary), so no model
hands them over whole: a scorer returns ``HeadLogits``, its last hidden states [B, T, D] and the
output head that maps any rows of them to logits, and the loss makes [C, V] logits for C states at
a time (``opdx.objective.dense_state_terms``, which recomputes a chunk's in backward). A teacher
behind a server, which returns only its top-k log-probs, returns ``TopK`` instead, on the same
chunked interface. ``RoutedScores`` puts several teachers' rows (a mixture) behind one.

Shapes: B sequences, T response positions, S the states on a response mask (row-major, as
``x_B_T[mask_B_T]`` takes them), C the states of a chunk, D a hidden size, V the vocabulary,
J the teacher's top-k.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor


class DenseScores(Protocol):
    """A model's next-token distribution at positions [B, T] (or, after ``at``, at states [S])."""

    def at(self, mask_B_T: Tensor) -> DenseScores:
        """The same at the mask's positions only, row-major: [S] states."""
        ...

    def chunk(self, start: int, end: int) -> Tensor | TopK:
        """States ``start`` to ``end`` (of [S], after ``at``): logits [C, V] float32 at least
        (``HeadLogits``) or the top-k log-probs (``TopK``)."""
        ...


@dataclass(frozen=True)
class HeadLogits:
    """Logits kept as the last hidden states ``hidden`` ([B, T, D], or [S, D] after ``at``)
    and the ``head`` that maps rows of them to logits, [C, D] -> [C, V] (the output layer, in
    float32, the tokenizer's ids only, warped as sampled: ``opdx.policy.TokenScores``). With grad
    where the hidden states have it. ``HeadLogits(logits)`` (the identity head) wraps logits
    already made."""

    hidden: Tensor
    head: Callable[[Tensor], Tensor] = lambda logits_C_V: logits_C_V

    def at(self, mask_B_T: Tensor) -> HeadLogits:
        return HeadLogits(self.hidden[mask_B_T.to(self.hidden.device).bool()], self.head)

    def chunk(self, start: int, end: int) -> Tensor:
        return self.head(self.hidden[start:end])


@dataclass(frozen=True)
class TopK:
    """A teacher's top-k at each position ([B, T, J] and [B, T], or [S, J] and [S] after ``at``):
    its ``ids`` (int64) and ``logq`` log-probs, the log-prob ``logq_tail`` of every other token
    together, and ``logq_token`` of the sampled token (which need not be among the k); float32."""

    ids: Tensor
    logq: Tensor
    logq_tail: Tensor
    logq_token: Tensor

    @classmethod
    def of(cls, logq: Tensor, top_k: int, tokens: Tensor) -> TopK:
        """The top-k of full log-probs ``logq`` [..., V]: the tail a log-sum-exp over the other
        tokens (exact however close the k come to 1), the sampled ``tokens`` [...] looked up."""
        top_logq, ids = logq.topk(min(top_k, logq.shape[-1]), dim=-1)
        others = logq.scatter(-1, ids, -math.inf)
        logq_token = logq.gather(-1, tokens.unsqueeze(-1).to(logq.device)).squeeze(-1)
        return cls(ids, top_logq, torch.logsumexp(others, dim=-1), logq_token)

    @classmethod
    def served(cls, ids: Tensor, logq: Tensor, logq_token: Tensor) -> TopK:
        """The top-k a server returns: the tail log(1 - sum_j q_j), computed as log(-expm1(.)) of
        the log-sum-exp, so a tail far below 1 keeps its digits (float32; 0 when the k hold every
        bit of the mass: -inf)."""
        mass = torch.logsumexp(logq, dim=-1).clamp(max=0.0)  # [...]
        return cls(ids, logq, torch.log(-torch.expm1(mass)), logq_token)

    def at(self, mask_B_T: Tensor) -> TopK:
        mask_B_T = mask_B_T.to(self.ids.device).bool()
        return TopK(*(getattr(self, name)[mask_B_T] for name in TOPK_FIELDS))

    def chunk(self, start: int, end: int) -> TopK:
        return TopK(*(getattr(self, name)[start:end] for name in TOPK_FIELDS))


TOPK_FIELDS = ("ids", "logq", "logq_tail", "logq_token")


@dataclass(frozen=True)
class TopKOfLogits:
    """The ``top_k`` of a model whose full logits are at hand (``logits``), made chunk by chunk
    (``TopK.of`` of their log-softmax), the sampled ``tokens`` ([B, T], or [S] after ``at``)
    looked up: what a local teacher gives for ``estimator.support=topk``."""

    logits: DenseScores
    tokens: Tensor
    top_k: int

    def at(self, mask_B_T: Tensor) -> TopKOfLogits:
        return TopKOfLogits(self.logits.at(mask_B_T), self.tokens[mask_B_T.to(self.tokens.device).bool()], self.top_k)

    def chunk(self, start: int, end: int) -> TopK:
        logits_C_V = self.logits.chunk(start, end)
        logq_C_V = torch.log_softmax(logits_C_V.to(torch.promote_types(logits_C_V.dtype, torch.float32)), dim=-1)
        return TopK.of(logq_C_V, self.top_k, self.tokens[start:end])


@dataclass(frozen=True)
class RoutedScores:
    """Several models' scores of disjoint rows of one batch (a mixture's teachers): ``parts``
    pairs each model's rows (indices of the batch, increasing) with its scores of those rows;
    ``rows`` is the batch size. After ``at``, ``parts`` pairs each model's states (indices of
    [S], increasing) with its scores of them. Every part gives the same kind of chunk (logits
    over one vocabulary, or a top-k of one k)."""

    parts: Sequence[tuple[Tensor, DenseScores]]
    rows: int

    def at(self, mask_B_T: Tensor) -> RoutedScores:
        mask_B_T = mask_B_T.cpu().bool()
        state_B_T = (mask_B_T.flatten().cumsum(0) - 1).view_as(mask_B_T)  # each position's index in [S]
        parts = [(state_B_T[rows][mask_B_T[rows]], scores.at(mask_B_T[rows])) for rows, scores in self.parts]
        return RoutedScores(parts, int(mask_B_T.sum()))

    def chunk(self, start: int, end: int) -> Tensor | TopK:
        pieces = []
        for states, scores in self.parts:  # states increase: the chunk's are a contiguous run of each part's
            first, last = (int(torch.searchsorted(states, bound)) for bound in (start, end))
            if last > first:
                pieces.append((states[first:last] - start, scores.chunk(first, last)))
        return _merged(pieces, end - start)


def _merged(pieces: list[tuple[Tensor, Tensor | TopK]], count: int) -> Tensor | TopK:
    """The pieces' rows put in their places of one chunk of ``count`` states."""
    if isinstance(pieces[0][1], TopK):
        return TopK(*(_merged([(at, getattr(piece, name)) for at, piece in pieces], count) for name in TOPK_FIELDS))
    first = pieces[0][1]
    dtype = first.dtype
    for _, piece in pieces:
        dtype = torch.promote_types(dtype, piece.dtype)
    merged = first.new_empty((count, *first.shape[1:]), dtype=dtype)
    for at, piece in pieces:
        merged[at.to(merged.device)] = piece.to(merged.device, dtype)
    return merged
