"""Teacher/student pairs and inputs that other distillation tools got wrong: each ends at load,
before any eval, with one line and a non-zero exit, or works as it should."""

import json

import pytest
import torch
from conftest import FAST_TRAIN
from test_config import composed
from transformers import AutoModelForCausalLM, AutoTokenizer

from opdx.backends.hf import HFModel, load_teacher
from opdx.config import ModelConfig, asset_path
from opdx.evaluation import evaluate_split
from opdx.metrics import read_metrics
from opdx.models import load_tokenizer
from opdx.run import validate

TINY = [*FAST_TRAIN, "trainer.steps=2", "eval.n=0"]


def tiny_copy(out_dir, role="teacher", rows=None, chat_template=None):
    """The shipped tiny model, its output layer resized to ``rows`` and/or its tokenizer given a chat template."""
    model = AutoModelForCausalLM.from_pretrained(asset_path(f"tiny/{role}"))
    tokenizer = AutoTokenizer.from_pretrained(asset_path(f"tiny/{role}"))
    if rows is not None:
        model.resize_token_embeddings(rows, mean_resizing=False)
    tokenizer.chat_template = chat_template
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def test_padding_rows_beyond_the_tokenizer_are_never_sampled_nor_scored(opdx_cli, tmp_path):
    """A teacher with 32 output rows and a student with 40, one tokenizer of 24 tokens (as Qwen2.5
    7B / 0.5B): the full support trains (its logits are the tokenizer's 24 ids), nothing
    beyond id 23 is sampled, and the log-probs are those over the tokenizer's ids."""
    teacher = tiny_copy(tmp_path / "teacher", rows=32)
    student = tiny_copy(tmp_path / "student", role="student", rows=40)
    pair = [f"model.teacher={teacher}", f"model.student={student}"]
    opdx_cli("train", *TINY, *pair, "estimator=analytic", f"hydra.run.dir={tmp_path / 'run'}")
    assert all(r["train/loss"] > 0 for r in read_metrics(tmp_path / "run")[1:])
    model = AutoModelForCausalLM.from_pretrained(student)
    tokenizer = AutoTokenizer.from_pretrained(student)
    with torch.no_grad():
        model.lm_head.weight[24:] = 50.0 * model.lm_head.weight[:24].abs().max()  # padding rows would win
    backend = HFModel(model, tokenizer)
    torch.manual_seed(0)
    rollout = backend.sample(["12+7="], 64, 10)
    assert rollout.response_tokens_B_T.max() < 24
    logits = model(torch.tensor([tokenizer("12+7=")["input_ids"]])).logits[0, -1]
    expected = logits[:24].log_softmax(-1)[rollout.response_tokens_B_T[0, 0]]
    assert backend.logprobs(rollout)[0, 0].item() == pytest.approx(expected.item(), abs=1e-5)
    assert rollout.logp_sampling_B_T[0, 0].item() == pytest.approx(expected.item(), abs=1e-5)


