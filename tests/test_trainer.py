import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST_TRAIN

from opdx.config import TrainerConfig
from opdx.metrics import read_metrics
from opdx.trainer import lr_schedule


def lr_factors(**trainer) -> list[float]:
    """The LR factor at steps 0..steps of a trainer config's schedule."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = lr_schedule(optimizer, TrainerConfig(**trainer))
    factors = []
    for _ in range(trainer["steps"] + 1):
        factors.append(round(schedule.get_last_lr()[0], 4))
        optimizer.step()
        schedule.step()
    return factors


def test_lr_schedules():
    """transformers' schedules: the warmup starts from 0 (step / warmup_steps)."""
    cosine = lr_factors(steps=10, warmup_steps=2, schedule="cosine")
    assert [cosine[s] for s in (0, 1, 2, 6, 10)] == [0.0, 0.5, 1.0, 0.5, 0.0]
    assert lr_factors(steps=10, schedule="linear")[5] == 0.5
    assert lr_factors(steps=10)[9] == 1.0
    assert lr_factors(steps=10, warmup_steps=4)[:6] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]


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


def kill_after_first_checkpoint(args: list[str], run_dir: Path) -> int:
    """Start `opdx train`, SIGKILL it as soon as a checkpoint exists; the checkpoint's step."""
    process = subprocess.Popen(
        [sys.executable, "-m", "opdx", "train", *args, f"hydra.run.dir={run_dir}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not (run_dir / "checkpoint.pt").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return torch.load(run_dir / "checkpoint.pt", weights_only=False)["step"]


def test_killed_run_resumes_to_the_same_metrics(opdx_cli, tmp_path):
    overrides = [*FAST_TRAIN, "trainer.steps=12", "divergence=js", "seed=1"]
    opdx_cli("train", *overrides, f"hydra.run.dir={tmp_path / 'whole'}")
    whole = read_metrics(tmp_path / "whole")

    killed = tmp_path / "killed"
    killed_at = kill_after_first_checkpoint(overrides, killed)
    assert killed_at < 12 and not (killed / "summary.json").exists()
    opdx_cli("train", f"trainer.resume={killed}")
    resumed = read_metrics(killed)
    assert [r["step"] for r in resumed] == [r["step"] for r in whole] == list(range(13))
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
    opdx_cli("train", *FAST_TRAIN, "logger=wandb", "logger.group=smoke", f"hydra.run.dir={tmp_path}")
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run_id = (tmp_path / "wandb_id.txt").read_text().strip()
    assert runs[0].name.endswith(run_id)
    # the offline record log holds protobuf records with their strings verbatim
    records = (runs[0] / f"run-{run_id}.wandb").read_bytes()
    for text in (
        "smoke",
        "forward_kl",
        "unbiased",
        "tiny",
        "arith",
        "prompts_per_step",
        "train/loss",
        "eval/arith/greedy_acc",
        "final_eval",
        "teacher_eval",
    ):
        assert text.encode() in records, text  # group, tags, config, metrics, summary
    assert len(read_metrics(tmp_path)) == 5


def test_warped_sampling_uses_the_log_probs_it_sampled_with(opdx_cli, tmp_path):
    warp = ["trainer.temperature=0.8", "trainer.top_k=8"]
    result = opdx_cli("train", *FAST_TRAIN, "trainer.steps=2", "estimator=stopgrad", *warp, f"hydra.run.dir={tmp_path}")
    assert "u = q/p uses the log-probs of that warped distribution" in result.stdout
    records = read_metrics(tmp_path)
    assert all(r["rollout/logprob_mismatch"] < 1e-4 for r in records[1:])
    assert all(abs(r["div/reverse_kl"]) < 50 for r in records[1:])  # q is the raw teacher: never -inf
    refused = opdx_cli("train", "estimator=analytic", *warp, f"hydra.run.dir={tmp_path}", check=False)
    assert refused.returncode != 0 and "estimator=analytic needs the student's own distribution" in refused.stderr


def test_analytic_estimator_trains(opdx_cli, tmp_path):
    opdx_cli(
        "train", *FAST_TRAIN, "trainer.steps=2", "estimator=analytic", "divergence=js", f"hydra.run.dir={tmp_path}"
    )
    records = read_metrics(tmp_path)
    # the analytic loss is the mean over sequences of sum_n JS(p, q)(s_n): positive, below T log 2
    assert all(0 < r["train/loss"] < 24 * 0.6932 for r in records[1:])
    assert all(r["rollout/logprob_mismatch"] < 1e-4 for r in records[1:])
