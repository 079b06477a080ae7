import json
import math

import pandas as pd
import pytest
from conftest import FAST_TRAIN
from omegaconf import OmegaConf

from opdx.tables import ablation_table, load_runs, mean_ci, plot_main, plot_panels, table_main

FINALS = {  # (divergence, estimator) -> final greedy accuracy of seeds 0, 1, 2
    ("reverse_kl", "stopgrad"): [0.10, 0.20, 0.30],
    ("reverse_kl", "unbiased"): [0.30, 0.40, 0.60],
    ("forward_kl", "stopgrad"): [0.00, 0.00, 0.10],
    ("forward_kl", "unbiased"): [0.50, 0.55, 0.60],
}


def write_run(
    path, divergence, estimator, seed, final, initial=0.08, complete=True, steps=10, eos_rate=1.0, length=12.0,
    loss=1.0, first_step=None,
):  # fmt: skip
    """A run directory as `opdx train` writes it (config, metrics.jsonl, summary.json), with known
    metrics: 24 new tokens at most, 100 eval problems; ``first_step`` overrides step 1's metrics."""
    (path / ".hydra").mkdir(parents=True)
    config = {
        "model": {"name": "tiny"},
        "divergence": {"name": divergence},
        "estimator": {"name": estimator, "gamma": 0.0},
        "benchmark": {"name": "arith"},
        "trainer": {"steps": steps, "lr": 0.001, "max_new_tokens": 24},
        "eval": {"problems": 100},
        "logger": {"name": "jsonl"},
        "seed": seed,
    }
    (path / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
    done = steps if complete else steps // 2
    records = [{"step": 0, "eval/arith/greedy_acc": initial}]
    records += [
        {
            "step": s,
            "train/loss": loss,
            "div/reverse_kl": 3.0 - s / 10,
            "rollout/len_mean": length,
            "rollout/eos_rate": eos_rate,
        }
        for s in range(1, done + 1)
    ]
    records[1] |= first_step or {}
    records[-1]["eval/arith/greedy_acc"] = final
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if complete:
        summary = {
            "initial_eval": {"greedy_acc": initial, "step": 0},
            "final_eval": {"greedy_acc": final, "step": steps},
            "best_eval": {"greedy_acc": max(final, initial), "step": steps},
        }
        (path / "summary.json").write_text(json.dumps(summary))


@pytest.fixture
def sweep(tmp_path):
    for i, ((divergence, estimator), finals) in enumerate(FINALS.items()):
        for seed, final in enumerate(finals):
            write_run(tmp_path / f"{i}_{divergence}_{estimator}_s{seed}", divergence, estimator, seed, final)
    return tmp_path


def test_mean_and_95_ci_by_hand():
    mean, half, n = mean_ci(pd.Series([0.1, 0.2, 0.3]))
    assert (mean, n) == (pytest.approx(0.2), 3)
    assert half == pytest.approx(4.303 * 0.1 / math.sqrt(3), rel=1e-4)  # t_{0.975,2} s / sqrt(n)
    assert math.isnan(mean_ci(pd.Series([0.4]))[1])


def test_table_cells_difference_and_collapse(sweep):
    runs = load_runs([sweep])
    assert len(runs) == 12 and (runs.status == "complete").all()
    assert runs.collapsed.sum() == 2  # forward_kl stopgrad seeds 0 and 1 fall to 0 from 0.08
    assert set(runs[runs.collapsed].collapse) == {"accuracy fell to 0 (from 8.0%)"}
    assert not runs.below_start.any()  # 0.1 against 0.08 on 100 problems is noise
    table, numeric = ablation_table(runs)
    assert table.loc["reverse_kl", ("stopgrad", "final")] == "20.0 ± 24.8"
    assert table.loc["reverse_kl", ("unbiased", "final")] == "43.3 ± 37.9"  # sd 0.1528
    # paired by seed: (0.2, 0.2, 0.3) -> 23.3 ± 4.303 * 0.0577 / sqrt(3)
    assert table.loc["reverse_kl", ("OPD+ − OPD", "final")] == "23.3 ± 14.3"
    assert table.loc["forward_kl", ("stopgrad", "final")] == "3.3 ± 14.3 †2"
    assert numeric.loc["forward_kl", ("unbiased", "final")] == pytest.approx(0.55)


def test_cli_markdown_marks_best_and_reports_incomplete_runs(sweep, capsys):
    write_run(sweep / "crashed", "js", "unbiased", 0, 0.3, complete=False)
    assert table_main([str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "**55.0 ± 12.4**" in out  # forward_kl / unbiased: the best final mean
    assert "12 of 13 runs complete" in out
    assert "incomplete (crashed or running): " in out and "crashed at step 5 of 10\n" in out
    assert "collapsed: " in out
    assert table_main([str(sweep), "--format", "latex"]) == 0
    assert r"\textbf{55.0 ± 12.4}" in capsys.readouterr().out
    assert table_main([str(sweep), "--format", "csv", "--rows", "seed", "--cols", "divergence"]) == 0
    assert capsys.readouterr().out.startswith("seed,")


def test_bad_arguments(sweep, tmp_path, capsys):
    assert table_main([str(sweep), "--rows", "nonsense"]) == 2
    assert "no config key 'nonsense'" in capsys.readouterr().out
    assert table_main([str(tmp_path / "missing")]) == 2
    capsys.readouterr()
    assert table_main([str(sweep), "--metric", "avg@8"]) == 2
    assert "no eval metric 'avg@8' in these runs; logged: arith/greedy_acc, greedy_acc" in capsys.readouterr().out


def test_plot_writes_png_and_svg(sweep, tmp_path):
    assert plot_main([str(sweep), "--out", str(tmp_path / "plots")]) == 0
    png, svg = tmp_path / "plots" / "learning_curves.png", tmp_path / "plots" / "learning_curves.svg"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    text = svg.read_text()
    assert "forward_kl / unbiased (n=3)" in text and "training step" in text


def test_end_to_end_on_a_two_run_multirun(opdx_cli, tmp_path, capsys):
    opdx_cli(
        "train", "-m", "estimator=stopgrad,unbiased", *FAST_TRAIN, "trainer.steps=2", f"hydra.sweep.dir={tmp_path}"
    )
    assert table_main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "2 of 2 runs complete" in out and "forward_kl" in out and "OPD+ − OPD (final)" in out
    assert plot_main([str(tmp_path)]) == 0
    assert (tmp_path / "learning_curves.png").exists()


def test_runs_are_marked_by_what_happened_not_by_a_lower_score(tmp_path, capsys):
    """The issue's cases on 1000 eval problems from a start of 8.6%: a dip within noise is not
    marked, a healthy run below its start beyond noise is marked below (not collapsed), and only
    a collapse signature (no EOS at the length limit, accuracy 0, NaN) marks a collapse; responses
    that never ended, from the first step on, are truncation instead."""
    healthy_start = {"rollout/eos_rate": 1.0, "rollout/len_mean": 12.0}
    cases = {
        "noise": dict(final=0.07, eos_rate=0.99, length=11.7),
        "below": dict(final=0.041, eos_rate=1.0, length=13.5),
        "cut": dict(final=0.08, eos_rate=0.0, length=24.0),
        "no_eos": dict(final=0.02, eos_rate=0.004, length=23.9, steps=20, first_step=healthy_start),
        "zero": dict(final=0.0, eos_rate=0.6, length=20.0),
        "nan": dict(final=0.05, loss=float("nan")),
    }
    for i, (name, metrics) in enumerate(cases.items()):
        write_run(tmp_path / name, "forward_kl", "unbiased", i, initial=0.086, **metrics)
        config = tmp_path / name / ".hydra" / "config.yaml"
        config.write_text(config.read_text().replace("problems: 100", "problems: 1000"))
    runs = load_runs([tmp_path]).set_index("run_dir")
    by_name = {name: runs.loc[str(tmp_path / name)] for name in cases}
    assert [name for name, run in by_name.items() if run.collapsed] == ["no_eos", "zero", "nan"]
    assert [name for name, run in by_name.items() if run.below_start] == ["below"]
    assert (
        by_name["no_eos"].collapse
        == "responses stopped ending: EOS rate 0.004, length 23.9 of 24 over the last 10 steps"
    )
    assert by_name["zero"].collapse == "accuracy fell to 0 (from 8.6%)"
    assert by_name["nan"].collapse == "non-finite metrics"
    assert by_name["below"].change == "8.6% → 4.1%, -4.5 points (95% CI -6.7 to -2.4, n=1000)"
    assert by_name["noise"].change == "8.6% → 7.0%, -1.6 points (95% CI -4.0 to +0.8, n=1000)"
    assert table_main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "†3 ↓1" in out
    assert f"collapsed: {tmp_path / 'no_eos'} (responses stopped ending" in out
    assert by_name["cut"].truncation.startswith("responses never ended (EOS rate 0.000, length 24.0 of 24")
    assert f"truncated, not collapsed: {tmp_path / 'cut'} (responses never ended" in out
    assert f"below the initial student beyond eval noise: {tmp_path / 'below'} (greedy accuracy 8.6% → 4.1%" in out


def test_a_mixtures_components_sit_beside_runs_on_one_of_them(tmp_path, capsys):
    """``--metric products/greedy_acc``: a mixture's products component and a products-only run
    in one table; the plot gets a panel per component."""
    write_run(tmp_path / "products", "forward_kl", "unbiased", 0, final=0.30, initial=0.0)
    write_run(tmp_path / "mixture", "forward_kl", "unbiased", 0, final=0.25, initial=0.05)
    for name, benchmark in (("products", {"name": "products"}), ("mixture", {"name": "mixture", "components": {
        "arith": {"weight": 0.5}, "products": {"weight": 0.5}}})):  # fmt: skip
        config = OmegaConf.load(tmp_path / name / ".hydra" / "config.yaml")
        config.benchmark = benchmark
        (tmp_path / name / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(config))
    summary_path = tmp_path / "mixture" / "summary.json"
    summary = json.loads(summary_path.read_text())
    for stage, arith, products in (("initial", 0.10, 0.0), ("final", 0.30, 0.20), ("best", 0.30, 0.20)):
        summary[f"{stage}_eval"] |= {"arith/greedy_acc": arith, "products/greedy_acc": products}
    summary_path.write_text(json.dumps(summary))
    runs = load_runs([tmp_path]).set_index("benchmark.name")
    assert runs.loc["mixture", "final/products/greedy_acc"] == 0.20
    assert runs.loc["products", "final/products/greedy_acc"] == 0.30  # its greedy_acc, named as a component
    assert (
        table_main([str(tmp_path), "--rows", "benchmark", "--facet", "model", "--metric", "products/greedy_acc"]) == 0
    )
    out = capsys.readouterr().out
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| ")]
    cells = {row[1].strip(): row[2].strip() for row in rows}
    assert cells["mixture"] == "20.0" and cells["products"] == "**30.0**"
    assert (
        "warning: cells pool" not in out
    )  # one run a cell: nothing pooled, though the two differ in their benchmark's keys
    assert [panel[0] for panel in plot_panels(load_runs([tmp_path]))][-2:] == [
        "eval/arith/greedy_acc",
        "eval/products/greedy_acc",
    ]


def test_the_pooling_warning_names_keys_that_differ_within_a_cell(tmp_path, capsys):
    for seed in (0, 1):
        write_run(tmp_path / f"s{seed}", "js", "unbiased", seed, final=0.2)
    config_path = tmp_path / "s1" / ".hydra" / "config.yaml"
    config_path.write_text(config_path.read_text().replace("lr: 0.001", "lr: 0.01"))
    assert table_main([str(tmp_path)]) == 0
    assert "warning: cells pool runs that differ in trainer.lr\n" in capsys.readouterr().out


def test_support_rows_name_top_k_and_the_step_time_is_the_mean_of_the_cells_runs(tmp_path, capsys):
    supports = {"sampled": ({}, [0.2, 0.3]), "topk4": ({"support": "topk", "top_k": 4}, [0.4, 0.6])}
    supports |= {"full": ({"support": "full", "top_k": 16}, [0.5, 0.5])}
    for name, (estimator, finals) in supports.items():
        for seed, final in enumerate(finals):
            path = tmp_path / f"{name}_s{seed}"
            write_run(path, "forward_kl", "unbiased", seed, final)
            config = OmegaConf.load(path / ".hydra" / "config.yaml")
            config.estimator = {**config.estimator, **estimator}
            (path / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(config))
            summary = json.loads((path / "summary.json").read_text())
            summary["mean_step_time_s"] = {"rollout": 0.1 * (seed + 1), "teacher": 0.2, "update": 0.3}
            (path / "summary.json").write_text(json.dumps(summary))
    runs = load_runs([tmp_path])
    assert sorted(set(runs["support"])) == ["full", "sampled", "topk K=4"]
    table, _ = ablation_table(runs, rows="support", step_time=True)
    assert table.at["topk K=4", ("unbiased", "final")] == "50.0 ± 127.1"  # t(1) = 12.706 x 0.1 / sqrt(2)
    assert table.at["full", ("unbiased", "s/step")] == "0.65"  # (0.6 + 0.7) / 2
    assert table_main([str(tmp_path), "--rows", "support", "--step-time"]) == 0
    out = capsys.readouterr().out
    assert "unbiased (s/step)" in out and "warning: cells pool" not in out


def test_a_run_stopped_for_non_finite_steps_says_what_was_not_finite(tmp_path, capsys):
    write_run(tmp_path / "diverged", "forward_kl", "stopgrad", 0, 0.0, complete=False)
    metrics = tmp_path / "diverged" / "metrics.jsonl"
    last = {"step": 6, "train/skipped": 1.0, "nonfinite/advantages": 2.0, "nonfinite/loss": 1.0}
    metrics.write_text(metrics.read_text() + json.dumps(last) + "\n")
    assert table_main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("opdx table: none of the 1 runs is complete")
    assert "diverged at step 6 of 10, whose last step was skipped for non-finite advantages,loss" in out


def test_early_warnings_are_counted_in_the_cells_and_listed_with_the_collapse_they_came_before(tmp_path, capsys):
    """The monitor's rules (the run's own ``monitor`` settings) replayed over its metrics: the EOS
    rate's rolling mean over 2 steps falls to 1/2 of its highest at step 8 (0.3 against 1), one
    step before the rollouts stop ending (the first 10-step window without EOS at the limit)."""
    others = {name: None for name in ("reverse_kl", "ess")}
    monitor = {"window": 2, "eos_rate": 2.0, "clip_fraction": None, **others}
    for name, estimator in (("collapsing", "stopgrad"), ("healthy", "unbiased")):
        write_run(tmp_path / name, "forward_kl", estimator, 0, 0.0 if name == "collapsing" else 0.2, steps=20)
        config_path = tmp_path / name / ".hydra" / "config.yaml"
        config = OmegaConf.load(config_path)
        config.monitor = monitor
        config_path.write_text(OmegaConf.to_yaml(config))
    metrics_path = tmp_path / "collapsing" / "metrics.jsonl"
    records = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    for record in records[1:]:
        step = record["step"]
        record["rollout/eos_rate"] = 1.0 if step <= 6 else 0.3 if step <= 9 else 0.0
        record["rollout/len_mean"] = 12.0 if step <= 6 else 24.0
    metrics_path.write_text("".join(json.dumps(r) + "\n" for r in records))

    runs = load_runs([tmp_path]).set_index("run_dir")
    collapsing, healthy = runs.loc[str(tmp_path / "collapsing")], runs.loc[str(tmp_path / "healthy")]
    assert (collapsing.warnings, collapsing.first_warning, collapsing.collapse_step) == ("eos_rate at step 8", 8, 9)
    assert pd.isna(healthy.warnings) and pd.isna(healthy.first_warning)
    assert table_main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "0.0 †1 ⚠1" in out and "⚠k: k runs with an early warning" in out
    expected = "its collapse began at step 9, 1 step after the first warning"
    assert f"- early warnings: {tmp_path / 'collapsing'} (eos_rate at step 8; {expected})" in out
    assert plot_main([str(tmp_path), "--out", str(tmp_path / "plots")]) == 0  # the marks drawn