def test_a_model_with_fewer_rows_than_the_tokenizer_is_refused_at_load_naming_both(opdx_cli, tmp_path):
    teacher = tiny_copy(tmp_path / "teacher", rows=20)
    result = opdx_cli("train", *TINY, f"model.teacher={teacher}", f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "the teacher's output layer has 20 rows but the tokenizer has 24 tokens" in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # before any eval


def test_another_tokenizer_is_refused_in_one_line(opdx_cli, tmp_path):
    teacher = tiny_copy(tmp_path / "teacher")
    vocab = json.loads((teacher / "tokenizer.json").read_text())
    ids = vocab["model"]["vocab"]
    ids["1"], ids["2"] = ids["2"], ids["1"]  # two ids the other way round
    (teacher / "tokenizer.json").write_text(json.dumps(vocab))
    result = opdx_cli("train", *TINY, f"model.teacher={teacher}", f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("opdx train: teacher and student tokenizers differ")
    missing = opdx_cli("eval", "model.teacher=/no/such/teacher", check=False)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert "opdx eval: cannot load a tokenizer from '/no/such/teacher'" in missing.stderr


TEACHER_TEMPLATE = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"  # its SFT format
STUDENT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %};{% endif %}"


def test_the_teacher_scores_with_its_own_chat_template_when_it_differs(tmp_path):
    teacher = tiny_copy(tmp_path / "teacher", chat_template=TEACHER_TEMPLATE)
    student = tiny_copy(tmp_path / "student", role="student", chat_template=STUDENT_TEMPLATE)
    pair = ModelConfig(name="tiny", teacher=str(teacher), student=str(student))
    tokenizer = load_tokenizer(pair)
    own = load_teacher(pair, tokenizer, torch.device("cpu"))
    students_template = load_teacher(pair, tokenizer, torch.device("cpu"), prompt_template="student")
    assert own.prompt_ids(["12+3="]) == [[1, 5, 6, 14, 7, 20]]  # <bos> 1 2 + 3 =
    assert students_template.prompt_ids(["12+3="]) == [[5, 6, 14, 7, 20, 21]]  # no <bos>, then ';'
    rollout = HFModel(AutoModelForCausalLM.from_pretrained(student), tokenizer).sample(["12+3="], 2, 6)
    assert rollout.prompt_tokens_B_L[0].tolist() == [5, 6, 14, 7, 20, 21]  # the student's rendering
    by_hand = own.model(torch.tensor([[1, 5, 6, 14, 7, 20, *rollout.response_tokens_B_T[0].tolist()]])).logits
    expected = by_hand[0, 5:-1].log_softmax(-1).gather(-1, rollout.response_tokens_B_T[0, :, None]).squeeze(-1)
    torch.testing.assert_close(own.logprobs(rollout)[0], expected, atol=1e-5, rtol=0)
    run = validate(composed(*TINY, f"model.teacher={teacher}", f"model.student={student}", "eval.problems=32"))
    accuracy = {
        name: evaluate_split(backend, tokenizer, run.benchmark, run.config.eval, run.sampling, 24)["greedy_acc"]
        for name, backend in (("own", own), ("student", students_template))
    }
    assert accuracy["own"] > 0.7 > 0.1 > accuracy["student"], accuracy


def test_prompts_longer_than_the_context_are_refused_or_dropped(opdx_cli, tmp_path):
    """The tiny pair has 64 positions; 10-16-term sums are 27-57 prompt tokens, 24 new tokens on top."""
    long = [*TINY, "benchmark.min_terms=10", "benchmark.max_terms=16", "benchmark.train_size=300", "eval.problems=200"]
    result = opdx_cli("train", *long, f"hydra.run.dir={tmp_path / 'refused'}", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "of 200 eval prompts do not fit the student: prompt + 24 new tokens exceed its 64 positions" in result.stderr
    assert "runtime.drop_long_prompts=true" in result.stderr
    assert not (tmp_path / "refused" / "metrics.jsonl").exists()
    dropped = opdx_cli("train", *long, "runtime.drop_long_prompts=true", f"hydra.run.dir={tmp_path / 'dropped'}")
    assert "of 300 train prompts longer than the models' positions allow" in dropped.stdout
    assert "of 200 eval prompts longer than the models' positions allow" in dropped.stdout
    summary = json.loads((tmp_path / "dropped" / "summary.json").read_text())
    assert 0 < summary["eval_problems"] < 200 and summary["final_eval"]["step"] == 2


def test_the_planner_counts_a_dense_supports_chunks_not_its_whole_logits():
    """A dense support (estimator=analytic: the full one) makes both models' logits chunk by chunk
    from their hidden states: the update holds DENSE_CHUNK_COPIES float32 [chunk, V] tensors (here
    the 8 rows x 24 new tokens = 192 states in one chunk of ``runtime.dense_chunk``, then chunks of
    64) and the teacher's hidden states; the teacher phase no logits. The sampled support holds a
    chunk of 4 [chunk, V] tensors (every one of the 192 tokens) in the update, 2 in the teacher."""
    from opdx.cli import plan_of
    from opdx.plan import DENSE_CHUNK_COPIES

    def parts(*overrides: str) -> dict[str, dict[str, int]]:
        return {p.name: p.parts for p in plan_of([*TINY, *overrides]).phases if p.name in ("teacher", "update")}

    dense, chunked, sampled = (
        parts("estimator=analytic"),
        parts("estimator=analytic", "runtime.dense_chunk=64"),
        parts(),
    )
    assert dense["update"]["logits chunk"] == DENSE_CHUNK_COPIES * 192 * 24 * 4
    assert chunked["update"]["logits chunk"] == DENSE_CHUNK_COPIES * 64 * 24 * 4
    teacher_hidden = dense["teacher"]["hidden states"]
    assert dense["teacher"]["logits chunk"] == 0 and teacher_hidden == dense["update"]["teacher hidden"] > 0
    assert (sampled["teacher"]["logits chunk"], sampled["update"]["logits chunk"]) == (
        2 * 192 * 24 * 4,
        4 * 192 * 24 * 4,
    )


@pytest.mark.slow
def test_a_lora_student_distils_from_its_own_frozen_base_shown_the_worked_solution(opdx_cli, tmp_path):
    """teacher=self teacher.weights=initial with model.lora: the base (adapters off) scores the
    student's responses to the bare prompt on the prompt with its worked solution first."""
    self_taught = ["teacher=self", "teacher.weights=initial", "teacher.context=worked", "model.lora.r=4"]
    opdx_cli("train", *FAST_TRAIN, *self_taught, f"hydra.run.dir={tmp_path}")
    steps = [record for record in read_metrics(tmp_path) if "train/loss" in record]
    assert len(steps) == 4 and all(record["train/skipped"] == 0 for record in steps)
    assert steps[0]["div/reverse_kl"] > 0  # the context makes the base a different distribution
    assert (tmp_path / "student" / "adapter_config.json").exists() and (tmp_path / "summary.json").exists()
