"""The loop state a checkpoint holds, and the run summary made from it."""

import json

import pytest
from hydra import compose, initialize_config_dir

from opdx.config import CONF_DIR, register_resolvers, register_schema
from opdx.run import validate
from opdx.summary import LoopState, components_table, make_summary, print_summary

register_schema()
register_resolvers()


def test_the_loop_state_round_trips_and_reads_the_dicts_of_earlier_checkpoints():
    state = LoopState(elapsed=3.5, skipped_steps=1, teacher_eval={"greedy_acc": 0.9})
    assert LoopState.from_dict(state.to_dict()) == state
    earlier = {"elapsed": 1.0, "skipped_steps": 0, "bad_streak": 0, "teacher_eval": {"greedy_acc": 0.9},
               "initial_eval": {"greedy_acc": 0.1, "step": 0}, "best_eval": {"greedy_acc": 0.1, "step": 0}}  # fmt: skip
    restored = LoopState.from_dict(earlier)  # saved before the first eval after step 0: no final_eval key
    assert restored.final_eval is None and restored.initial_eval == {"greedy_acc": 0.1, "step": 0}
    with pytest.raises(ValueError, match=r"unknown keys \['mystery'\]"):
        LoopState.from_dict({**earlier, "mystery": 1})


def test_the_summary_reads_the_run_metrics_and_judges_the_change(tmp_path, capsys):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        config = validate(compose(config_name="config", overrides=["trainer.steps=2"])).config
    records = [{"step": s, "time/rollout": 1.0, "time/teacher": 2.0, "time/update": float(s), "rollout/eos_rate": 1.0,
                "rollout/len_mean": 5.0, "train/loss": 0.1} for s in (1, 2)]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    state = LoopState(elapsed=12.34, teacher_eval={"greedy_acc": 0.9}, initial_eval={"greedy_acc": 0.1, "step": 0})
    state.best_eval = state.final_eval = {"greedy_acc": 0.3, "step": 2}
    names = {"divergence": "forward_kl", "estimator": "unbiased", "benchmark": "arith"}
    summary = make_summary(config, names, state, tmp_path, eval_problems=1000)
    assert summary["mean_step_time_s"] == {"rollout": 1.0, "teacher": 2.0, "update": 1.5}
    assert summary["wall_time_s"] == 12.3 and summary["collapse"] is None and not summary["below_start"]
    assert summary["greedy_acc_change"]["difference"] == pytest.approx(0.2)
    assert summary["greedy_acc_change"]["ci95"][0] > 0  # 10% -> 30% of 1000 problems: beyond noise
    assert summary["support"] == "sampled"
    print_summary(summary | {"support": "topk"})
    assert "forward_kl / unbiased (topk support) on arith, 2 steps:" in capsys.readouterr().out


def test_components_table_has_a_row_per_component_or_none():
    results = {"teacher": {"greedy_acc": 0.9, "a/greedy_acc": 0.8, "b/greedy_acc": 1.0}, "student": {"greedy_acc": 0.1}}
    table = components_table(results)
    assert list(table.index) == ["a", "b"] and table.loc["b", "teacher"] == 1.0
    assert components_table({"teacher": {"greedy_acc": 0.9}}) is None
