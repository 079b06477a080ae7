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

from bisect import bisect_left
from collections.abc import Sequence

import torch
from torch import Tensor

from opdx.divergences import Divergence
from opdx.objective import discounted_future_sum


def token_ends(pieces: Sequence[str]) -> list[int]:
    """The character offset at which each of N tokens ends, [N], from the tokens' text pieces in
    order (pieces that concatenate to the decoded text: a byte-level tokenizer's tokens decoded
    one by one can split a character, so its pieces come from its offsets instead)."""
    ends, position = [], 0
    for piece in pieces:
        position += len(piece)
        ends.append(position)
    return ends


def shared_spans(student_ends: Sequence[int], teacher_ends: Sequence[int]) -> tuple[list[int], list[int]]:
    """The span of each of the N student tokens, [N], and of each of the M teacher tokens, [M]
    (0, 1, ...): spans end at the character offsets where both tokenizations end a token, and a
    token belongs to the first span that ends at or after its own end. A token of no text (an
    end-of-sequence token that decodes to "") joins the span its offset ends. ValueError when the
    two tokenizations do not end at the same offset (they are not of one text)."""
    student_length, teacher_length = (ends[-1] if ends else 0 for ends in (student_ends, teacher_ends))
    if student_length != teacher_length:
        raise ValueError(
            f"the two tokenizations end at characters {student_length} and {teacher_length}: not of the same text"
        )
    shared = sorted(set(student_ends) & set(teacher_ends))
    last = max(len(shared) - 1, 0)
    return tuple([min(bisect_left(shared, end), last) for end in ends] for ends in (student_ends, teacher_ends))


def span_sums(values_N: Tensor, spans_N: Sequence[int], count: int) -> Tensor:
    """The sum of ``values_N`` [N] over the tokens of each of ``count`` spans, [J] (differentiable)."""
    index_N = torch.as_tensor(list(spans_N), dtype=torch.long, device=values_N.device)
    return values_N.new_zeros(count).index_add(0, index_N, values_N)


def span_advantages(
    log_u_J: Tensor, divergence: Divergence, unbiased: bool, gamma: float, whole_return: bool = False
) -> Tensor:
    """Each of J spans' advantage, [J] (to be maximised; detached): its own term, w_f(u_j) = -f(u_j)
    + u_j f'(u_j) for OPD+ (``unbiased``) or -f(u_j) for stop-gradient OPD, plus the later spans'
    rewards -f(u_m) discounted by gamma^(m - j) (gamma counts spans, not tokens), and with
    ``whole_return`` (gamma = 1 only) the earlier spans' rewards too: each token's score term then
    carries the whole response's return, which keeps the gradient exact when the teacher's
    tokenization of the text before a token depends on that token (docs/opd-math.md, "Teachers
    with another tokenizer"). ValueError for ``whole_return`` with gamma < 1, which is the
    gradient of no objective."""
    if whole_return and gamma != 1:
        raise ValueError(f"the whole return is the gradient of J_span at gamma = 1 only, not at gamma={gamma}")
    log_u_J = log_u_J.detach()
    rewards_J = divergence.opd_advantage(log_u_J)
    own_J = divergence.unbiased_advantage(log_u_J) if unbiased else rewards_J
    later_J = discounted_future_sum(rewards_J[None], gamma)[0]
    earlier_J = torch.cumsum(rewards_J, 0) - rewards_J if whole_return else torch.zeros_like(rewards_J)
    return own_J + later_J + earlier_J
