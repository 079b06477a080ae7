import pytest
import torch
from transformers import AutoTokenizer

from opdx.compat import check_same_tokenizer
from opdx.config import ModelConfig, asset_path
from opdx.models import load_model, load_tokenizer
from opdx.pairs.tiny import TinyLMSpec, build_char_tokenizer, build_tiny_llama
from opdx.run import validate


def load_pair(cfg: ModelConfig):
    """Student (trainable), teacher (frozen) and the shared tokenizer, as a run loads them."""
    tokenizer = load_tokenizer(cfg)
    cpu = torch.device("cpu")
    student = load_model(cfg.student, cfg.dtype, cpu, tokenizer, trainable=True)
    return student, load_model(cfg.teacher, cfg.teacher_dtype, cpu, tokenizer, trainable=False), tokenizer


def test_load_pair_from_local_directories():
    cfg = ModelConfig(name="tiny", teacher=asset_path("tiny/teacher"), student=asset_path("tiny/student"))
    student, teacher, tokenizer = load_pair(cfg)
    assert sum(p.numel() for p in teacher.parameters()) > 5 * sum(p.numel() for p in student.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id is not None


def test_bfloat16_teacher_dtype():
    cfg = ModelConfig(
        name="tiny", teacher=asset_path("tiny/teacher"), student=asset_path("tiny/student"), teacher_dtype="bfloat16"
    )
    student, teacher, _ = load_pair(cfg)
    assert teacher.dtype == torch.bfloat16 and student.dtype == torch.float32


def test_teacher_with_another_tokenizer_is_refused(tmp_path):
    other = build_char_tokenizer("0123456789+-=")
    model = build_tiny_llama(TinyLMSpec(16, 1, 2, 32, 0, 0.0), other, seed=0)
    model.save_pretrained(tmp_path)
    other.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="tokenizers differ"):
        check_same_tokenizer(AutoTokenizer.from_pretrained(asset_path("tiny/student")), other)
    with pytest.raises(ValueError, match="tokenizers differ"):
        load_tokenizer(ModelConfig(name="tiny", teacher=str(tmp_path), student=asset_path("tiny/student")))


def save_tiny(model_type: str, layers: int, out_dir, tokenizer) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        tie_word_embeddings=True,
    )
    torch.manual_seed(layers)
    AutoModelForCausalLM.from_config(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def test_hub_configs_load_through_from_pretrained_on_local_directories(tmp_path):
    """The Qwen3 hub configs load with the same code as a local path: point them at saved models."""
    from test_config import composed

    tokenizer = build_char_tokenizer()
    save_tiny("qwen3", 2, tmp_path / "teacher", tokenizer)
    save_tiny("qwen3", 1, tmp_path / "student", tokenizer)
    run = validate(
        composed(
            "model=qwen3_1p7b_to_0p6b_base",
            f"model.teacher={tmp_path / 'teacher'}",
            f"model.student={tmp_path / 'student'}",
        )
    )
    assert validate(composed("model=qwen3_8b_to_1p7b_base")).config.model.teacher == "Qwen/Qwen3-8B"
    student, teacher, _ = load_pair(run.config.model)
    assert type(teacher).__name__ == type(student).__name__ == "Qwen3ForCausalLM"
    assert (teacher.config.num_hidden_layers, student.config.num_hidden_layers) == (2, 1)
    assert teacher.dtype == student.dtype == torch.bfloat16


def test_an_instruct_teacher_and_a_base_student_differ_only_in_eos(tmp_path):
    """Same vocabulary and special tokens, another EOS: accepted, and responses end at the
    teacher's EOS (where its chat turns end)."""
    base = build_char_tokenizer()
    base.add_special_tokens({"additional_special_tokens": ["<|im_end|>", "<eos>"]})  # as in Qwen3's
    base.save_pretrained(tmp_path / "base")
    chat = AutoTokenizer.from_pretrained(tmp_path / "base")
    chat.eos_token = "<|im_end|>"
    check_same_tokenizer(base, chat)
    save_tiny("llama", 1, tmp_path / "student", base)
    save_tiny("llama", 2, tmp_path / "teacher", chat)
    cfg = ModelConfig(name="tiny", teacher=str(tmp_path / "teacher"), student=str(tmp_path / "student"))
    tokenizer = load_tokenizer(cfg)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 24 and tokenizer.pad_token_id == 0


def test_the_pair_stop_ids_are_every_id_of_both_generation_configs(tmp_path, capsys):
    """An instruct teacher lists end-of-turn and end-of-text, a base student end-of-text alone: a
    response ends at either, and the run says so. Ids beyond the tokenizer are left out."""
    from transformers import GenerationConfig

    from opdx.models import stop_ids

    tokenizer = AutoTokenizer.from_pretrained(asset_path("tiny/student"))  # <eos> is id 2
    GenerationConfig(eos_token_id=[2]).save_pretrained(tmp_path / "student")
    GenerationConfig(eos_token_id=[5, 2, 999]).save_pretrained(tmp_path / "teacher")
    cfg = ModelConfig(name="x", teacher=str(tmp_path / "teacher"), student=str(tmp_path / "student"))
    assert stop_ids(cfg, tokenizer) == [2, 5]
    assert "responses end at any of" in capsys.readouterr().out
    same = ModelConfig(name="tiny", teacher=asset_path("tiny/teacher"), student=asset_path("tiny/student"))
    assert stop_ids(same, tokenizer) == [2]
    assert capsys.readouterr().out == ""
    GenerationConfig(eos_token_id=[7, 2]).save_pretrained(tmp_path / "component")  # a mixture component's teacher
    assert stop_ids(same, tokenizer, [same.teacher, str(tmp_path / "component")]) == [2, 7]
    assert f"the teacher {tmp_path / 'component'}'s [7, 2]" in capsys.readouterr().out
