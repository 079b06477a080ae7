import pytest

from opdx.config import ConfigError, MonitorConfig
from opdx.monitor import SIGNALS, Monitor, advantage_extreme, replay

ALL_OFF = {signal.name: None for signal in SIGNALS}


def rows(key: str, values: list[float]) -> list[dict]:
    return [{"step": step, key: value} for step, value in enumerate(values, start=1)]


def only(**settings) -> MonitorConfig:
    return MonitorConfig(**(ALL_OFF | settings))


def test_a_rise_warns_at_the_first_step_its_rolling_mean_reaches_the_factor_of_its_lowest():
    # window 2: rolling means 2, 1.5, 1 (the lowest), 1, 1.5, 2.5, 3.5; 2.5 / 1 = 2.5 >= 2 at step 7
    records = rows("div/reverse_kl", [2, 2, 1, 1, 1, 2, 3, 4])
    warnings = replay(records, only(window=2, reverse_kl=2.0))
    assert [(w.signal, w.step) for w in warnings] == [("reverse_kl", 7)]
    assert "2.50x its lowest so far, 1;" in warnings[0].text and "monitor.reverse_kl=2" in warnings[0].text
    assert [w.step for w in replay(records, only(window=2, reverse_kl=3.0))] == [8]  # 3.5 / 1


def test_a_fall_warns_against_its_highest_and_a_level_rule_against_its_value():
    eos = replay(rows("rollout/eos_rate", [0.9, 1.0, 0.8, 0.5, 0.3, 0.1]), only(window=2, eos_rate=2.0))
    # rolling means .95, .9, .65, .4 (the highest .95 / .4 = 2.4 at step 5)
    assert [w.step for w in eos] == [5]
    ess = replay(rows("rollout/importance_ess", [1.0, 0.9, 0.5, 0.3, 0.2]), only(window=2, ess=0.5))
    assert [w.step for w in ess] == [4]  # (0.5 + 0.3) / 2 = 0.4 < 0.5; (0.9 + 0.5) / 2 = 0.7 is not


def test_each_signal_fires_once_and_a_null_setting_or_a_missing_metric_is_silent():
    records = rows("train/grad_norm", [1, 1, 30, 30, 30, 1, 1, 50, 50])
    assert [w.step for w in replay(records, only(window=1, grad_norm=10.0))] == [3]
    assert replay(records, only(window=1)) == []
    assert replay(rows("div/forward_kl", [1, 5, 9]), only(window=1, reverse_kl=2.0)) == []


def test_a_fall_to_zero_warns_and_a_rise_is_measured_from_the_floor_at_least():
    """An EOS rate that drops straight to 0 is the collapse's signature: an infinite factor. A KL
    near 0, or below it by noise, is no scale: the rise is measured from the floor (0.1 nats)."""
    eos = replay(rows("rollout/eos_rate", [1, 1, 0, 0]), only(eos_rate=1.5))
    assert [w.step for w in eos] == [3] and "down to 0 from its highest so far, 1" in eos[0].text
    kl = rows("div/reverse_kl", [0.01, -0.02, 0.15, 0.2, 0.5])
    warnings = replay(kl, only(reverse_kl=1.75))
    assert [w.step for w in warnings] == [4]  # 0.2 / 0.1 = 2; 0.15 / 0.1 = 1.5 is not
    assert "2.00x the floor (its lowest so far is below it), 0.1" in warnings[0].text
    assert replay(rows("rollout/eos_rate", [0, 0, 0]), only(eos_rate=1.5)) == []  # never above 0: it cannot fall


def test_the_advantage_signal_is_the_largest_magnitude_of_either_end():
    assert advantage_extreme({"adv/min": -7.0, "adv/max": 3.0}) == 7.0
    assert advantage_extreme({"adv/min": -1.0}) is None


@pytest.mark.parametrize("split", [1, 3, 5, 7])
def test_a_monitor_restored_from_its_state_warns_where_the_uninterrupted_one_does(split):
    """What a resumed run relies on: the state kept in the checkpoint continues the rules exactly."""
    records = [
        {"step": s, "div/reverse_kl": 1 + s * s / 10, "rollout/eos_rate": 1 - s / 10, "train/grad_norm": 2.0**s}
        for s in range(1, 10)
    ]
    config = MonitorConfig(window=3, grad_norm=8.0)
    whole = Monitor(config)
    expected = [whole.update(r["step"], r) for r in records]
    first = Monitor(config)
    got = [first.update(r["step"], r) for r in records[:split]]
    resumed = Monitor(config, first.to_dict())
    got += [resumed.update(r["step"], r) for r in records[split:]]
    assert got == expected
    assert {w.signal for _, fired in expected for w in fired} == {"reverse_kl", "eos_rate", "grad_norm"}


def test_the_logged_metrics_are_the_factor_or_the_level_and_the_warning_flag():
    monitor = Monitor(only(window=2, reverse_kl=2.0, ess=0.5))
    assert monitor.update(1, {"div/reverse_kl": 1.0, "rollout/importance_ess": 0.3})[0] == {}  # window not full
    logged, fired = monitor.update(2, {"div/reverse_kl": 3.0, "rollout/importance_ess": 0.3})
    assert logged == {"monitor/reverse_kl": 1.0, "monitor/ess": pytest.approx(0.3), "warning/ess": 1.0}
    assert [w.signal for w in fired] == ["ess"]
    assert str(fired[0]).startswith("warning at step 2: importance-weight ESS fraction 0.3 over the last 2 steps")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"window": 0}, "monitor.window=0 is invalid"),
        ({"grad_norm": 0.5}, "monitor.grad_norm=0.5 is invalid; use a factor above 1"),
        ({"ess": 1.5}, "monitor.ess=1.5 is invalid; use a fraction in (0, 1) or null"),
    ],
)
def test_bad_settings_are_refused_by_name(settings, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        MonitorConfig(**settings)
