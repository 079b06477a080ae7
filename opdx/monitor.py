"""Early warnings: signs in a run's step metrics that come before a collapse (``monitor.*``).

The OPD+ paper (arXiv 2606.01039, section 4 and Table 2) shows stop-gradient forward KL and JS
collapsing: the responses stop ending or shrink to a token, and the accuracy falls to 0. An
independent replication saw the gradient norm (1,942 with stop-gradient forward KL against 13.8
with OPD+) and the sampled divergence to the teacher rise before the accuracy fell. Each signal
here is the mean of one step metric over the last ``monitor.window`` steps, and its rule compares
that rolling mean with where it has been in the run:

- ``drift``: the rolling mean has moved by a factor of at least the signal's setting from its
  best so far: the lowest rolling mean for a signal whose rise is bad, the highest for one whose
  fall is bad. It is a change-point rule with the run's own best as the reference, so it needs no
  scale per task; it starts once the first window is full. A rise is measured from the lowest
  value or the signal's ``floor``, whichever is larger (a sampled KL near 0, or below it by
  noise, is no scale to multiply); a fall to 0 is an infinite factor.
- ``level``: the rolling mean is beyond a fixed value (the signal's setting), for quantities that
  have a scale of their own (fractions).

A warning fires once per signal, at the first step its rule holds; null turns a signal off. The
rules read only metrics every rank has after the step's reductions, so every rank of a torchrun
launch takes the same decisions. Their state goes into each checkpoint (``Monitor.to_dict``), so
a resumed run warns where the uninterrupted one would; ``replay`` runs the same rules over a
finished run's metrics.jsonl.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from opdx.config import MonitorConfig


def advantage_extreme(metrics: Mapping[str, Any]) -> float | None:
    """The largest |advantage| of the step's response tokens: max(|adv/min|, |adv/max|)."""
    if "adv/min" not in metrics or "adv/max" not in metrics:
        return None
    return max(abs(metrics["adv/min"]), abs(metrics["adv/max"]))


def metric(key: str) -> Callable[[Mapping[str, Any]], float | None]:
    """The reader of one step metric by its key (None where the step did not log it)."""
    return lambda metrics: metrics.get(key)


@dataclass(frozen=True)
class Signal:
    """One monitored quantity: its ``name`` (the ``monitor.<name>`` setting and the
    ``monitor/<name>`` metric), how it is ``read`` from a step's metrics (None: not this step),
    whether it is bad when it ``rises`` (else when it falls), its ``rule`` (drift or level), what
    it is in words, and for a rising drift the ``floor`` its factor is measured from at least (in
    the metric's units)."""

    name: str
    read: Callable[[Mapping[str, Any]], float | None]
    rises: bool
    rule: str
    what: str
    floor: float = 0.0


KL_FLOOR = 0.1  # nats per token: below it the student is as good as the teacher; a rise from there is no alarm
SIGNALS = (
    Signal("eos_rate", metric("rollout/eos_rate"), False, "drift", "EOS rate"),
    Signal("length_rise", metric("rollout/len_mean"), True, "drift", "response length", floor=1.0),
    Signal("length_fall", metric("rollout/len_mean"), False, "drift", "response length"),
    Signal("grad_norm", metric("train/grad_norm"), True, "drift", "gradient norm (before clipping)", floor=1e-8),
    Signal("advantage", advantage_extreme, True, "drift", "largest |advantage|", floor=1e-8),
    Signal("reverse_kl", metric("div/reverse_kl"), True, "drift", "sampled reverse KL(p||q) per token", KL_FLOOR),
    Signal("forward_kl", metric("div/forward_kl"), True, "drift", "sampled forward KL(q||p) per token", KL_FLOOR),
    Signal("ess", metric("rollout/importance_ess"), False, "level", "importance-weight ESS fraction"),
    Signal("clip_fraction", metric("div/log_ratio_clip_fraction"), True, "level", "log-ratio clip fraction"),
)


