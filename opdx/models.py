"""Teacher and student loading (config group `model`).

Every model loads through ``from_pretrained`` from a hub id or a local directory, the same
code path either way. The teacher must share the student's tokenizer: it scores exactly the
token ids the student sampled.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from pathlib import Path

import torch
from omegaconf import OmegaConf
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from opdx.config import ModelConfig


def asset_path(relative: str) -> str:
    """Path of a file shipped in ``opdx/assets`` (the ``${asset:...}`` config resolver)."""
    return str(resources.files("opdx") / "assets" / relative)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver("asset", asset_path)


def _prepare_tiny(out_dir: Path, seed: int = 0) -> dict:
    from opdx.benchmarks import get_benchmark
    from opdx.prepare import prepare_tiny

    return prepare_tiny(out_dir, get_benchmark("arith"), seed=seed)


# name -> how `opdx prepare` builds its weights (None: they come from the hub or a local path)
MODELS: dict[str, Callable[..., dict] | None] = {"tiny": _prepare_tiny}


def check_same_tokenizer(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase) -> None:
    """Raise ValueError unless both tokenizers map every token to the same id."""
    if student.get_vocab() != teacher.get_vocab() or student.all_special_ids != teacher.all_special_ids:
        raise ValueError(
            f"teacher and student tokenizers differ (vocab {len(teacher)} vs {len(student)}): the teacher must "
            "score the exact token ids the student samples, so pick a pair that shares a tokenizer"
        )


def load_pair(
    cfg: ModelConfig, device: torch.device
) -> tuple[PreTrainedModel, PreTrainedModel, PreTrainedTokenizerBase]:
    """Student (trainable), teacher (frozen, eval mode) and their shared tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(cfg.student)
    check_same_tokenizer(tokenizer, AutoTokenizer.from_pretrained(cfg.teacher))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    student = AutoModelForCausalLM.from_pretrained(cfg.student, dtype=getattr(torch, cfg.dtype)).to(device)
    teacher = AutoModelForCausalLM.from_pretrained(cfg.teacher, dtype=getattr(torch, cfg.teacher_dtype)).to(device)
    teacher.eval().requires_grad_(False)
    # Sampling settings come from opdx alone: a hub model's generation_config (repetition
    # penalty, min_p, ...) would change the distribution sampled from without u = q/p knowing.
    for model in (student, teacher):
        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    return student, teacher, tokenizer
