import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# One thread per process: the CI machine has 2 cores and tests may spawn training subprocesses.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent

# A few real steps of the tiny pipeline, small enough for CI.
FAST_TRAIN = [
    "trainer.steps=4",
    "trainer.prompts_per_step=4",
    "trainer.samples_per_prompt=2",
    "trainer.eval_every=2",
    "eval.problems=16",
    "eval.n=2",
    "trainer.checkpoint_every=2",
    "runtime.threads=1",
]


def run_opdx(*args: str, cwd: Path = REPO, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "opdx", *args], cwd=cwd, capture_output=True, text=True, env={**os.environ}
    )
    if check and result.returncode != 0:
        raise AssertionError(f"opdx {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture
def opdx_cli():
    return run_opdx


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory):
    """$OPDX_CACHE with the smollm2_135m pair built once per test session (~45 s from GGUF)."""
    cache = tmp_path_factory.mktemp("opdx_cache")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OPDX_CACHE", str(cache))
        run_opdx("prepare", "model=smollm2_135m")
        yield cache / "smollm2_135m"
