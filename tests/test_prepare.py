import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opdx.benchmarks import get_benchmark
from opdx.models import asset_path, check_same_tokenizer
from opdx.prepare import TinyLMSpec, build_char_tokenizer, build_tiny_llama, sft_batch, supervised_finetune
from opdx.rollout import sequence_logprobs


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
                -(sequence_logprobs(model, batch) * batch.response_mask_B_T).sum().item()
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


def test_same_token_ids_catches_a_tokenizer_that_splits_text_differently():
    from tokenizers import normalizers

    from opdx.prepare import same_token_ids

    tokenizer, other = build_char_tokenizer(), build_char_tokenizer()
    assert same_token_ids(tokenizer, other)
    other.backend_tokenizer.normalizer = normalizers.Replace("1", "2")  # same vocabulary, other ids for "17*23"
    check_same_tokenizer(tokenizer, other)
    assert not same_token_ids(tokenizer, other)
