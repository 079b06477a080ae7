from opdx.metrics import JsonlLogger, read_metrics, timed
from opdx.samples import read_samples


def test_jsonl_logger_writes_one_record_per_step_and_truncates_on_resume(tmp_path):
    logger = JsonlLogger(tmp_path, {})
    for step in range(5):
        logger.log({"train/loss": float(step)}, step)
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3, 4]
    JsonlLogger(tmp_path, {}, resume_from_step=2)
    assert read_metrics(tmp_path) == [{"step": s, "train/loss": float(s)} for s in range(3)]
    JsonlLogger(tmp_path, {})  # a fresh run in the same directory starts over
    assert read_metrics(tmp_path) == []


def test_sample_rows_are_kept_by_step_and_dropped_after_the_resumed_checkpoint(tmp_path):
    logger = JsonlLogger(tmp_path, {})
    for step in range(4):
        logger.samples([{"split": "train", "response": f"{step}+{i}"} for i in range(2)], step)
    assert [(r["step"], r["response"]) for r in read_samples(tmp_path)][-2:] == [(3, "3+0"), (3, "3+1")]
    JsonlLogger(tmp_path, {}, resume_from_step=1)
    assert [r["step"] for r in read_samples(tmp_path)] == [0, 0, 1, 1]
    JsonlLogger(tmp_path, {})
    assert read_samples(tmp_path) == [] and not (tmp_path / "samples.jsonl").exists()


def test_a_line_cut_short_by_a_kill_is_dropped_and_the_resume_rewrites_the_file(tmp_path):
    logger = JsonlLogger(tmp_path, {})
    for step in range(3):
        logger.log({"train/loss": 0.5}, step)
    with (tmp_path / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 3, "train/lo')  # killed mid-write
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2]
    JsonlLogger(tmp_path, {}, resume_from_step=2)
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 3 and '"train/lo' not in (
        tmp_path / "metrics.jsonl"
    ).read_text().split("\n")[-1]


def test_timed_accumulates_seconds():
    metrics = {}
    with timed(metrics, "rollout"):
        sum(range(1000))
    first = metrics["time/rollout"]
    with timed(metrics, "rollout"):
        sum(range(1000))
    assert 0 < first < metrics["time/rollout"] < 1


def train_with_wandb(run_dir, env, steps=2):
    """`opdx train logger=wandb` as a child process with ``env``."""
    import os
    import subprocess
    import sys

    from conftest import FAST_TRAIN

    args = [*FAST_TRAIN, f"trainer.steps={steps}", "eval.n=0", "logger=wandb", f"hydra.run.dir={run_dir}"]
    return subprocess.Popen(
        [sys.executable, "-m", "opdx", "train", *args],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_wandb_online_without_network_or_key_leaves_training_and_metrics_whole(tmp_path):
    env = {"WANDB_MODE": "online", "WANDB_API_KEY": "", "HOME": str(tmp_path), "WANDB_INIT_TIMEOUT": "10"}
    process = train_with_wandb(tmp_path / "run", env)
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, out
    assert out.count("wandb is down") == 1
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [0, 1, 2]


def test_wandb_dying_mid_run_leaves_training_and_metrics_whole(tmp_path):
    import time

    import psutil

    process = train_with_wandb(tmp_path / "run", {"WANDB_MODE": "offline"}, steps=40)
    deadline = time.time() + 120
    while time.time() < deadline:
        service = [p for p in psutil.Process(process.pid).children(recursive=True) if "wandb" in p.name()]
        if service and len(read_metrics(tmp_path / "run")) > 3:
            service[0].kill()
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the wandb service never started")
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, out
    assert out.count("wandb is down") == 1
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == list(range(41))
