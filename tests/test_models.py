import pytest
import torch
from transformers import AutoTokenizer

from opdx.config import ModelConfig
from opdx.models import asset_path, check_same_tokenizer, load_pair
from opdx.prepare import TinyLMSpec, build_char_tokenizer, build_tiny_llama


def test_load_pair_from_local_directories():
    cfg = ModelConfig(name="tiny", teacher=asset_path("tiny/teacher"), student=asset_path("tiny/student"))
    student, teacher, tokenizer = load_pair(cfg, torch.device("cpu"))
    assert sum(p.numel() for p in teacher.parameters()) > 5 * sum(p.numel() for p in student.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id is not None


def test_bfloat16_teacher_dtype():
    cfg = ModelConfig(
        name="tiny", teacher=asset_path("tiny/teacher"), student=asset_path("tiny/student"), teacher_dtype="bfloat16"
    )
    student, teacher, _ = load_pair(cfg, torch.device("cpu"))
    assert teacher.dtype == torch.bfloat16 and student.dtype == torch.float32


def test_teacher_with_another_tokenizer_is_refused(tmp_path):
    other = build_char_tokenizer("0123456789+-=")
    model = build_tiny_llama(TinyLMSpec(16, 1, 2, 32, 0, 0.0), other, seed=0)
    model.save_pretrained(tmp_path)
    other.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="tokenizers differ"):
        check_same_tokenizer(AutoTokenizer.from_pretrained(asset_path("tiny/student")), other)
    with pytest.raises(ValueError, match="tokenizers differ"):
        load_pair(
            ModelConfig(name="tiny", teacher=str(tmp_path), student=asset_path("tiny/student")), torch.device("cpu")
        )
