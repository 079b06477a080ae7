"""Whether a teacher can score a student's samples: the checks every pair passes at load or build time.

OPD scores the exact token ids the student sampled with the teacher, so both must map every
token, special ones included, to the same id, and split any text into the same ids.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


def check_same_tokenizer(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase) -> None:
    """Raise ValueError unless both tokenizers map every token, special ones included, to the same
    id (which special token is the EOS may differ: an instruct teacher and its base student)."""
    same_specials = set(student.all_special_ids) == set(teacher.all_special_ids)
    if student.get_vocab() != teacher.get_vocab() or not same_specials:
        raise ValueError(
            f"teacher and student tokenizers differ (vocab {len(teacher)} vs {len(student)}): the teacher must "
            "score the exact token ids the student samples, so pick a pair that shares a tokenizer"
        )


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
