"""LoRA students (``model.lora``): peft's adapters on the student's linear layers, and the merged
weights that samplers holding their own copy of the student take.

    opdx train model.lora.r=16                                  # adapters of rank 16 on every linear layer
    opdx train model.lora.r=16 model.lora.target_modules=q_proj,v_proj model.lora.save_merged=true

The adapters come from transformers' PEFT integration (``PreTrainedModel.add_adapter`` with a
``peft.LoraConfig``): the model stays the transformers model, each targeted ``nn.Linear`` becomes a
peft ``LoraLayer`` whose ``base_layer`` keeps W (frozen) and whose ``lora_A`` / ``lora_B`` train.
Checkpoints hold the trainable tensors alone (``opdx.checkpoint``), and ``student/`` is saved in
peft's adapter format, which ``AutoModelForCausalLM.from_pretrained`` loads onto its base model.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from opdx.config import LoraConfig, check
from opdx.dist import whole

ADAPTER = "default"  # the one adapter opdx adds (peft's default name)
ADAPTER_PARTS = (".lora_A.", ".lora_B.")  # state-dict names of the adapters' tensors
MERGED_DIR = "student_merged"  # a run's merged student, beside student/ (model.lora.save_merged)


def add_adapters(model: PreTrainedModel, lora: LoraConfig) -> None:
    """LoRA adapters of ``lora`` on ``model``, in place; only they require grad afterwards (peft
    marks the base's tensors frozen). ``init_lora_weights`` stays peft's default: B = 0, so the
    adapted model starts equal to the base. ConfigError naming an adapted layer that is not linear
    (embeddings) or is the output layer tied to the embeddings (``merged_tensors`` merges neither)."""
    from peft import LoraConfig as PeftLoraConfig  # a training run with adapters alone needs peft

    model.add_adapter(
        PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.targets()),
        adapter_name=ADAPTER,
    )
    embeddings = model.get_input_embeddings().weight
    for name, layer in adapted_layers(model).items():
        check(
            isinstance(layer.base_layer, nn.Linear) and layer.base_layer.weight is not embeddings,
            f"model.lora.target_modules={lora.target_modules!r} adapts {name}, which is not a linear layer or is the "
            "output layer tied to the embeddings: opdx merges adapters of untied linear layers only",
        )


def has_adapters(model: nn.Module) -> bool:
    """Whether ``model`` carries peft adapters (added here, or loaded from an adapter directory)."""
    return bool(getattr(model, "_hf_peft_config_loaded", False))


def adapted_layers(module: nn.Module) -> dict[str, nn.Module]:
    """The adapted layers of ``module`` (peft's ``LoraLayer``: those with ``lora_A``) by their
    state-dict prefix (``model.model.layers.0.self_attn.q_proj``); none without adapters."""
    return {name: layer for name, layer in module.named_modules() if hasattr(layer, "lora_A")}


def delta_weight(layer: nn.Module) -> Tensor:
    """The update an adapter adds to its base weight, (alpha / r) B A, [out, in] in float32 at least
    (transposed for a ``fan_in_fan_out`` base such as GPT-2's Conv1D): peft's
    ``lora.Linear.get_delta_weight``, written out so FSDP2 shards are gathered first."""
    a_r_in = whole(layer.lora_A[ADAPTER].weight)
    b_out_r = whole(layer.lora_B[ADAPTER].weight)
    delta_out_in = (b_out_r.float() @ a_r_in.float()) * layer.scaling[ADAPTER]
    return delta_out_in.T if layer.fan_in_fan_out else delta_out_in


def merged_tensors(module: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """``module``'s state dict as the base model names it, adapters merged: each adapted layer's
    ``base_layer.weight`` as ``weight`` = W + (alpha / r) B A (float32 at least), its other base
    tensors (a bias) under their base names, the adapters' own tensors left out; whole (FSDP2
    shards gathered one at a time, in the same order on every rank). Without adapters: the state
    dict itself, whole."""
    layers = adapted_layers(module)
    for name, tensor in module.state_dict().items():
        if any(part in name for part in ADAPTER_PARTS):
            continue
        prefix, _, leaf = name.rpartition(".")
        owner = prefix.removesuffix(".base_layer")
        value = whole(tensor)
        if owner != prefix and owner in layers and leaf == "weight":
            value = value + delta_weight(layers[owner])
        yield f"{owner}.{leaf}", value


def save_merged(student: PreTrainedModel, weights: dict[str, Tensor], directory: Path) -> None:
    """The merged student (``weights``: ``merged_tensors`` by the model's own names) as a
    transformers model directory, written from a weightless copy of its architecture."""
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(student.config)
    base.config.dtype = next(iter(weights.values())).dtype  # config.json names the weights' dtype
    base.save_pretrained(directory, state_dict=weights)
