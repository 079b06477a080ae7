"""Time OPD steps of a run config through the trainer's own ``train_step``, split into rollout /
teacher / update; with ``--compare trl``, TRL's ``DistillationTrainer`` and ``GKDTrainer`` on the
same pair, prompts and batch, one after the other in one command.

    python scripts/bench_step.py                                  # the default job's config
    python scripts/bench_step.py --steps 20 --threads 1 trainer.prompts_per_step=32 divergence=reverse_kl
    python scripts/bench_step.py --threads 1 model=tiny_hd32 rollout=vllm        # rollouts on a vLLM engine
    python scripts/bench_step.py --compare trl --steps 3 --warmup 1 --threads 1 model=smollm2_135m \
        benchmark=bfcl trainer.prompts_per_step=8 trainer.samples_per_prompt=1 sampling.max_new_tokens=64

Any `opdx train` override works after the flags. Prints the mean seconds per phase over the
timed steps (after warm-up), sampled tokens per second and peak memory (resident; on a GPU,
allocated GPU memory); with
``--compare trl`` one row per tool and one ``ratio`` line per TRL trainer (opdx's throughput in
sampled tokens/s over TRL's: response lengths differ between tools, steps do not compare).
No training outcome is measured here.

How TRL is run (``pip install -e ".[bench]"``, TRL 1.16): each tool in its own fresh process (so
each peak RSS is its own), one at a time, with the same threads. The same student and teacher
directories in the run's dtypes, the same prompt token ids per step (opdx's rendering, handed to
TRL untokenized), batch = prompts x samples, the same max new tokens, temperature, top-k/top-p,
LR, clip and EOS; TRL's best CPU settings (weights in the run's dtype with no autocast, no
gradient checkpointing: both faster than its defaults here); GKDTrainer with ``lmbda=1`` (every
step on-policy). TRL 1.16 has no sampled-token loss: its closest equivalent to OPD is its
full-vocabulary generalized JSD with ``beta`` for the run's divergence (forward_kl 0, js 0.5,
reverse_kl 1). Phases in TRL: rollout = its ``generate`` call, teacher = the teacher module's
forward, update = the rest of the step (its loss includes the teacher's output head in
DistillationTrainer's chunked loss).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any

import torch
from hydra import compose, initialize_config_dir

from opdx.config import CONF_DIR, register_resolvers, register_schema
from opdx.models import load_tokenizer
from opdx.prompts import encode_prompts
from opdx.run import Run, start, validate
from opdx.trainer import Learner, build_learner, prompts_for_step, train_step

PHASES = ("rollout", "teacher", "update")
TRL_TRAINERS = ("DistillationTrainer", "GKDTrainer")
TRL_BETA = {"forward_kl": 0.0, "js": 0.5, "reverse_kl": 1.0}  # TRL's generalized JSD: beta 0 forward, 1 reverse


@dataclass
class Timing:
    """One tool's figures: mean seconds per phase and sampled tokens per step over the timed
    steps, and the peak memory of its process in MiB (``peak_memory_mib``)."""

    tool: str
    phases: dict[str, float]
    tokens: float
    peak_mib: float

    @property
    def step(self) -> float:
        return sum(self.phases.values())

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.step


def compose_run(overrides: list[str], threads: int | None) -> Run:
    register_schema()
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        threads_override = [f"runtime.threads={threads}"] if threads else []
        return validate(compose(config_name="config", overrides=[*overrides, *threads_override]))


def peak_memory_mib() -> float:
    """The peak of this process: GPU memory allocated by torch on a GPU, else resident memory."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def summarise(tool: str, records: list[dict[str, float]], tokens: list[float]) -> Timing:
    phases = {phase: statistics.mean(r[phase] for r in records) for phase in PHASES}
    return Timing(tool, phases, statistics.mean(tokens), peak_memory_mib())


def bench_opdx(overrides: list[str], threads: int | None, warmup: int, steps: int) -> Timing:
    """opdx's ``train_step`` on steps 0 .. warmup+steps-1 of the run; the last ``steps`` timed."""
    run = compose_run(overrides, threads)
    return time_steps(build_learner(run, start(run)), warmup, steps)


def time_steps(learner: Learner, warmup: int, steps: int, tool: str = "opdx") -> Timing:
    records, tokens = [], []
    for step in range(warmup + steps):
        metrics = train_step(learner, step)
        if step >= warmup:
            records.append({phase: metrics[f"time/{phase}"] for phase in PHASES})
            tokens.append(metrics["perf/tokens_per_s"] * sum(records[-1].values()))
    return summarise(tool, records, tokens)


