"""Sample texts of a run: a few rollouts at each eval and every ``logger.samples_every`` training
steps, kept in ``samples.jsonl`` (and a wandb Table where wandb is on) and printed by
``opdx samples <run dir>``:

    opdx samples outputs/2026-12-07/12-00-00            # the latest step's samples
    opdx samples <run dir> --step all --split train     # every step's training rollouts

``opdx eval`` writes the same rows, the teacher's beside the student's, into its output directory.

A row: ``step``; ``model`` (student, or teacher in ``opdx eval``'s; rows written before it
existed are the student's); ``split`` (train: a step's rollout; eval: the held-out eval's) and ``kind``
(sampled, or greedy in eval); ``prompt``, ``response`` and ``reference`` (the benchmark's answer);
``score`` (the benchmark's grade of the response); ``stop`` (eos: the response ended; length: it
hit the token limit); ``tokens`` (each response token's text) and ``log_u`` (log u = log q(y_n) -
log p(y_n) of each token: the teacher's log-prob over the student's, the quantity the advantage
is a function of; null where the teacher did not score the row).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opdx.files import read_jsonl
from opdx.metrics import SAMPLES_FILE

if TYPE_CHECKING:  # reading and printing samples (`opdx samples`) loads no torch
    from torch import Tensor
    from transformers import PreTrainedTokenizerBase

    from opdx.benchmarks import Benchmark
    from opdx.rollout import Rollout


@dataclass
class SampleLog:
    """Rows of ``count`` rollouts of each (split, kind) at most, spread over the rollout's prompts,
    decoded with the student's ``tokenizer``; ``model`` says whose rollouts they are (``opdx eval``
    keeps the teacher's too)."""

    tokenizer: PreTrainedTokenizerBase
    count: int
    model: str = "student"
    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(
        self,
        benchmark: Benchmark,
        rollout: Rollout,
        split: str,
        kind: str,
        log_u_B_T: Tensor | None = None,
    ) -> None:
        """Rows from ``rollout`` (its problems and finish flags set, as samplers give them for
        benchmark problems) until
        ``count`` rows of (split, kind) are kept: every (B / count)-th row, so groups of samples
        of one prompt do not fill them all. ``log_u_B_T``: [B, T] log u of the rollout's tokens."""
        kept = sum(row["split"] == split and row["kind"] == kind for row in self.rows)
        rows_B = len(rollout.response_tokens_B_T)
        for b in range(0, rows_B, max(1, rows_B // max(self.count, 1)))[: max(self.count - kept, 0)]:
            mask_T = rollout.response_mask_B_T[b]
            ids = rollout.response_tokens_B_T[b][mask_T].tolist()
            problem = rollout.problems[b]
            response = self.tokenizer.decode(ids, skip_special_tokens=True)
            self.rows.append({
                "model": self.model,
                "split": split,
                "kind": kind,
                "prompt": problem.prompt,
                "response": response,
                "reference": problem.answer,
                "score": benchmark.score(problem, response),
                "stop": "eos" if bool(rollout.finished_B[b]) else "length",
                "tokens": [self.tokenizer.decode([token]) for token in ids],
                "log_u": None if log_u_B_T is None else [round(x, 4) for x in log_u_B_T[b][mask_T].tolist()],
            })  # fmt: skip


def read_samples(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of ``samples.jsonl`` (none if the run has none; ``read_jsonl``)."""
    return read_jsonl(Path(run_dir) / SAMPLES_FILE)


# log u >= 0: the token is at least as likely under the teacher as under the student (green);
# -3 <= log u < -1: up to e^3 times less likely (yellow); log u < -3: more than e^3 times (red)
U_COLOURS = ((0.0, "\033[32m"), (-1.0, ""), (-3.0, "\033[33m"), (float("-inf"), "\033[31m"))
RESET = "\033[0m"


def coloured_tokens(tokens: list[str], log_u: list[float]) -> str:
    """The response with each token coloured by its log u (``U_COLOURS``), for a terminal."""
    out = []
    for token, value in zip(tokens, log_u, strict=True):
        colour = next(c for bound, c in U_COLOURS if value >= bound)
        out.append(f"{colour}{token}{RESET}" if colour else token)
    return "".join(out)


def format_samples(rows: list[dict[str, Any]], colour: bool) -> str:
    """The rows readably, one block each: step, split and kind, score, stop reason, mean log u,
    the prompt, the reference and the response (coloured by log u where ``colour`` and known)."""
    blocks = []
    for row in rows:
        log_u = row.get("log_u")
        mean = f", mean log u {sum(log_u) / len(log_u):+.3f}" if log_u else ""
        response = coloured_tokens(row["tokens"], log_u) if colour and log_u else row["response"]
        model = "" if row.get("model", "student") == "student" else f" ({row['model']})"
        head = f"-- step {row['step']} {row['split']} {row['kind']}{model}"
        blocks.append(
            f"{head}: score {row['score']:g}, stop {row['stop']}{mean}\n"
            f"prompt:    {row['prompt']}\nreference: {row['reference']}\nresponse:  {response}"
        )
    return "\n\n".join(blocks)


def main(argv: list[str]) -> int:
    """``opdx samples RUN_DIR [--step N|last|all] [--split train|eval] [--kind greedy|sampled]
    [--model student|teacher] [--colour auto|always|never]``: the run's sample rows
    (``format_samples``); exit status 1 when the run has none or none match, 2 for a bad option
    (argparse)."""
    parser = argparse.ArgumentParser(prog="opdx samples", description="the sample texts of a run (samples.jsonl)")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--step", default="last", help="a step, last (the latest with samples; default) or all")
    parser.add_argument("--split", choices=["train", "eval"])
    parser.add_argument("--kind", choices=["greedy", "sampled"])
    parser.add_argument("--model", choices=["student", "teacher"], help="whose rollouts (opdx eval keeps both)")
    parser.add_argument("--colour", choices=["auto", "always", "never"], default="auto", help="colour tokens by log u")
    args = parser.parse_args(argv)
    rows = read_samples(args.run_dir)
    if not rows:
        print(f"opdx samples: {args.run_dir} has no {SAMPLES_FILE} (runs write it while logger.samples > 0)")
        return 1
    rows = [
        row
        for row in rows
        if args.split in (None, row["split"])
        and args.kind in (None, row["kind"])
        and args.model in (None, row.get("model", "student"))
    ]
    steps = sorted({row["step"] for row in rows})
    if not steps or (args.step not in ("last", "all") and not (args.step.isdigit() and int(args.step) in steps)):
        shown = " ".join(name for name in (args.model, args.split, args.kind) if name)
        print(
            f"opdx samples: --step {args.step} has no {shown + ' ' if shown else ''}samples; steps with them: {steps}"
        )
        return 1
    wanted = {"last": steps[-1:], "all": steps}.get(args.step) or [int(args.step)]
    rows = [row for row in rows if row["step"] in wanted]
    tty = sys.stdout.isatty() and "NO_COLOR" not in os.environ
    print(format_samples(rows, colour=args.colour == "always" or (args.colour == "auto" and tty)))
    return 0
