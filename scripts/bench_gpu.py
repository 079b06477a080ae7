"""One OPD step on a GPU, split and rated: rollout tokens/s, teacher and update MFU, peak memory,
for opdx's ``train_step`` with ``rollout=hf`` on the dynamic cache, then on the static one (which
transformers compiles on GPUs), or with ``--rollout vllm`` on a vLLM engine (one row), then TRL's
``DistillationTrainer`` on the same batches when TRL is importable.

    python scripts/bench_gpu.py                          # Qwen3-shaped 1.7B teacher, 0.6B student, bf16
    python scripts/bench_gpu.py --prompts 16 --prompt-tokens 256 --new-tokens 3840 \
        --steps 2 --warmup 1                             # 4k-token rows, near the qwen3 files' length (GPU)
    python scripts/bench_gpu.py --rollout vllm --prompts 16 --prompt-tokens 256 --new-tokens 3840 \
        --steps 2 --warmup 1                             # the same on a vLLM engine (pip install vllm)
    python scripts/bench_gpu.py --size small --device cpu --prompts 4 --prompt-tokens 16 --new-tokens 8 \
        --steps 1 --warmup 0                             # the same code on a CPU, in seconds

The default 128 + 256 tokens per row is short: run a 2k-4k-token shape (above) to see what long
rollouts cost (the cache's copies, compiled shapes, micro-batches, the engine's share).

The models are random-weight Qwen3 models built from their configs (SDPA attention), directly on
``--device``, with a word-level tokenizer of their vocabulary size built here, so nothing is
downloaded; a random model almost never samples EOS, so every response runs the full
``--new-tokens``. Prompts are ``--prompt-tokens`` random tokens.

MFU is FLOPs over seconds against ``--peak-tflops`` (989: an H100/H200's dense bf16). One forward
over a row of N tokens costs 2 x parameters x N FLOPs (a multiply-add per weight per token) plus
causal attention, layers x 2 x 2 x heads x head_dim x N^2 / 2 (QK^T and AV, each N x N x head_dim
multiply-adds per head, half of them under the causal mask); N is ``--prompt-tokens`` plus the
mean sampled response per row (every row's full length with random weights). The teacher's MFU
counts one forward per row, the update's three (forward and backward). A group's shared prompt
(``--samples`` > 1) is counted in every row, the work TRL does, so sharing shows as MFU above what
the hardware ran.

On a machine with torch and transformers but without opdx's other dependencies and no registry,
carry the wheel folder of ``scripts/gpu_smoke.sh --fetch`` and run this with
``PYTHONPATH=.gpu_site:.`` once ``gpu_smoke.sh`` has installed it (docs/gpu.md).
"""

from __future__ import annotations

import argparse
import gc
import random
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from bench_step import PHASES, Timing, bench_trl, compose_run, time_steps
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from opdx.benchmarks import Problem, SingleComponent
from opdx.plan import model_shape
from opdx.run import start
from opdx.trainer import build_learner

# Qwen3-1.7B and Qwen3-0.6B's shapes (their config.json), and a small pair for a CPU check
SIZES = {
    "qwen3": (
        dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16),
        dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16),
        151_936,
    ),
    "small": (
        dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4),
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2),
        512,
    ),
}


@dataclass
class Synthetic(SingleComponent):
    """Random-token prompts as a benchmark (nothing is graded here)."""

    train: list[Problem]
    eval: list[Problem]
    name: str = "synthetic"

    def score(self, problem: Problem, response: str) -> float:
        return 0.0


def build_pair(size: str, directory: Path, dtype: torch.dtype, device: str, positions: int) -> tuple[Path, Path, int]:
    """Random-weight teacher and student directories of ``size`` sharing a word-level tokenizer,
    with ``positions`` positions (prompt + response), each model initialised on ``device``."""
    teacher_shape, student_shape, vocab = SIZES[size]
    # special tokens named apart from the words: a special "t1" would also match inside "t135"
    words = {"<pad>": 0, "<eos>": 1, "<unk>": 2} | {f"t{i}": i for i in range(3, vocab)}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="<unk>")), eos_token="<eos>", pad_token="<pad>"
    )
    tokenizer._tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    paths = []
    for role, shape in (("teacher", teacher_shape), ("student", student_shape)):
        config = Qwen3Config(
            **shape,
            num_key_value_heads=8 if size == "qwen3" else shape["num_attention_heads"],
            head_dim=128 if size == "qwen3" else 32,
            vocab_size=vocab,
            max_position_embeddings=positions,
            tie_word_embeddings=True,
            eos_token_id=1,
            pad_token_id=0,
            attn_implementation="sdpa",
        )
        torch.manual_seed(0)
        with torch.device(device):
            model = Qwen3ForCausalLM(config).to(dtype)
        paths.append(directory / role)
        model.save_pretrained(paths[-1])
        tokenizer.save_pretrained(paths[-1])
        del model
    return paths[0], paths[1], vocab