def step_prompts(run: Run, total_steps: int) -> list[list[list[int]]]:
    """opdx's prompt token ids of each step, each prompt repeated samples_per_prompt times."""
    t = run.config.trainer
    tokenizer = load_tokenizer(run.config.model)
    batches = []
    for step in range(total_steps):
        problems = prompts_for_step(run.benchmark, run.config.seed, step, t.prompts_per_step)
        batches.append(encode_prompts(tokenizer, [p for p in problems for _ in range(t.samples_per_prompt)]))
    return batches


class PhaseClock:
    """Seconds spent inside wrapped calls or hooked modules, per phase (nested calls count once)."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.depth = dict.fromkeys(PHASES, 0)
        self.started = dict.fromkeys(PHASES, 0.0)
        self.tokens = 0

    def enter(self, phase: str) -> None:
        if self.depth[phase] == 0:
            self.started[phase] = time.perf_counter()
        self.depth[phase] += 1

    def leave(self, phase: str) -> None:
        self.depth[phase] -= 1
        if self.depth[phase] == 0:
            self.seconds[phase] += time.perf_counter() - self.started[phase]

    def wrap(self, phase: str, function: Callable[..., Any], count: Callable[[Any], int]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self.enter(phase)
            try:
                result = function(*args, **kwargs)
            finally:
                self.leave(phase)
            self.tokens += count(result)
            return result

        return timed

    def hook(self, phase: str, module: torch.nn.Module) -> None:
        module.register_forward_pre_hook(lambda *_: self.enter(phase))
        module.register_forward_hook(lambda *_: self.leave(phase))

    def take(self) -> tuple[dict[str, float], int]:
        taken = (dict(self.seconds), self.tokens)
        self.seconds, self.tokens = dict.fromkeys(PHASES, 0.0), 0
        return taken


def bench_trl_job(trainer_name: str, overrides: list[str], threads: int | None, warmup: int, steps: int) -> Timing:
    run = compose_run(overrides, threads)
    if run.config.runtime.threads:
        torch.set_num_threads(run.config.runtime.threads)
    return bench_trl(trainer_name, run, step_prompts(run, warmup + steps), warmup, steps)


def bench_trl(trainer_name: str, run: Run, batches: list[list[list[int]]], warmup: int, steps: int) -> Timing:
    """TRL's ``trainer_name`` on the run's pair with ``batches[step]`` as each step's prompt token
    ids (module docstring)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    config, t = run.config, run.config.trainer
    if run.divergence.name not in TRL_BETA:
        raise SystemExit(f"TRL has no {run.divergence.name}; compare with divergence={'|'.join(TRL_BETA)}")
    tokenizer = load_tokenizer(config.model)
    pair, device = config.model, "cuda" if torch.cuda.is_available() else "cpu"
    student = AutoModelForCausalLM.from_pretrained(pair.student, dtype=getattr(torch, pair.dtype)).to(device)
    teacher = AutoModelForCausalLM.from_pretrained(pair.teacher, dtype=getattr(torch, pair.teacher_dtype)).to(device)
    student.generation_config.eos_token_id = tokenizer.eos_token_id
    clock = PhaseClock()
    clock.hook("teacher", teacher)
    clock.hook("teacher", teacher.get_decoder())
    records, tokens = [], []

    class StepClock(TrainerCallback):
        def on_step_begin(self, *_: Any, **__: Any) -> None:
            self.started = time.perf_counter()
            clock.take()

        def on_step_end(self, args: Any, state: Any, *_: Any, **__: Any) -> None:
            total = time.perf_counter() - self.started
            seconds, sampled = clock.take()
            if state.global_step > warmup:
                records.append(seconds | {"update": total - seconds["rollout"] - seconds["teacher"]})
                tokens.append(sampled)

    rows = [{"prompt_ids": ids} for batch in batches for ids in batch]
    common = dict(
        output_dir=tempfile.mkdtemp(prefix=f"bench_{trainer_name}_"),
        per_device_train_batch_size=len(batches[0]),
        max_steps=warmup + steps,
        learning_rate=t.lr,
        lr_scheduler_type="constant",
        weight_decay=t.weight_decay,
        max_grad_norm=t.grad_clip,
        temperature=run.sampling.temperature,
        beta=TRL_BETA[run.divergence.name],
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        save_strategy="no",
        logging_steps=10**6,
        disable_tqdm=True,
        seed=config.seed,
        train_sampling_strategy="sequential",
    )
    if trainer_name == "DistillationTrainer":
        args = DistillationConfig(
            **common,
            max_completion_length=config.sampling.max_new_tokens,
            top_k=run.sampling.top_k,
            top_p=run.sampling.top_p,
            shuffle_dataset=False,
        )
        dataset = Dataset.from_list([{"prompt": str(i)} for i in range(len(rows))])
        trainer = DistillationTrainer(
            model=student, teacher_model=teacher, args=args, train_dataset=dataset, processing_class=tokenizer
        )
        ids_of = {str(i): row["prompt_ids"] for i, row in enumerate(rows)}
        trainer._tokenize_prompts = lambda prompts: ([ids_of[p] for p in prompts], None, {})
        generate = trainer._generate_single_turn
        trainer._generate_single_turn = clock.wrap("rollout", generate, lambda ids: sum(map(len, ids)))
    else:
        if run.sampling.top_k or run.sampling.top_p < 1:
            raise SystemExit(
                "GKDTrainer samples at top_k=0, top_p=1 only: compare with sampling.top_k=0 sampling.top_p=1"
            )
        args = GKDConfig(**common, lmbda=1.0, max_new_tokens=config.sampling.max_new_tokens)
        trainer = GKDTrainer(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            data_collator=lambda batch: left_padded(batch, tokenizer.pad_token_id),
        )
        trainer.generate_on_policy_outputs = clock.wrap(
            "rollout", trainer.generate_on_policy_outputs, lambda out: int((out[2] != -100).sum())
        )
    trainer.add_callback(StepClock())
    trainer.train()
    return summarise(trainer_name, records, tokens)


