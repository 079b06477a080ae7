"""Cross-tokenizer OPD: a response scored in spans of text on which both tokenizations agree.

When the teacher's tokenizer differs from the student's, the student's response (its own
tokens) is decoded to text and the teacher scores that text under its own tokenization. The two
token sequences cover the same characters but cut them at different places. The characters at
which both put a token boundary split the text into spans; on a span both models assign a
probability to the same piece of text, so

    log u_j = sum_{teacher tokens m in span j} log q(z_m | z_<m) - sum_{student tokens n in span j} log p(y_n | y_<n)

needs no mapping between vocabularies. Every student token of a span takes the span's advantage
(``span_advantages``): the estimators of docs/opd-math.md with the span as the action. Which of
them is exact for which objective is derived in docs/opd-math.md, "Teachers with another
tokenizer", and proven by ``opdx verify``'s cross-tokenizer table.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from opdx.divergences import Divergence
from opdx.objective import discounted_future_sum


def token_ends(pieces: Sequence[str]) -> list[int]:
    """The character offset at which each token ends, from the tokens' text pieces in order."""
    ends, position = [], 0
    for piece in pieces:
        position += len(piece)
        ends.append(position)
    return ends


def shared_spans(student_ends: Sequence[int], teacher_ends: Sequence[int]) -> tuple[list[int], list[int]]:
    """The span of each student token and of each teacher token (0, 1, ...): spans end at the
    character offsets where both tokenizations end a token. ValueError when the two do not cover
    the same text length (the teacher's tokenization is not of the student's decoded text)."""
    if (student_ends[-1:] or [0]) != (teacher_ends[-1:] or [0]):
        raise ValueError(
            f"the two tokenizations cover {student_ends[-1:] or [0]} and {teacher_ends[-1:] or [0]} characters: "
            "not the same text"
        )
    shared = sorted(set(student_ends) & set(teacher_ends))

    def spans_of(ends: Sequence[int]) -> list[int]:
        span, spans = 0, []
        for end in ends:
            spans.append(span)
            span += end == shared[span]
        return spans

    return spans_of(student_ends), spans_of(teacher_ends)


def span_sums(values_N: Tensor, spans_N: Sequence[int], count: int) -> Tensor:
    """The sum of ``values_N`` over the tokens of each of ``count`` spans, [J] (differentiable)."""
    index_N = torch.as_tensor(list(spans_N), dtype=torch.long, device=values_N.device)
    return values_N.new_zeros(count).index_add(0, index_N, values_N)


def span_advantages(
    log_u_J: Tensor, divergence: Divergence, unbiased: bool, gamma: float, whole_return: bool = False
) -> Tensor:
    """Each span's advantage, [J] (to be maximised; detached): its own term, w_f(u_j) = -f(u_j) +
    u_j f'(u_j) for OPD+ (``unbiased``) or -f(u_j) for stop-gradient OPD, plus the later spans'
    rewards -f(u_m) discounted by gamma^(m - j), and with ``whole_return`` the earlier spans'
    rewards too (undiscounted: at gamma = 1 the score term of each token then carries the whole
    response's return, which keeps the gradient exact when a span's boundary depends on text
    after it)."""
    log_u_J = log_u_J.detach()
    rewards_J = divergence.opd_advantage(log_u_J)
    own_J = divergence.unbiased_advantage(log_u_J) if unbiased else rewards_J
    later_J = discounted_future_sum(rewards_J[None], gamma)[0]
    earlier_J = torch.cumsum(rewards_J, 0) - rewards_J if whole_return else torch.zeros_like(rewards_J)
    return own_J + later_J + earlier_J
