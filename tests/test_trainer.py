import json

import pytest
import torch
from conftest import FAST_TRAIN

from opdx.config import TrainerConfig
from opdx.logging import read_metrics
from opdx.trainer import lr_lambda


def test_lr_schedules():
    cosine = lr_lambda(TrainerConfig(steps=10, warmup_steps=2, schedule="cosine"))
    assert [round(cosine(s), 4) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]
    assert lr_lambda(TrainerConfig(steps=10, schedule="linear"))(5) == 0.5
    assert lr_lambda(TrainerConfig(steps=10))(9) == 1.0


def test_smoke_run_writes_metrics_summary_and_checkpoint(opdx_cli, tmp_path):
    opdx_cli("train", *FAST_TRAIN, "divergence=forward_kl", f"hydra.run.dir={tmp_path}")
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    step = records[1]
    for key in (
        "train/loss",
        "train/grad_norm",
        "train/lr",
        "reward/token_mean",
        "adv/mean",
        "adv/std",
        "div/f_mean",
        "div/reverse_kl",
        "div/forward_kl",
        "div/log_u_mean",
        "rollout/len_mean",
        "rollout/eos_rate",
        "time/rollout",
        "time/teacher",
        "time/update",
        "perf/tokens_per_s",
    ):
        assert key in step, key
    assert step["div/f_mean"] == pytest.approx(step["div/forward_kl"], rel=1e-5)  # f = u log u
    assert step["rollout/logprob_mismatch"] < 1e-4
    assert 0 < step["rollout/len_mean"] <= 24 and 0 <= step["rollout/eos_rate"] <= 1
    assert "eval/arith/greedy_acc" in records[2] and "eval/arith/greedy_acc" not in records[3]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["divergence"] == "forward_kl" and summary["estimator"] == "unbiased"
    assert summary["teacher_eval"]["greedy_acc"] > 0.5 > summary["initial_eval"]["greedy_acc"]
    assert summary["final_eval"]["step"] == 4
    assert summary["final_eval"]["greedy_acc"] == records[4]["eval/arith/greedy_acc"]
    assert set(summary["mean_step_time_s"]) == {"rollout", "teacher", "update"}
    assert (tmp_path / ".hydra" / "config.yaml").exists() and (tmp_path / "student" / "config.json").exists()
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 4


def test_killed_run_resumes_to_the_same_metrics(opdx_cli, tmp_path):
    overrides = [*FAST_TRAIN, "trainer.steps=6", "divergence=js", "seed=1"]
    opdx_cli("train", *overrides, f"hydra.run.dir={tmp_path / 'whole'}")
    whole = read_metrics(tmp_path / "whole")

    # a run killed after step 4's checkpoint, with a stray record of step 5 written before the kill
    opdx_cli("train", *overrides, "trainer.steps=4", f"hydra.run.dir={tmp_path / 'killed'}")
    killed = tmp_path / "killed"
    checkpoint = torch.load(killed / "checkpoint.pt", weights_only=False)
    assert checkpoint["step"] == 4
    with (killed / "metrics.jsonl").open("a") as handle:
        handle.write(json.dumps({"step": 5, "train/loss": 123.0}) + "\n")
    (killed / "summary.json").unlink()
    opdx_cli("train", f"trainer.resume={killed}", "trainer.steps=6")
    resumed = read_metrics(killed)
    assert [r["step"] for r in resumed] == [r["step"] for r in whole]
    for a, b in zip(resumed, whole, strict=True):
        for key, value in a.items():
            if not key.startswith(("time/", "perf/")):
                assert value == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["final_eval"] == json.loads((tmp_path / "whole" / "summary.json").read_text())["final_eval"]


def test_resume_without_checkpoint_fails_clearly(opdx_cli, tmp_path):
    result = opdx_cli("train", f"trainer.resume={tmp_path}", check=False)
    assert result.returncode != 0 and "has no checkpoint.pt" in result.stderr


def test_wandb_offline_logs_config_metrics_and_summary(opdx_cli, tmp_path):
    opdx_cli("train", *FAST_TRAIN, "logger=wandb", "experiment=smoke", f"hydra.run.dir={tmp_path}")
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run_id = (tmp_path / "wandb_id.txt").read_text().strip()
    assert runs[0].name.endswith(run_id)
    assert (runs[0] / f"run-{run_id}.wandb").stat().st_size > 1000
    assert len(read_metrics(tmp_path)) == 5