def left_padded(batch: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """GKDTrainer's inputs from token ids: left-padded prompts; its on-policy step replaces the rest.
    The labels are the prompt tokens, not -100: transformers divides the loss by the count of the
    collated labels, taken before GKD's generation replaces them (0 would make the loss inf)."""
    width = max(len(row["prompt_ids"]) for row in batch)
    ids = torch.tensor([[pad_id] * (width - len(r["prompt_ids"])) + r["prompt_ids"] for r in batch])
    mask = torch.tensor([[0] * (width - len(r["prompt_ids"])) + [1] * len(r["prompt_ids"]) for r in batch])
    labels = ids.masked_fill(mask == 0, -100)
    return {"prompts": ids, "prompt_attention_mask": mask, "input_ids": ids, "attention_mask": mask, "labels": labels}


def report(timing: Timing) -> str:
    split = ", ".join(f"{phase} {timing.phases[phase]:.3f}" for phase in PHASES)
    return (
        f"{timing.tool:<20} step {timing.step:7.3f} s ({split}), {timing.tokens:.0f} sampled tokens, "
        f"{timing.tokens_per_s:.1f} sampled tokens/s ({timing.tokens / timing.phases['rollout']:.0f} in the rollout), "
        f"peak memory {timing.peak_mib:.0f} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--compare", choices=["trl"], default=None, help="also time TRL's trainers")
    parser.add_argument("overrides", nargs="*", help="opdx train overrides, e.g. trainer.prompts_per_step=32")
    args = parser.parse_args()
    run = compose_run(args.overrides, args.threads)
    t = run.config.trainer
    print(
        f"{run.config.model.name}: {t.prompts_per_step} prompts x {t.samples_per_prompt} samples, "
        f"{run.config.sampling.max_new_tokens} new tokens, {run.divergence.name}/{run.estimator.name}, "
        f"{args.steps} timed steps after {args.warmup}, threads {args.threads or torch.get_num_threads()}"
    )
    jobs = [(bench_opdx, ())] + ([(bench_trl_job, (name,)) for name in TRL_TRAINERS] if args.compare else [])
    timings = []
    for function, first in jobs:
        # One fresh process per tool, one at a time: each peak RSS is its own, no two share the cores.
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
            timing = pool.submit(function, *first, args.overrides, args.threads, args.warmup, args.steps).result()
        timings.append(timing)
        print(report(timing), flush=True)
    opdx = timings[0]
    for other in timings[1:]:
        print(f"ratio opdx/{other.tool} sampled tokens/s {opdx.tokens_per_s / other.tokens_per_s:.2f}")
        print(f"ratio opdx/{other.tool} peak memory {opdx.peak_mib / other.peak_mib:.2f}")


if __name__ == "__main__":
    main()
