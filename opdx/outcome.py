"""What happened in a run, read from its own metrics: did it collapse, and did the student's
accuracy change beyond eval noise.

Collapse is judged by its signature, not by a lower score. The OPD+ paper (arXiv 2606.01039,
section 4 and Table 2) describes the collapse of stop-gradient forward KL and JS as responses
that stop ending, run to the length limit and lose all accuracy; a run that merely scores below
its start after a few steps has not collapsed. A run collapsed when any of these holds:

- its rollouts stopped ending: over the last ``COLLAPSE_WINDOW`` logged steps the mean EOS rate
  is below ``EOS_RATE_COLLAPSED`` and the mean response length is at least
  ``LENGTH_AT_LIMIT`` of ``sampling.max_new_tokens``, where the first step's rollouts did end;
- its final eval accuracy is 0 while the initial student's was above 0;
- a training metric (loss, gradient norm, the sampled divergences) or the final eval is not finite.

Rollouts that never ended, the first step's included, are truncation instead (``truncation``):
``sampling.max_new_tokens`` is too small for the task's responses, whatever the training does.

The change in accuracy is reported with a 95% interval for the difference of two proportions on
the same N eval problems: Newcombe's hybrid score interval (Newcombe 1998, method 10, from two
Wilson intervals). It treats the two accuracies as independent, which is conservative for the
same problems scored twice (a paired interval needs per-problem outcomes, which runs do not keep),
and unlike the Wald interval it stays valid at 0% and 100%.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

EOS_RATE_COLLAPSED = 0.05  # responses almost never end ...
LENGTH_AT_LIMIT = 0.95  # ... and almost all run to max_new_tokens
COLLAPSE_WINDOW = 10  # logged steps at the end of the run that the two above average over
Z_95 = 1.959963984540054  # the 97.5% quantile of the standard normal
FINITE_KEYS = ("train/loss", "train/grad_norm", "div/reverse_kl", "div/forward_kl", "div/f_mean")


def wilson_interval(p: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson's score interval of a proportion ``p`` observed on ``n`` trials."""
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class AccuracyChange:
    """The student's accuracy before and after on ``n`` eval problems, and the 95% interval
    [low, high] of after - before (Newcombe's hybrid score interval)."""

    before: float
    after: float
    n: int
    low: float
    high: float

    @property
    def difference(self) -> float:
        return self.after - self.before

    @property
    def below_start(self) -> bool:
        """Worse than the initial student beyond eval noise: the whole interval is below 0."""
        return self.high < 0

    def __str__(self) -> str:
        return (
            f"{100 * self.before:.1f}% → {100 * self.after:.1f}%, {100 * self.difference:+.1f} points "
            f"(95% CI {100 * self.low:+.1f} to {100 * self.high:+.1f}, n={self.n})"
        )


def difference_interval(p1: float, n1: int, p2: float, n2: int, z: float = Z_95) -> tuple[float, float]:
    """Newcombe's hybrid score interval of p1 - p2 for proportions observed on n1 and n2 trials
    (Newcombe 1998, "Interval estimation for the difference between independent proportions", method 10)."""
    low1, high1 = wilson_interval(p1, n1, z)
    low2, high2 = wilson_interval(p2, n2, z)
    difference = p1 - p2
    low = difference - math.sqrt((p1 - low1) ** 2 + (high2 - p2) ** 2)
    high = difference + math.sqrt((high1 - p1) ** 2 + (p2 - low2) ** 2)
    return low, high


def accuracy_change(before: float, after: float, n: int) -> AccuracyChange:
    """after - before on the same ``n`` problems with its 95% interval; ValueError for n < 1."""
    if n < 1:
        raise ValueError(f"an accuracy change needs n >= 1 eval problems, got n={n}")
    return AccuracyChange(before, after, n, *difference_interval(after, n, before, n))


def collapse_reason(
    records: Sequence[Mapping[str, Any]], max_new_tokens: int, initial_acc: float, final_acc: float
) -> str | None:
    """Why the run collapsed by the signature of the module docstring, or None if it did not.
    ``records`` are its metrics.jsonl rows in step order."""
    values = [float(r[k]) for r in records for k in FINITE_KEYS if k in r and r[k] is not None]
    if not all(math.isfinite(v) for v in values) or not math.isfinite(final_acc):
        return "non-finite metrics"
    ending = not_ending(records, max_new_tokens)
    if ending and truncation(records, max_new_tokens) is None:
        return f"responses stopped ending: {ending}"
    if final_acc == 0 and initial_acc > 0:
        return f"accuracy fell to 0 (from {100 * initial_acc:.1f}%)"
    return None


