"""Whether a teacher can score a student's samples: the checks every pair passes at load or build
time, before any evaluation or step.

OPD scores the exact token ids the student sampled with the teacher, so both must map every
token, special ones included, to the same id, split any text into the same ids, and have an
output row for every id of the tokenizer. Output layers may have more rows than the tokenizer
has tokens (Qwen2.5-7B has 152,064 rows, Qwen2.5-0.5B 151,936, their tokenizer 151,665 tokens):
those padding rows are never sampled and never scored (``vocab_logits``). Every refusal is a
``PairError`` whose message names both sides and how to fix it.
"""

from __future__ import annotations

from torch import Tensor
from transformers import PreTrainedTokenizerBase


class PairError(ValueError):
    """A teacher/student pair (or its inputs) that cannot be distilled as configured; the message says why."""


def check_same_tokenizer(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase) -> None:
    """Raise PairError unless both tokenizers map every token, special ones included, to the same
    id (which special token is the EOS may differ: an instruct teacher and its base student)."""
    same_specials = set(student.all_special_ids) == set(teacher.all_special_ids)
    if student.get_vocab() != teacher.get_vocab() or not same_specials:
        raise PairError(
            f"teacher and student tokenizers differ (vocab {len(teacher)} vs {len(student)}): the teacher must "
            "score the exact token ids the student samples, so pick a pair that shares a tokenizer"
        )


def check_output_rows(role: str, rows: int, tokenizer_size: int) -> None:
    """Raise PairError when a model's output layer has fewer rows than the tokenizer has tokens."""
    if rows < tokenizer_size:
        raise PairError(
            f"the {role}'s output layer has {rows} rows but the tokenizer has {tokenizer_size} tokens: ids "
            f"{rows}..{tokenizer_size - 1} could be sampled and not scored; this {role} does not fit this tokenizer"
        )


def vocab_logits(logits: Tensor, tokenizer_size: int) -> Tensor:
    """The logits of the tokenizer's ids only, [..., tokenizer_size]: rows an output layer has
    beyond the tokenizer (padding) are left out, for the student and the teacher alike."""
    return logits if logits.shape[-1] == tokenizer_size else logits[..., :tokenizer_size]


# Texts both tokenizers of a pair must split into the same ids: prose, code, digits, unicode, chat markup.
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