@dataclass(frozen=True)
class EarlyWarning:
    """A fired rule: the ``signal``, the ``step`` it fired at, and what it saw (``text``)."""

    signal: str
    step: int
    text: str

    def __str__(self) -> str:
        return f"warning at step {self.step}: {self.text}"


class Monitor:
    """The rules of the module docstring over a run's steps, fed one step at a time (``update``).

    ``state`` is what ``to_dict`` returned at a checkpoint (None: a new run)."""

    def __init__(self, config: MonitorConfig, state: Mapping[str, Any] | None = None) -> None:
        self.config = config
        saved = state or {}
        self.windows: dict[str, list[float]] = {k: list(v) for k, v in saved.get("windows", {}).items()}
        self.best: dict[str, float] = dict(saved.get("best", {}))
        self.fired: dict[str, int] = dict(saved.get("fired", {}))

    def to_dict(self) -> dict[str, Any]:
        """The state a checkpoint keeps (plain Python values)."""
        return {"windows": self.windows, "best": self.best, "fired": self.fired}

    def update(self, step: int, metrics: Mapping[str, Any]) -> tuple[dict[str, float], list[EarlyWarning]]:
        """Step ``step``'s metrics in; out: ``monitor/<signal>`` for each signal with a full window
        (a drift rule's factor from its best, >= 1 once it has moved the bad way; a level rule's
        rolling mean), ``warning/<signal>`` 1 where one fires now, and the warnings fired now."""
        logged: dict[str, float] = {}
        fired: list[EarlyWarning] = []
        for signal in SIGNALS:
            threshold = getattr(self.config, signal.name)
            value = signal.read(metrics)
            if threshold is None or value is None or not math.isfinite(value):
                continue
            window = self.windows.setdefault(signal.name, [])
            window.append(float(value))
            del window[: -self.config.window]
            if len(window) < self.config.window:
                continue
            mean = sum(window) / len(window)
            if signal.rule == "level":
                logged[f"monitor/{signal.name}"] = mean
                beyond = mean > threshold if signal.rises else mean < threshold
                detail = f"{'above' if signal.rises else 'below'} monitor.{signal.name}={threshold:g}"
            else:
                best = self.best.get(signal.name, mean)
                best = min(best, mean) if signal.rises else max(best, mean)
                self.best[signal.name] = best
                if signal.rises:
                    reference = max(best, signal.floor)
                    factor = mean / reference
                elif best <= 0:  # never above 0: it cannot fall
                    continue
                else:
                    reference = best
                    factor = best / mean if mean > 0 else math.inf
                if math.isfinite(factor):  # a fall to 0 warns but logs no factor (JSON has no infinity)
                    logged[f"monitor/{signal.name}"] = factor
                beyond = factor >= threshold
                best_so_far = f"its {'lowest' if signal.rises else 'highest'} so far"
                measured = best_so_far if reference == best else f"the floor ({best_so_far} is below it)"
                moved = f"{factor:.2f}x" if math.isfinite(factor) else "down to 0 from"
                detail = f"{moved} {measured}, {reference:.4g}; monitor.{signal.name}={threshold:g}"
            if beyond and signal.name not in self.fired:
                self.fired[signal.name] = step
                logged[f"warning/{signal.name}"] = 1.0
                over = f" over the last {len(window)} steps" if len(window) > 1 else ""
                text = f"{signal.what} {mean:.4g}{over} ({detail})"
                fired.append(EarlyWarning(signal.name, step, text))
        return logged, fired


def replay(records: Iterable[Mapping[str, Any]], config: MonitorConfig) -> list[EarlyWarning]:
    """Every warning the rules of ``config`` fire over a run's metrics.jsonl rows (in step order)."""
    monitor = Monitor(config)
    return [warning for record in records for warning in monitor.update(record["step"], record)[1]]