def collapse_step(records: Sequence[Mapping[str, Any]], max_new_tokens: int, initial_acc: float) -> int | None:
    """The first step at which one of the collapse signatures of the module docstring holds
    (``records``: a collapsed run's metrics.jsonl rows, in step order): a training metric not
    finite, the first of ``COLLAPSE_WINDOW`` logged steps whose rollouts do not end, or an eval
    with greedy accuracy 0 where the initial student's was above 0; None if none holds."""
    steps = []
    nonfinite = [r["step"] for r in records if any(not math.isfinite(float(r.get(k) or 0)) for k in FINITE_KEYS)]
    steps += nonfinite[:1]
    rollouts = [r for r in records if "rollout/eos_rate" in r]
    if truncation(records, max_new_tokens) is None:  # responses that never ended are no collapse
        eos = [r["rollout/eos_rate"] for r in rollouts]
        length = [r["rollout/len_mean"] for r in rollouts]
        for i in range(len(rollouts) - COLLAPSE_WINDOW + 1):
            window = slice(i, i + COLLAPSE_WINDOW)
            if ends_not(sum(eos[window]) / COLLAPSE_WINDOW, sum(length[window]) / COLLAPSE_WINDOW, max_new_tokens):
                steps.append(rollouts[i]["step"])
                break
    if initial_acc > 0:
        steps += [r["step"] for r in records if r["step"] > 0 and is_zero_accuracy(r)][:1]
    return min(steps, default=None)


def is_zero_accuracy(record: Mapping[str, Any]) -> bool:
    """Whether a metrics row holds a student eval with greedy accuracy 0."""
    accuracies = [
        v for k, v in record.items() if k.startswith("eval/") and k.endswith("/greedy_acc") and "/teacher/" not in k
    ]
    return bool(accuracies) and max(accuracies) == 0


def not_ending(records: Sequence[Mapping[str, Any]], max_new_tokens: int, first: bool = False) -> str | None:
    """The EOS rate and response length of the last ``COLLAPSE_WINDOW`` logged steps (``first``:
    of the first logged step) where they show responses that do not end (mean EOS rate below
    ``EOS_RATE_COLLAPSED``, mean length at least ``LENGTH_AT_LIMIT`` of ``max_new_tokens``), else None."""
    rollouts = [r for r in records if "rollout/eos_rate" in r]
    rollouts = rollouts[:1] if first else rollouts[-COLLAPSE_WINDOW:]
    if not rollouts:
        return None
    eos_rate = sum(r["rollout/eos_rate"] for r in rollouts) / len(rollouts)
    length = sum(r["rollout/len_mean"] for r in rollouts) / len(rollouts)
    if not ends_not(eos_rate, length, max_new_tokens):
        return None
    steps = "the first step" if first else f"the last {len(rollouts)} steps"
    return f"EOS rate {eos_rate:.3f}, length {length:.1f} of {max_new_tokens} over {steps}"


def ends_not(eos_rate: float, length: float, max_new_tokens: int) -> bool:
    """Whether a window's mean EOS rate and response length are those of responses that do not
    end: EOS rate below ``EOS_RATE_COLLAPSED``, length at least ``LENGTH_AT_LIMIT`` of the limit."""
    return eos_rate < EOS_RATE_COLLAPSED and length >= LENGTH_AT_LIMIT * max_new_tokens


def truncation(records: Sequence[Mapping[str, Any]], max_new_tokens: int) -> str | None:
    """Why the run's responses were cut by the token limit from its first step on, at its end, and
    in every ``COLLAPSE_WINDOW`` steps between (mean EOS rate below ``EOS_RATE_COLLAPSED``): not a
    collapse, a ``sampling.max_new_tokens`` too small for the task; None if they ended at any time."""
    first, last = not_ending(records, max_new_tokens, first=True), not_ending(records, max_new_tokens)
    rates = [r["rollout/eos_rate"] for r in records if "rollout/eos_rate" in r]
    windows = [rates[i : i + COLLAPSE_WINDOW] for i in range(max(1, len(rates) - COLLAPSE_WINDOW + 1))]
    if first is None or last is None or any(sum(w) / len(w) >= EOS_RATE_COLLAPSED for w in windows):
        return None
    return f"responses never ended ({first}; {last}): raise sampling.max_new_tokens"