@dataclass(frozen=True)
class ModelSize:
    """What a forward of a model costs: its parameters, and layers x heads x head_dim for attention."""

    parameters: int
    attention_width: int

    def forward_flops(self, rows: int, positions: float) -> float:
        """FLOPs of one forward over ``rows`` sequences of N = ``positions`` tokens: per row,
        2 x parameters x N (a multiply-add per weight per token) plus causal attention,
        layers x 2 x 2 x heads x head_dim x N^2 / 2 (QK^T and AV, N x N x head_dim multiply-adds
        each per head, half of them under the causal mask)."""
        return rows * (2 * self.parameters * positions + 2 * self.attention_width * positions**2)


def model_size(path: Path) -> ModelSize:
    shape = model_shape(str(path))  # parameters counted on the meta device
    return ModelSize(shape.parameters, shape.layers * shape.heads * shape.head_dim)


def rate(timing: Timing, batch: int, prompt_tokens: int, sizes: tuple[ModelSize, ModelSize], peak_tflops: float) -> str:
    """One row: rollout tokens/s, teacher and update MFU (the teacher's one forward and the
    student's forward and backward, 3 forwards, over ``batch`` rows of N = ``prompt_tokens`` + the
    mean sampled tokens per row; ``ModelSize.forward_flops``), step split and peak memory."""
    teacher, student = sizes
    positions = prompt_tokens + timing.tokens / batch
    peak_flops = peak_tflops * 1e12
    teacher_mfu = teacher.forward_flops(batch, positions) / timing.phases["teacher"] / peak_flops
    update_mfu = 3 * student.forward_flops(batch, positions) / timing.phases["update"] / peak_flops
    split = ", ".join(f"{phase} {timing.phases[phase]:.2f} s" for phase in PHASES)
    return (
        f"{timing.tool:<22} rollout {timing.tokens / timing.phases['rollout']:8.0f} tok/s | teacher MFU "
        f"{100 * teacher_mfu:5.1f}% | update MFU {100 * update_mfu:5.1f}% | step {timing.step:.2f} s ({split}) "
        f"| peak {timing.peak_mib / 1024:.1f} GiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=list(SIZES), default="qwen3")
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--rollout", choices=("hf", "vllm"), default="hf", help="hf: both generate caches; vllm: a vLLM engine"
    )
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument(
        "--samples", type=int, default=1, help="samples per prompt (a group shares its prompt's forward)"
    )
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument(
        "--new-tokens", type=int, default=256, help="e.g. 3840 with --prompt-tokens 256: 4k-token rows (on a GPU)"
    )
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (the static cache compiles)")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    positions = args.prompt_tokens + args.new_tokens
    teacher, student, vocab = build_pair(args.size, directory, getattr(torch, args.dtype), args.device, positions)
    sizes = (model_size(teacher), model_size(student))
    overrides = [
        f"model.teacher={teacher}",
        f"model.student={student}",
        f"model.dtype={args.dtype}",
        f"model.teacher_dtype={args.dtype}",
        f"runtime.device={args.device}",
        f"rollout={args.rollout}",
        f"trainer.prompts_per_step={args.prompts}",
        f"trainer.samples_per_prompt={args.samples}",
        f"sampling.max_new_tokens={args.new_tokens}",
        "trainer.gradient_checkpointing=false",
    ]
    words = random.Random(0)
    problems = [
        Problem(" ".join(f"t{words.randrange(3, vocab)}" for _ in range(args.prompt_tokens)), "") for _ in range(512)
    ]
    run = replace(compose_run(overrides, None), benchmark=Synthetic(problems, problems[:8]))
    print(
        f"{args.size}: teacher {sizes[0].parameters / 1e9:.2f}B, student {sizes[1].parameters / 1e9:.2f}B "
        f"parameters, {args.dtype}, "
        f"{args.prompts} prompts x {args.samples} samples x ({args.prompt_tokens} prompt + {args.new_tokens} new) "
        "tokens, on "
        f"{torch.cuda.get_device_name() if args.device.startswith('cuda') else args.device}"
    )
    parts = start(run)
    learner = build_learner(run, parts)
    for cache in ("dynamic", "static") if args.rollout == "hf" else ("",):
        if cache:
            parts.rollout.cache = cache
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        timing = time_steps(learner, args.warmup, args.steps, tool=f"opdx rollout={args.rollout} {cache}".rstrip())
        print(rate(timing, args.prompts * args.samples, args.prompt_tokens, sizes, args.peak_tflops), flush=True)
    del learner, parts
    gc.collect()
    try:
        import trl  # noqa: F401
    except ImportError:
        print("TRL is not importable here: no TRL row")
        return
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(student)
    batch = [tokenizer(p.prompt)["input_ids"] for p in problems[: args.prompts] for _ in range(args.samples)]
    timing = bench_trl("DistillationTrainer", run, [batch] * (args.warmup + args.steps), args.warmup, args.steps)
    print(rate(timing, args.prompts * args.samples, args.prompt_tokens, sizes, args.peak_tflops))


if __name__ == "__main__":
    main()
