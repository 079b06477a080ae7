import pytest
import torch

from opdx.divergences import get_divergence
from opdx.spans import shared_spans, span_advantages, span_sums, token_ends


def test_spans_end_where_both_tokenizations_end_a_token():
    # "abab": the student's pieces a|ba|b, the teacher's ab|ab: both end a token at 4 only
    student, teacher = token_ends(["a", "ba", "b"]), token_ends(["ab", "ab"])
    assert (student, teacher) == ([1, 3, 4], [2, 4])
    assert shared_spans(student, teacher) == ([0, 0, 0], [0, 0])
    # "abc": a|b|c against ab|c: spans "ab" and "c"
    assert shared_spans([1, 2, 3], [2, 3]) == ([0, 0, 1], [0, 1])
    with pytest.raises(ValueError, match="end at characters 3 and 2: not of the same text"):
        shared_spans([1, 2, 3], [2])


def test_a_token_of_no_text_joins_the_span_its_offset_ends():
    """An end-of-sequence token that decodes to "" (at the end, or alone) and one in the middle."""
    assert shared_spans([1, 2, 2], [1, 2]) == ([0, 1, 1], [0, 1])
    assert shared_spans([0], []) == ([0], [])
    assert shared_spans([1, 1, 2], [1, 2]) == ([0, 0, 1], [0, 1])


def test_span_sums_add_each_spans_tokens():
    values = torch.tensor([1.0, 2.0, 4.0, 8.0], requires_grad=True)
    sums = span_sums(values, [0, 0, 1, 2], 3)
    assert sums.tolist() == [3.0, 4.0, 8.0]
    sums.sum().backward()
    assert values.grad.tolist() == [1.0] * 4


def test_span_advantages_are_the_token_estimators_with_spans_for_tokens():
    """Own term -f(u) (stop-gradient) or w_f(u) (OPD+), later rewards discounted by gamma^(m-j),
    and with the whole return the earlier rewards too."""
    js = get_divergence("js")
    log_u = torch.tensor([-1.0, 0.5, -2.0], dtype=torch.float64)
    reward, own = js.opd_advantage(log_u), js.unbiased_advantage(log_u)
    gamma = 0.5
    causal = span_advantages(log_u, js, unbiased=True, gamma=gamma)
    expected = [own[0] + gamma * reward[1] + gamma**2 * reward[2], own[1] + gamma * reward[2], own[2]]
    torch.testing.assert_close(causal, torch.stack(expected))
    torch.testing.assert_close(span_advantages(log_u, js, unbiased=False, gamma=0.0), reward)
    whole = span_advantages(log_u, js, unbiased=True, gamma=1.0, whole_return=True)
    torch.testing.assert_close(whole, own - reward + reward.sum())
    torch.testing.assert_close(span_advantages(log_u, js, False, 1.0, whole_return=True), reward.sum().expand(3))
    with pytest.raises(ValueError, match="at gamma = 1 only, not at gamma=0.5"):
        span_advantages(log_u, js, unbiased=True, gamma=0.5, whole_return=True)
