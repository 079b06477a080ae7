"""The memory planner: model sizes from configs alone, the phases it counts, its choices, and the
refusal before any weights load. (Planned against measured peaks: tests/test_scripts.py.)"""

import subprocess
import sys
from dataclasses import replace

import pytest
from conftest import FAST_TRAIN
from test_config import composed
from transformers import AutoModelForCausalLM

from opdx.cli import plan_of
from opdx.config import ConfigError, asset_path
from opdx.plan import count, halvings, model_shape, phases
from opdx.run import start, validate

QWEN3 = "model=qwen3_1p7b_to_0p6b_base"


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_a_models_parameters_are_counted_on_the_meta_device_as_loaded(role):
    path = asset_path(f"tiny/{role}")
    loaded = AutoModelForCausalLM.from_pretrained(path)
    assert model_shape(path).parameters == sum(p.numel() for p in loaded.parameters())


def test_the_qwen3_files_carry_their_models_sizes(monkeypatch):
    """No hub: the sizes come from the model files' config; they match Qwen3's model cards
    (0.6B / 0.44B non-embedding; 1.7B / 1.4B; 8.2B / 6.95B; 4.0B / 3.6B) and the KV bytes per token of the GPU
    review (112 KiB for 1.7B, 144 KiB for 8B in bf16)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cards = {"0.6B": ("0.6", "0.44"), "1.7B": ("1.7", "1.4"), "8B": ("8.2", "6.95"), "4B-Instruct-2507": ("4.0", "3.6")}
    seen = {}
    for name in ("qwen3_1p7b_to_0p6b_base", "qwen3_8b_to_8b_base", "qwen3_4b_instruct_to_0p6b_base"):
        model = composed(f"model={name}").model
        for path, carried in ((model.student, model.student_config), (model.teacher, model.teacher_config)):
            shape = model_shape(path, carried)
            embeddings = shape.vocab * shape.hidden * (1 if shape.tied else 2)
            size = path.removeprefix("Qwen/Qwen3-").removesuffix("-Base")
            seen[size] = shape
            total, body = cards[size]
            assert f"{shape.parameters / 1e9:.{len(total) - 2}f}" == total
            assert f"{(shape.parameters - embeddings) / 1e9:.{len(body) - 2}f}" == body
    assert seen["1.7B"].kv_bytes_per_token(2) == 112 * 1024
    assert seen["8B"].kv_bytes_per_token(2) == 144 * 1024


def test_a_model_without_a_config_at_hand_is_refused_by_name(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=f"cannot read '{tmp_path}/missing'.s config.json"):
        model_shape(str(tmp_path / "missing"))


def test_halvings_are_multiples_of_the_group_down_to_one_group():
    assert halvings(256) == [256, 128, 64, 32, 16, 8, 4, 2, 1]
    assert halvings(12, 4) == [12, 4]
    assert halvings(2000, 4) == [2000, 1000, 500, 248, 124, 60, 32, 16, 8, 4]


def test_the_micro_batch_is_the_largest_halving_that_fits():
    """At 0.04 GiB (a budget of 36 MiB) a tiny batch of 128 sequences (about 44 MiB at its update)
    does not fit: the planner takes the largest halving whose update and teacher phases fit, and
    the next larger one would not."""
    whole = plan_of([*FAST_TRAIN, "trainer.prompts_per_step=64"])
    assert whole.fits and whole.micro_batch_size == whole.rows == 128
    plan = plan_of([*FAST_TRAIN, "trainer.prompts_per_step=64", "plan.gpu_memory_gib=0.04"])
    assert plan.fits and plan.micro_batch_size == 64
    update = {p.name: p for p in plan.phases}["update"]
    assert update.total <= plan.budget
    student, teacher = (model_shape(asset_path(f"tiny/{role}")) for role in ("student", "teacher"))
    bigger = 2 * plan.micro_batch_size
    workload = replace(plan.workload, eval_rows=plan.eval_batch_size)
    over = {p.name: p.total for p in phases(student, [teacher], workload, bigger)}
    assert max(over["update"], over["teacher"]) > plan.budget


def test_opdx_plan_prints_each_phase_and_says_whether_it_fits():
    run = [sys.executable, "-m", "opdx", "plan", *FAST_TRAIN]
    fits = subprocess.run(run, capture_output=True, text=True)
    assert fits.returncode == 0, fits.stderr
    lines = fits.stdout.splitlines()
    assert [line.split()[0] for line in lines if line[:1].isalpha() and " MiB" in line[-8:]] == [
        "rollout", "teacher", "update", "eval",
    ]  # fmt: skip
    assert lines[-1].endswith(": fits")
    tight = subprocess.run([*run, "plan.gpu_memory_gib=0.001"], capture_output=True, text=True)
    assert tight.returncode == 1
    assert tight.stdout.splitlines()[-1].startswith("peak ") and "does not fit (" in tight.stdout.splitlines()[-1]


def test_the_shipped_qwen3_pair_on_one_80_gb_gpu(monkeypatch):
    """The 1.7B -> 0.6B file's HF rollout of 128 sequences of 512 + 4,096 tokens in one call keeps
    a KV cache of 128 x 4,608 x 112 KiB = 63 GiB (the review's 59.5 GiB is at 256-token prompts)
    and does not fit with the student's and teacher's state; the planner samples the rollout in
    calls of 64 sequences (whole groups of 4) then, and the next larger would not fit. A vLLM
    engine of 0.3 of the GPU fits too, at a micro-batch the planner picks. Eight GPUs under FSDP2
    fit with the HF rollout in one call."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = [QWEN3, "benchmark=deepmath", "plan.gpu_memory_gib=80", "plan.prompt_tokens=512"]
    one_call = plan_of([*base, "trainer.rollout_batch_size=null"])
    assert not one_call.fits and one_call.peak.name == "rollout"
    kv = {p.name: p for p in one_call.phases}["rollout"].parts["KV cache"]
    assert kv == 128 * 4608 * 112 * 1024
    hf = plan_of(base)
    assert hf.fits and hf.rollout_batch_size == 64 and hf.phases[0].parts["KV cache"] == kv // 2
    assert not plan_of([*base, "trainer.rollout_batch_size=128"]).fits
    assert plan_of([*base, "trainer.rollout_batch_size=66"]).rollout_batch_size == 64  # whole groups
    vllm = plan_of([*base, "rollout=vllm"])
    assert vllm.fits and vllm.micro_batch_size < vllm.rows
    eight = plan_of([*base, "plan.gpus=8", "trainer.strategy=fsdp2"])
    assert eight.fits and eight.rows == eight.rollout_batch_size == 16


@pytest.mark.parametrize(
    ("experiment", "gib", "shape"),
    [
        ("opdplus_replication", 40, ("qwen3_4b_instruct_to_0p6b_base", "gsm8k", 16, 4, 288)),
        ("trl_distillation_1b", 80, ("llama3p2_1b", "gsm8k", 8, 4, 1024)),
    ],
)
def test_the_public_anchors_experiments_have_their_shape_and_fit_their_gpu(monkeypatch, experiment, gib, shape):
    """The OPD+ replication's shape on its A100-40GB (which measured a 29.7 GB peak) and TRL's 1B
    benchmark's on an H100: each composes as one command and the planner says it fits."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = composed(f"experiment={experiment}")
    t = config.trainer
    assert (config.model.name, config.benchmark["name"], t.prompts_per_step, t.samples_per_prompt) == shape[:4]
    assert config.sampling.max_new_tokens == shape[4]
    plan = plan_of([f"experiment={experiment}", f"plan.gpu_memory_gib={gib}"])
    assert plan.fits and plan.rows == shape[2] * shape[3]


def test_a_lora_student_has_gradients_and_adamw_state_for_its_adapters_alone(monkeypatch):
    """Qwen3-0.6B (28 layers, hidden 1,024, 16 query and 8 key-value heads of 128, MLP 3,072):
    r (in + out) per adapted layer is 16 x 22,528 per decoder layer for all seven linear layers,
    16 x (3,072 + 2,048) for q_proj and v_proj alone; float32 under bf16-mixed."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = [QWEN3, "benchmark=deepmath", "plan.gpu_memory_gib=80", "plan.prompt_tokens=512"]
    full = {phase.name: phase.parts for phase in plan_of(base).phases}["update"]
    for targets, per_layer in (("all-linear", 22_528), ("q_proj,v_proj", 5_120)):
        lora = plan_of([*base, "model.lora.r=16", f"model.lora.target_modules='{targets}'"])
        update = {phase.name: phase.parts for phase in lora.phases}["update"]
        adapters = 16 * per_layer * 28
        assert update["gradients"] == adapters * 4 and update["optimizer state"] == 2 * adapters * 4
        assert update["student weights"] == full["student weights"] + adapters * 4
        assert any(f"{count(adapters)} train" in note for note in lora.notes)


def test_a_self_teacher_holds_a_copy_of_the_student_only_for_its_initial_weights_without_lora(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = [QWEN3, "benchmark=deepmath", "plan.gpu_memory_gib=80", "plan.prompt_tokens=512"]

    def update(*overrides: str) -> dict[str, int]:
        return {phase.name: phase.parts for phase in plan_of([*base, *overrides]).phases}["update"]

    assert "teacher weights" not in update("teacher=self")  # the student itself
    assert "teacher weights" not in update("teacher=self", "teacher.weights=initial", "model.lora.r=8")  # its base
    copy = update("teacher=self", "teacher.weights=initial")  # a bfloat16 copy of the float32-master student
    assert copy["teacher weights"] == copy["student weights"] // 2 < update()["teacher weights"]


def test_a_run_that_cannot_fit_is_refused_before_any_weights_load_and_auto_sizes_are_filled(monkeypatch):
    import opdx.run

    def no_loading(*args, **kwargs):
        raise AssertionError("weights loaded before the plan refused the run")

    tight = validate(composed(*FAST_TRAIN, "trainer.steps=1", "plan.gpu_memory_gib=0.001"))
    with monkeypatch.context() as patch:
        patch.setattr(opdx.run, "load_model", no_loading)
        with pytest.raises(ConfigError, match=r"(?s)does not fit in memory.*peak .* does not fit \("):
            start(tight)
    run = validate(composed(*FAST_TRAIN, "trainer.steps=1", "trainer.prompts_per_step=64", "plan.gpu_memory_gib=0.04"))
    assert run.config.trainer.micro_batch_size == "auto"
    start(run)
    assert run.config.trainer.micro_batch_size == 64
    assert run.config.trainer.rollout_batch_size is None  # the whole batch fits its rollout


def test_a_sleeping_engine_gives_its_share_to_the_teacher_and_the_update(monkeypatch):
    """rollout=vllm holds 0.3 of the GPU through every phase unless it sleeps between samplings
    (rollout.sleep, null: on GPUs): then the teacher and the update phases do without it."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = [QWEN3, "benchmark=deepmath", "plan.gpu_memory_gib=80", "plan.prompt_tokens=512", "rollout=vllm"]
    share = int(0.3 * 80 * 2**30)
    for sleep, held in (("null", {"rollout"}), ("false", {"rollout", "teacher", "update"})):
        phases = plan_of([*base, f"rollout.sleep={sleep}"]).phases
        assert {p.name for p in phases[:3] if p.parts.get("vLLM engine") == share} == held
