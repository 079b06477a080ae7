import math

import pytest

from opdx.outcome import (
    COLLAPSE_WINDOW,
    accuracy_change,
    collapse_reason,
    collapse_step,
    difference_interval,
    truncation,
    wilson_interval,
)


def test_wilson_interval_by_hand():
    # p = 0.2, n = 10: centre (0.2 + 1.92/10) / 1.384, half 1.96/1.384 * sqrt(0.016 + 0.0096)
    z = 1.959963984540054
    centre = (0.2 + z * z / 20) / (1 + z * z / 10)
    half = z / (1 + z * z / 10) * math.sqrt(0.2 * 0.8 / 10 + z * z / 400)
    assert wilson_interval(0.2, 10) == pytest.approx((centre - half, centre + half))
    assert wilson_interval(0.2, 10) == pytest.approx((0.0567, 0.5098), abs=1e-4)
    assert wilson_interval(0.0, 50)[0] == 0.0 and wilson_interval(0.0, 50)[1] > 0.05  # valid at 0, unlike Wald


def test_newcombe_interval_reproduces_the_published_example():
    """Newcombe (1998), Table II example (a): 56/70 - 48/80, method 10: 0.0524 to 0.3339."""
    low, high = difference_interval(56 / 70, 70, 48 / 80, 80)
    assert (round(low, 4), round(high, 4)) == (0.0524, 0.3339)


def test_accuracy_change_says_whether_a_drop_is_beyond_noise():
    gain = accuracy_change(0.086, 0.249, 1000)
    assert str(gain) == "8.6% → 24.9%, +16.3 points (95% CI +13.1 to +19.5, n=1000)" and not gain.below_start
    assert not accuracy_change(0.086, 0.066, 1000).below_start  # 2 points on 1000 problems: noise
    assert accuracy_change(0.086, 0.0, 1000).below_start
    assert not accuracy_change(0.5, 0.3, 10).below_start  # 20 points on 10 problems: noise too
    with pytest.raises(ValueError, match="n >= 1"):
        accuracy_change(0.1, 0.2, 0)


def steps(count, eos_rate, length, **extra):
    return [{"step": s, "rollout/eos_rate": eos_rate, "rollout/len_mean": length, **extra} for s in range(1, count + 1)]


def test_collapse_needs_its_signature_over_the_last_steps():
    healthy = steps(30, 0.99, 11.7)
    assert collapse_reason(healthy, 24, 0.086, 0.041) is None  # below its start, but not collapsed
    collapsed = healthy + steps(COLLAPSE_WINDOW, 0.004, 23.9)
    assert collapse_reason(collapsed, 24, 0.086, 0.01).startswith("responses stopped ending: EOS rate 0.004")
    recovering = collapsed + steps(COLLAPSE_WINDOW // 2, 0.9, 12.0)
    assert collapse_reason(recovering, 24, 0.086, 0.01) is None  # the window's mean EOS rate is back up
    long_but_ending = steps(30, 0.5, 23.9)
    assert collapse_reason(long_but_ending, 24, 0.086, 0.05) is None
    assert collapse_reason(healthy, 24, 0.086, 0.0) == "accuracy fell to 0 (from 8.6%)"
    assert collapse_reason(healthy, 24, 0.0, 0.0) is None  # it never was above 0
    assert collapse_reason(healthy + steps(1, 1.0, 10.0, **{"train/grad_norm": math.inf}), 24, 0.1, 0.1) == (
        "non-finite metrics"
    )
    assert collapse_reason(healthy, 24, 0.1, math.nan) == "non-finite metrics"


def test_responses_that_never_ended_are_truncation_not_collapse():
    cut_from_the_start = steps(12, 0.0, 16.0)
    assert collapse_reason(cut_from_the_start, 16, 0.0, 0.0) is None
    assert truncation(cut_from_the_start, 16) == (
        "responses never ended (EOS rate 0.000, length 16.0 of 16 over the first step; EOS rate 0.000, length 16.0 "
        "of 16 over the last 10 steps): raise sampling.max_new_tokens"
    )
    ended_then_stopped = steps(1, 0.5, 12.0) + steps(COLLAPSE_WINDOW, 0.01, 15.8)
    assert truncation(ended_then_stopped, 16) is None
    assert collapse_reason(ended_then_stopped, 16, 0.0, 0.0).startswith("responses stopped ending: EOS rate 0.010")
    learned_to_end = steps(1, 0.0, 16.0) + steps(COLLAPSE_WINDOW, 0.9, 9.0)
    assert truncation(learned_to_end, 16) is None and collapse_reason(learned_to_end, 16, 0.0, 0.0) is None
    ended_for_a_while = steps(1, 0.0, 16.0) + steps(COLLAPSE_WINDOW, 0.9, 9.0) + steps(COLLAPSE_WINDOW, 0.0, 16.0)
    assert truncation(ended_for_a_while, 16) is None
    assert collapse_reason(ended_for_a_while, 16, 0.0, 0.0).startswith("responses stopped ending: EOS rate 0.000")
    assert truncation([], 16) is None


def test_a_collapse_begins_at_the_first_step_any_of_its_signatures_holds():
    records = [{"step": 0, "eval/arith/greedy_acc": 0.1, "eval/arith/teacher/greedy_acc": 0.9}]
    records += [
        {"step": s, "rollout/eos_rate": 1.0 if s < 5 else 0.0, "rollout/len_mean": 12.0 if s < 5 else 24.0}
        for s in range(1, 20)
    ]
    assert collapse_step(records, 24, 0.1) == 5  # the first 10-step window without EOS at the limit
    assert collapse_step(records[:14], 24, 0.1) is None  # steps 5-13: no full window yet
    records[3]["train/loss"] = float("nan")
    assert collapse_step(records, 24, 0.1) == 3
    records[2]["eval/arith/greedy_acc"] = 0.0
    assert collapse_step(records, 24, 0.1) == 2
    assert collapse_step(records, 24, 0.0) == 3  # accuracy 0 from the start is no collapse


def test_responses_that_never_ended_are_no_collapse_onset():
    """A run cut by the token limit from its first step on is truncation: its onset is its other
    signature (here the eval at 0 on step 30), not step 1."""
    records = [{"step": 0, "eval/arith/greedy_acc": 0.1}]
    records += [{"step": s, "rollout/eos_rate": 0.0, "rollout/len_mean": 24.0} for s in range(1, 41)]
    records[30]["eval/arith/greedy_acc"] = 0.0
    assert truncation(records, 24) is not None
    assert collapse_step(records, 24, 0.1) == 30
