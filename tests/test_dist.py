"""Data parallelism under torchrun on the CPU: 2 processes with gloo, one thread each."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import FAST_TRAIN, REPO
from transformers import AutoModelForCausalLM

from opdx.metrics import read_metrics

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([*TORCHRUN, *args], cwd=REPO, capture_output=True, text=True, env=ENV)
    if check and result.returncode != 0:
        raise AssertionError(f"torchrun {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def torchrun_killed_at(marker: Path, *args: str) -> None:
    """torchrun ``args`` on 2 ranks, SIGKILLed with its ranks as soon as ``marker`` exists (or after 300 s)."""
    process = subprocess.Popen(
        [*TORCHRUN, *args], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.time() + 300
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.05)
    ranks = psutil.Process(process.pid).children(recursive=True)  # torchrun starts each in its own session
    os.killpg(process.pid, signal.SIGKILL)
    for rank in ranks:
        with contextlib.suppress(psutil.NoSuchProcess):
            rank.kill()
    process.wait()
    psutil.wait_procs(ranks, timeout=60)


@pytest.mark.slow
def test_two_ranks_give_the_one_process_gradient_of_the_whole_batch():
    """For fixed rollouts (distinct prompts; groups sharing a prompt's forward): token_mean with the
    batch baseline, whitening with gamma = 1, the plain loss, the full support (in chunks of 5 states) and
    top-k with gamma = 1, micro-batched on
    each rank; float64, so any normaliser taken per rank or micro-batch would show. A step skipped
    at its second micro-batch leaves nothing in the next. A LoRA student's merged weights, gathered
    from the ranks, are the one-process ones."""
    result = torchrun("tests/dist_gradients.py", "ddp", "fsdp2")  # both in one launch
    for strategy in ("ddp", "fsdp2"):
        for rollout in ("distinct prompts", "groups of 3"):
            assert f"{strategy}, {rollout}: largest gradient difference from one process:" in result.stdout
        assert f"{strategy}, after a skipped step: largest gradient difference from a fresh step:" in result.stdout
        assert f"{strategy}, a LoRA student's merged weights: largest difference from one process:" in result.stdout


def train_metrics(run_dir):
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "perf/"))} for r in read_metrics(run_dir)]


@pytest.mark.slow
def test_torchrun_ddp_and_fsdp2_runs_write_one_run_the_same_way(tmp_path):
    for strategy in ("ddp", "fsdp2"):
        # one sample per prompt: DDP shares a group's prompt forward and FSDP2 cannot, which would
        # round differently (1e-7) and let a sampled token differ a few steps on
        torchrun(
            "-m",
            "opdx",
            "train",
            *FAST_TRAIN,
            "trainer.samples_per_prompt=1",
            "trainer.probe_every=2",  # the probe's sums over FSDP2's shards equal DDP's whole gradients
            f"trainer.strategy={strategy}",
            f"hydra.run.dir={tmp_path / strategy}",
        )
        run_dir = tmp_path / strategy
        assert [r["step"] for r in read_metrics(run_dir)] == [0, 1, 2, 3, 4]
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["final_eval"]["step"] == 4 and summary["skipped_steps"] == 0
        model = AutoModelForCausalLM.from_pretrained(run_dir / "student")
        assert sum(p.numel() for p in model.parameters()) == 100_672
        assert sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(".")) == [
            "checkpoints",
            "cli.log",
            "metrics.jsonl",
            "samples.jsonl",
            "student",
            "summary.json",
        ]
    ddp, fsdp2 = train_metrics(tmp_path / "ddp"), train_metrics(tmp_path / "fsdp2")
    assert [r["step"] for r in ddp if "probe/cosine" in r] == [2, 4]
    for a, b in zip(ddp, fsdp2, strict=True):  # the strategy changes how, not what
        assert a.keys() == b.keys()
        assert [k for k in a if a[k] != pytest.approx(b[k], rel=1e-4, abs=1e-5)] == [], a["step"]
    refused = torchrun("-m", "opdx", "train", *FAST_TRAIN, f"hydra.run.dir={tmp_path / 'none'}", check=False)
    assert refused.returncode != 0 and "torchrun started 2 processes but trainer.strategy=none" in refused.stderr


@pytest.mark.slow
def test_a_self_taught_student_teaches_through_its_sharded_module_as_through_ddp(tmp_path):
    """teacher=self shares the student's model: under FSDP2 it scores (and answers its eval)
    through the trainer's root, which gathers the shards, and gives DDP's run."""
    for strategy in ("ddp", "fsdp2"):
        self_taught = ["teacher=self", "teacher.context=worked", "trainer.samples_per_prompt=1", "trainer.steps=3"]
        torchrun("-m", "opdx", "train", *FAST_TRAIN, *self_taught, f"trainer.strategy={strategy}",
                 f"hydra.run.dir={tmp_path / strategy}")  # fmt: skip
    ddp, fsdp2 = train_metrics(tmp_path / "ddp"), train_metrics(tmp_path / "fsdp2")
    assert len(ddp) == 4 and ddp[1]["div/reverse_kl"] > 0  # the context makes the teacher another distribution
    for a, b in zip(ddp, fsdp2, strict=True):
        assert [k for k in a if a[k] != pytest.approx(b[k], rel=1e-4, abs=1e-5)] == [], a["step"]


@pytest.mark.slow
def test_a_two_rank_run_killed_after_a_checkpoint_resumes_on_one_rank_and_back(tmp_path):
    run_dir = tmp_path / "run"
    args = [*FAST_TRAIN, "trainer.steps=8", "trainer.checkpoint_every=1", "trainer.strategy=ddp"]
    torchrun_killed_at(
        run_dir / "checkpoints/step_000002.sha256", "-m", "opdx", "train", *args, f"hydra.run.dir={run_dir}"
    )
    assert not (run_dir / "summary.json").exists()
    one_rank = ["trainer.steps=4", "trainer.strategy=none"]
    subprocess.run(
        [sys.executable, "-m", "opdx", "train", f"trainer.resume={run_dir}", *one_rank],
        cwd=REPO, env=ENV, check=True, capture_output=True,
    )  # fmt: skip
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(5))
    torchrun("-m", "opdx", "train", f"trainer.resume={run_dir}", "trainer.steps=6", "trainer.strategy=fsdp2")
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(7))
    assert json.loads((run_dir / "summary.json").read_text())["final_eval"]["step"] == 6


@pytest.mark.slow
def test_a_non_finite_step_on_one_rank_is_skipped_by_all(tmp_path):
    """A NaN teacher log-prob on one rank's share: every rank skips the step together (no rank
    waits in a collective), and the run stops for all at trainer.max_bad_steps (1 here; a run
    that goes on after a skipped step: tests/test_trainer.py)."""
    from test_trainer import overflowing_teacher

    teacher = overflowing_teacher(tmp_path / "teacher")
    common = [*FAST_TRAIN, "trainer.steps=12", "trainer.prompts_per_step=16", "eval.n=0", f"model.teacher={teacher}"]
    stopped = torchrun(
        "-m", "opdx", "train", *common, "trainer.strategy=ddp", "trainer.max_bad_steps=1",
        f"hydra.run.dir={tmp_path / 'stop'}", check=False,
    )  # fmt: skip
    assert stopped.returncode != 0 and "1 steps in a row" in stopped.stderr, stopped.stderr[-3000:]
    records = read_metrics(tmp_path / "stop")
    assert [r["train/skipped"] for r in records[1:]] == [0.0] * (len(records) - 2) + [1.0]
    assert records[-1]["nonfinite/teacher_logprobs"] > 0
