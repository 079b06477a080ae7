"""`tiny`: the CPU default pair, a character-level tokenizer and two Llama LMs trained here.

    opdx prepare model=tiny                 # writes opdx/assets/tiny/{teacher,student}
    opdx prepare model=tiny out=DIR         # somewhere else

A character-level tokenizer for the arith benchmark, then two Llama causal LMs built from a
config: a teacher (hidden 128, 4 layers) trained by SFT on worked solutions until it is good
at the task, and a smaller student (hidden 64, 2 layers) given a short SFT so it starts weak.
Both are saved with ``save_pretrained`` (tokenizer included) and load through the ordinary
``from_pretrained`` path like any hub model.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from opdx.backends.hf import HFModel
from opdx.benchmarks import Benchmark, Problem, get_benchmark
from opdx.evaluation import evaluate
from opdx.policy import TokenScores
from opdx.prompts import encode_prompts
from opdx.rollout import Rollout

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
    scores = TokenScores(model)
    model.train()
    progress = tqdm(range(spec.sft_steps), desc=desc, mininterval=2)
    for _ in progress:
        indices = torch.randint(len(benchmark.train), (spec.sft_batch,), generator=generator).tolist()
        batch = sft_batch(tokenizer, [benchmark.train[i] for i in indices], benchmark)
        logp_B_T = scores(batch)
        loss = -(logp_B_T * batch.response_mask_B_T).sum() / batch.response_mask_B_T.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        progress.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()


def train_tiny(
    role: str, spec: TinyLMSpec, benchmark: Benchmark, out_dir: Path, seed: int, eval_problems: int = 1000
) -> dict:
    """Build one tiny Llama of ``spec``, fine-tune it on ``benchmark``'s worked solutions, save it
    (with the character tokenizer) into ``out_dir / role``; returns its size, spec and greedy accuracy."""
    start = time.time()
    tokenizer = build_char_tokenizer()
    model = build_tiny_llama(spec, tokenizer, seed)
    supervised_finetune(model, tokenizer, benchmark, spec, seed, desc=f"SFT {role}")
    accuracy = evaluate(HFModel(model, tokenizer), tokenizer, benchmark, benchmark.eval[:eval_problems])
    model.save_pretrained(out_dir / role)
    tokenizer.save_pretrained(out_dir / role)
    report = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "spec": asdict(spec),
        "greedy_accuracy": accuracy["greedy_acc"],
        "build_seconds": round(time.time() - start, 1),
    }
    print(f"{role}: {report}")
    return report


def prepare_tiny(out_dir: Path, benchmark: Benchmark, seed: int = 0, eval_problems: int = 1000) -> dict:
    """Build, train and save the tiny teacher and student; returns their greedy accuracies."""
    report: dict = {"seed": seed}
    for offset, (role, spec) in enumerate((("teacher", TEACHER), ("student", STUDENT))):
        report[role] = train_tiny(role, spec, benchmark, out_dir, seed + offset, eval_problems)
    return report


def build(out_dir: Path, seed: int = 0) -> dict:
    return prepare_tiny(out_dir, get_benchmark("arith"), seed=seed)
