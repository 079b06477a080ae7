import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST_TRAIN

from opdx.checkpoint import checkpoint_dirs, read_extra, usable_checkpoint
from opdx.config import TrainerConfig
from opdx.metrics import read_metrics
from opdx.samples import read_samples
from opdx.trainer import lr_schedule


def lr_factors(**trainer) -> list[float]:
    """The LR factor at steps 0..steps of a trainer config's schedule."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = lr_schedule(optimizer, TrainerConfig(**trainer))
    factors = []
    for _ in range(trainer["steps"] + 1):
        factors.append(round(schedule.get_last_lr()[0], 4))
        optimizer.step()
        schedule.step()
    return factors


def test_lr_schedules():
    """transformers' schedules: the warmup starts from 0 (step / warmup_steps)."""
    cosine = lr_factors(steps=10, warmup_steps=2, schedule="cosine")
    assert [cosine[s] for s in (0, 1, 2, 6, 10)] == [0.0, 0.5, 1.0, 0.5, 0.0]
    assert lr_factors(steps=10, schedule="linear")[5] == 0.5
    assert lr_factors(steps=10)[9] == 1.0
    assert lr_factors(steps=10, warmup_steps=4)[:6] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]


def test_smoke_run_writes_metrics_summary_and_checkpoint(opdx_cli, tmp_path):
    opdx_cli("train", *FAST_TRAIN, "divergence=forward_kl", f"hydra.run.dir={tmp_path}")
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    step = records[1]
    for key in (
        "train/loss",
        "train/grad_norm",
        "train/lr",
        "reward/token_mean",
        "adv/mean",
        "adv/std",
        "div/f_mean",
        "div/reverse_kl",
        "div/forward_kl",
        "div/log_u_mean",
        "rollout/len_mean",
        "rollout/eos_rate",
        "time/rollout",
        "time/teacher",
        "time/update",
        "perf/tokens_per_s",
    ):
        assert key in step, key
    assert step["div/f_mean"] == pytest.approx(step["div/forward_kl"], rel=1e-5)  # f = u log u
    assert step["rollout/logprob_mismatch"] < 1e-4
    assert 0 < step["rollout/len_mean"] <= 24 and 0 <= step["rollout/eos_rate"] <= 1
    assert "eval/arith/greedy_acc" in records[2] and "eval/arith/greedy_acc" not in records[3]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["divergence"] == "forward_kl" and summary["estimator"] == "unbiased"
    assert summary["teacher_eval"]["greedy_acc"] > 0.5 > summary["initial_eval"]["greedy_acc"]
    assert summary["final_eval"]["step"] == 4
    assert summary["final_eval"]["greedy_acc"] == records[4]["eval/arith/greedy_acc"]
    assert set(summary["mean_step_time_s"]) == {"rollout", "teacher", "update"}
    assert (tmp_path / ".hydra" / "config.yaml").exists() and (tmp_path / "student" / "config.json").exists()
    assert read_extra(usable_checkpoint(tmp_path))["step"] == 4
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_000004", "step_000002"]
    assert all(r["train/skipped"] == 0 for r in records[1:]) and summary["skipped_steps"] == 0
    samples = read_samples(tmp_path)  # logger.samples=4 of each kind at the eval steps 0, 2 and 4
    kinds = [(r["step"], r["split"], r["kind"]) for r in samples[::4]]
    assert kinds == [(0, "eval", "greedy"), (0, "eval", "sampled")] + [
        (step, split, kind)
        for step in (2, 4)
        for split, kind in (("train", "sampled"), ("eval", "greedy"), ("eval", "sampled"))
    ]
    assert len(samples) == 32 and {r["stop"] for r in samples} <= {"eos", "length"}
    train = samples[8]
    assert len(train["log_u"]) == len(train["tokens"]) and train["log_u"] != [0.0] * len(train["tokens"])


def test_the_saved_student_keeps_the_master_dtype_unless_an_export_dtype_is_asked(opdx_cli, tmp_path):
    from safetensors.torch import load_file
    from torch.distributed.checkpoint import FileSystemReader
    from transformers import AutoModelForCausalLM

    common = [*FAST_TRAIN, "trainer.steps=1", "trainer.eval_every=1", "eval.n=0", "eval.problems=4"]
    for name, export, dtype in (
        ("master", [], torch.float32),
        ("bf16", ["trainer.export_dtype=bfloat16"], torch.bfloat16),
    ):
        opdx_cli("train", *common, *export, f"hydra.run.dir={tmp_path / name}")
        weights = load_file(tmp_path / name / "student" / "model.safetensors")
        assert {t.dtype for t in weights.values()} == {dtype}
        assert AutoModelForCausalLM.from_pretrained(tmp_path / name / "student", dtype="auto").dtype == dtype
        stored = FileSystemReader(tmp_path / name / "checkpoints" / "step_000001").read_metadata().state_dict_metadata
        weights = [meta for key, meta in stored.items() if key.startswith("model.")]
        assert weights and {meta.properties.dtype for meta in weights} == {torch.float32}  # the master weights


def kill_after_first_checkpoint(args: list[str], run_dir: Path) -> int:
    """Start `opdx train`, SIGKILL it as soon as a checkpoint exists; the checkpoint's step."""
    process = subprocess.Popen(
        [sys.executable, "-m", "opdx", "train", *args, f"hydra.run.dir={run_dir}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not list(run_dir.glob("checkpoints/*.sha256")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return read_extra(usable_checkpoint(run_dir))["step"]


def test_killed_run_resumes_to_the_same_metrics(opdx_cli, tmp_path):
    overrides = [*FAST_TRAIN, "trainer.steps=12", "divergence=js", "seed=1"]
    opdx_cli("train", *overrides, f"hydra.run.dir={tmp_path / 'whole'}")
    whole = read_metrics(tmp_path / "whole")

    killed = tmp_path / "killed"
    killed_at = kill_after_first_checkpoint(overrides, killed)
    assert killed_at < 12 and not (killed / "summary.json").exists()
    opdx_cli("train", f"trainer.resume={killed}")
    resumed = read_metrics(killed)
    assert [r["step"] for r in resumed] == [r["step"] for r in whole] == list(range(13))
    for a, b in zip(resumed, whole, strict=True):
        for key, value in a.items():
            if not key.startswith(("time/", "perf/")):
                assert value == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["final_eval"] == json.loads((tmp_path / "whole" / "summary.json").read_text())["final_eval"]
    assert read_samples(killed) == read_samples(tmp_path / "whole")  # each step's rows once


def test_resume_without_checkpoint_fails_clearly(opdx_cli, tmp_path):
    result = opdx_cli("train", f"trainer.resume={tmp_path}", check=False)
    assert result.returncode != 0 and "has no checkpoints/" in result.stderr


def test_wandb_offline_logs_config_metrics_and_summary(opdx_cli, tmp_path):
    opdx_cli("train", *FAST_TRAIN, "logger=wandb", "logger.group=smoke", f"hydra.run.dir={tmp_path}")
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run_id = (tmp_path / "wandb_id.txt").read_text().strip()
    assert runs[0].name.endswith(run_id)
    # the offline record log holds protobuf records with their strings verbatim
    records = (runs[0] / f"run-{run_id}.wandb").read_bytes()
    for text in (
        "smoke",
        "forward_kl",
        "unbiased",
        "tiny",
        "arith",
        "prompts_per_step",
        "train/loss",
        "eval/arith/greedy_acc",
        "final_eval",
        "teacher_eval",
        "samples/eval_greedy",
        "samples/train_sampled",
    ):
        assert text.encode() in records, text  # group, tags, config, metrics, summary, sample tables
    assert len(read_metrics(tmp_path)) == 5


def test_warped_sampling_uses_the_log_probs_it_sampled_with(opdx_cli, tmp_path):
    warp = ["sampling.temperature=0.8", "sampling.top_k=8"]
    result = opdx_cli("train", *FAST_TRAIN, "trainer.steps=2", "estimator=stopgrad", *warp, f"hydra.run.dir={tmp_path}")
    assert "u = q/p uses the log-probs of that warped distribution" in result.stdout
    records = read_metrics(tmp_path)
    assert all(r["rollout/logprob_mismatch"] < 1e-4 for r in records[1:])
    assert all(abs(r["div/reverse_kl"]) < 50 for r in records[1:])  # q is the raw teacher: never -inf
    refused = opdx_cli("train", "estimator=analytic", *warp, f"hydra.run.dir={tmp_path}", check=False)
    assert refused.returncode != 0 and "estimator.support=full needs the student's own distribution" in refused.stderr


def test_the_dense_supports_train(opdx_cli, tmp_path):
    opdx_cli(
        "train", *FAST_TRAIN, "trainer.steps=2", "estimator=analytic", "divergence=js", f"hydra.run.dir={tmp_path}"
    )
    records = read_metrics(tmp_path)
    # at gamma = 0 the loss is the mean over sequences of sum_n JS(p, q)(s_n): positive, below T log 2
    assert all(0 < r["train/loss"] < 24 * 0.6932 for r in records[1:])
    assert all(r["rollout/logprob_mismatch"] < 1e-4 for r in records[1:])
    topk = ["estimator=unbiased", "estimator.support=topk", "estimator.top_k=4", "estimator.gamma=1"]
    opdx_cli("train", *FAST_TRAIN, "trainer.steps=2", *topk, f"hydra.run.dir={tmp_path / 'topk'}")
    records = read_metrics(tmp_path / "topk")[1:]
    assert all(r["train/skipped"] == 0 and math.isfinite(r["train/loss"]) and r["train/grad_norm"] > 0 for r in records)


def train_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl without wall times (and eval keys), for comparing trajectories."""
    return [
        {k: v for k, v in r.items() if not k.startswith(("time/", "perf/", "eval/"))} for r in read_metrics(run_dir)
    ]


def test_eval_settings_do_not_change_the_training_trajectory(opdx_cli, tmp_path):
    """Issue fault 2: eval sampling drew from the global generator, so eval.n changed step 1's loss."""
    opdx_cli("train", *FAST_TRAIN, "eval.n=2", f"hydra.run.dir={tmp_path / 'a'}")
    opdx_cli(
        "train", *FAST_TRAIN, "eval.n=0", "eval.problems=8", "trainer.eval_every=1", f"hydra.run.dir={tmp_path / 'b'}"
    )
    a, b = train_metrics(tmp_path / "a"), train_metrics(tmp_path / "b")
    assert a == b and len(a) == 5 and a[1]["train/loss"] != 0


def test_resuming_a_finished_run_to_more_steps_equals_the_longer_run(opdx_cli, tmp_path):
    """Issue fault 3: README's example, a finished 2-step run resumed with trainer.steps=4."""
    opdx_cli("train", *FAST_TRAIN, "trainer.steps=2", f"hydra.run.dir={tmp_path / 'short'}")
    opdx_cli("train", f"trainer.resume={tmp_path / 'short'}", "trainer.steps=4")
    opdx_cli("train", *FAST_TRAIN, f"hydra.run.dir={tmp_path / 'long'}")
    assert train_metrics(tmp_path / "short") == train_metrics(tmp_path / "long")
    short, long = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("short", "long"))
    assert short["final_eval"] == long["final_eval"] and short["steps"] == 4


def overflowing_teacher(out_dir: Path, token: str = "(") -> Path:
    """The tiny teacher (untied) whose input embedding of ``token`` is inf, as in a float16 teacher
    that overflows: its log-probs are NaN at every position after that token, which the student
    samples rarely."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opdx.config import asset_path

    tokenizer = AutoTokenizer.from_pretrained(asset_path("tiny/teacher"))
    model = AutoModelForCausalLM.from_pretrained(asset_path("tiny/teacher"), tie_word_embeddings=False)
    model.lm_head.weight.data = model.model.embed_tokens.weight.data.clone()
    model.model.embed_tokens.weight.data[tokenizer.convert_tokens_to_ids(token)] = float("inf")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def test_a_non_finite_teacher_log_prob_skips_the_step_and_too_many_stop_the_run(opdx_cli, tmp_path):
    """Issue fault 1: a -inf / NaN teacher log-prob on a response token was applied as an update
    (loss -inf, grad norm nan) and the next step crashed in sampling."""
    teacher = overflowing_teacher(tmp_path / "teacher")
    common = [*FAST_TRAIN, "trainer.steps=12", "trainer.prompts_per_step=16", "trainer.eval_every=12"]
    common += ["trainer.checkpoint_every=1", "eval.n=0", f"model.teacher={teacher}"]
    opdx_cli("train", *common, f"hydra.run.dir={tmp_path / 'run'}")
    records = read_metrics(tmp_path / "run")[1:]
    skipped = [r for r in records if r["train/skipped"]]
    assert 0 < len(skipped) < len(records)
    assert all(r["nonfinite/teacher_logprobs"] > 0 and "train/loss" not in r for r in skipped)
    assert all(
        math.isfinite(r["train/loss"]) and math.isfinite(r["train/grad_norm"]) for r in records if r not in skipped
    )
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped_steps"] == len(skipped) == records[-1]["train/skipped_steps"]
    from safetensors.torch import load_file

    student = load_file(tmp_path / "run" / "student" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in student.values())

    first_bad = skipped[0]["step"]
    result = opdx_cli("train", *common, "trainer.max_bad_steps=1", f"hydra.run.dir={tmp_path / 'stop'}", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"1 steps in a row (to step {first_bad}) were skipped because teacher_logprobs" in result.stderr
    assert "A float16 teacher that overflows" in result.stderr
    assert read_metrics(tmp_path / "stop")[-1]["step"] == first_bad
    assert read_extra(usable_checkpoint(tmp_path / "stop"))["step"] == first_bad - 1


def test_the_advice_on_non_finite_steps_follows_what_was_not_finite():
    from opdx.config import EstimatorConfig
    from opdx.trainer import nonfinite_advice

    plain = EstimatorConfig("unbiased")
    assert "teacher_dtype" in nonfinite_advice("teacher_logprobs,advantages,loss", plain)
    assert "float16 student" in nonfinite_advice("student_logprobs,loss", plain)
    advice = nonfinite_advice("advantages,loss", plain)
    assert "log-probs were finite" in advice and "log_ratio_clip" in advice and "teacher_dtype" not in advice
    weighted = EstimatorConfig("unbiased", rollout_correction="per_decision")
    assert "per_decision_cap" in nonfinite_advice("advantages,loss", weighted)
    capped = EstimatorConfig("unbiased", rollout_correction="per_decision", per_decision_cap=10.0)
    assert "per_decision_cap" not in nonfinite_advice("advantages,loss", capped)


def test_a_skipped_step_changes_no_parameter_optimizer_or_schedule(tmp_path):
    from test_config import composed

    from opdx.run import start, validate
    from opdx.trainer import build_learner, train_step

    teacher = overflowing_teacher(tmp_path / "teacher")
    run = validate(composed(*FAST_TRAIN, "trainer.prompts_per_step=16", f"model.teacher={teacher}"))
    learner = build_learner(run, start(run))
    results = []
    for step in range(12):
        before = {k: v.clone() for k, v in learner.student.state_dict().items()}
        optimizer_steps, lr_steps = len(learner.optimizer.state), learner.scheduler.last_epoch
        metrics = train_step(learner, step)
        unchanged = all(torch.equal(v, learner.student.state_dict()[k]) for k, v in before.items())
        results.append((metrics["train/skipped"], unchanged, learner.scheduler.last_epoch == lr_steps))
        if metrics["train/skipped"]:
            assert len(learner.optimizer.state) == optimizer_steps
    assert (1.0, True, True) in results and (0.0, False, False) in results
    assert all(skipped == unchanged == kept_lr for skipped, unchanged, kept_lr in results)


def test_a_rollout_is_sampled_in_calls_of_whole_groups():
    """trainer.rollout_batch_size=5 with 2 samples per prompt: calls of 2 prompts (4 sequences),
    the last one of what is left; the step trains on their rows joined in order."""
    from test_config import composed

    from opdx.run import start, validate
    from opdx.trainer import build_learner, train_step

    run = validate(composed(*FAST_TRAIN, "trainer.prompts_per_step=5", "trainer.rollout_batch_size=5"))
    learner = build_learner(run, start(run))
    calls, sample = [], learner.rollout.sample

    def recorded(problems, samples_per_prompt, *args, **kwargs):
        calls.append(sample(problems, samples_per_prompt, *args, **kwargs))
        return calls[-1]

    learner.rollout.sample = recorded
    metrics = train_step(learner, 0)
    assert [len(rollout.problems) for rollout in calls] == [4, 4, 2]
    lengths_B = torch.cat([rollout.lengths_B for rollout in calls]).double()
    assert metrics["rollout/len_mean"] == pytest.approx(lengths_B.mean().item())
    assert metrics["train/skipped"] == 0 and math.isfinite(metrics["train/loss"])


def test_resume_refuses_overrides_that_change_the_run_and_keeps_its_files(opdx_cli, tmp_path):
    opdx_cli("train", *FAST_TRAIN, "trainer.steps=2", f"hydra.run.dir={tmp_path}")
    hydra_files = [tmp_path / ".hydra" / name for name in ("overrides.yaml", "config.yaml")]
    saved = [path.read_text() for path in hydra_files]
    refused = opdx_cli("train", f"trainer.resume={tmp_path}", "divergence=js", "trainer.lr=0.01", check=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "divergence.name: forward_kl -> js" in refused.stderr and "trainer.lr: 0.001 -> 0.01" in refused.stderr
    assert [path.read_text() for path in hydra_files] == saved
    allowed = opdx_cli("train", f"trainer.resume={tmp_path}", "trainer.steps=3", "eval.n=0", "logger=jsonl")
    assert "resuming" in allowed.stdout and read_metrics(tmp_path)[-1]["step"] == 3


MICRO_SETTINGS = [
    ["estimator=unbiased"],
    ["estimator=stopgrad", "estimator.gamma=1"],
    ["estimator=unbiased", "estimator.token_mean=true"],
    ["estimator=unbiased", "estimator.batch_baseline=true"],
    ["estimator=stopgrad", "estimator.whiten=true", "estimator.log_ratio_clip=2"],
    ["estimator=unbiased", "estimator.rollout_correction=tis"],
    ["estimator=unbiased", "estimator.rollout_correction=ppo"],
    ["estimator=unbiased", "estimator.rollout_correction=per_decision", "estimator.gamma=1"],
    ["estimator=analytic"],
    ["estimator=analytic", "estimator.token_mean=true"],
    ["estimator=unbiased", "estimator.support=topk", "estimator.top_k=3", "estimator.gamma=1"],
    ["estimator=stopgrad", "estimator.state_baseline=true", "estimator.gamma=1"],
]


@pytest.fixture(scope="module")
def float64_pair():
    """The tiny pair in float64 and a rollout of 9 distinct prompts whose sampler log-probs are
    moved off the trainer's (so the importance ratios of tis, ppo and per_decision are not 1)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opdx.backends.hf import HFModel
    from opdx.config import asset_path

    tokenizer = AutoTokenizer.from_pretrained(asset_path("tiny/student"))
    teacher = HFModel(AutoModelForCausalLM.from_pretrained(asset_path("tiny/teacher"), dtype=torch.float64), tokenizer)
    student = AutoModelForCausalLM.from_pretrained(asset_path("tiny/student"), dtype=torch.float64)
    torch.manual_seed(0)
    prompts = ["12+7=", "3-45+6=", "9=", "77-8=", "5*6=", "1+1=", "40-2=", "8+8+8=", "7="]
    rollout = HFModel(student, tokenizer).sample(prompts, 1, 10)
    rollout.logp_sampling_B_T = rollout.logp_sampling_B_T + 0.3 * torch.randn(rollout.logp_sampling_B_T.shape)
    return teacher, rollout


@pytest.mark.parametrize("overrides", MICRO_SETTINGS, ids=lambda o: " ".join(o))
def test_micro_batches_give_the_gradient_of_the_whole_batch(overrides, float64_pair):
    """Micro-batches of 2 sequences (5 of them for 9 rows) against one forward of the whole batch:
    every normaliser is the whole batch's, so the summed gradient is equal to float64 round-off,
    and so are the loss and the advantages the metrics read."""
    from hydra import compose, initialize_config_dir
    from transformers import AutoModelForCausalLM

    from opdx.config import CONF_DIR, asset_path, register_resolvers, register_schema
    from opdx.policy import TokenScores
    from opdx.run import validate
    from opdx.trainer import accumulate_gradients

    register_schema()
    register_resolvers()
    teacher, rollout = float64_pair
    results = []
    for micro in ("null", "2"):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=["divergence=js", f"trainer.micro_batch_size={micro}", *overrides])
        policy = TokenScores(AutoModelForCausalLM.from_pretrained(asset_path("tiny/student"), dtype=torch.float64))
        metrics: dict[str, float] = {}
        terms, bad = accumulate_gradients(policy, teacher, validate(cfg), rollout, metrics)
        assert not bad and metrics["time/teacher"] > 0 and metrics["time/update"] > 0
        results.append((terms, {name: p.grad for name, p in policy.named_parameters()}))
    (whole, grads_whole), (micro, grads_micro) = results
    scale = max(g.abs().max().item() for g in grads_whole.values())
    worst = max((grads_micro[name] - g).abs().max().item() for name, g in grads_whole.items())
    assert scale > 1e-3 and worst <= 1e-12 * scale, f"{worst:.2e} at scale {scale:.2e}"
    torch.testing.assert_close(micro.loss, whole.loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(micro.advantages_B_T, whole.advantages_B_T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16"])
def test_at_lr_1e_6_mixed_precision_moves_every_weight_and_pure_bf16_loses_most_updates(precision):
    """One AdamW step at lr 1e-6 on a bfloat16-computing student: with float32 master weights
    (bf16-mixed) every parameter tensor moves, norm weights included, and the optimizer state is
    float32; in pure bfloat16 an update below half a weight's step rounds away, so most elements and
    every norm weight (1.0, step 2^-7) stay put."""
    from hydra import compose, initialize_config_dir

    from opdx.config import CONF_DIR, register_resolvers, register_schema
    from opdx.run import start, validate
    from opdx.trainer import build_learner, train_step

    register_schema()
    register_resolvers()
    overrides = ["model.dtype=bfloat16", f"trainer.precision={precision}", "trainer.lr=1e-6", "runtime.threads=1"]
    overrides += ["trainer.prompts_per_step=4", "trainer.samples_per_prompt=2", "eval.problems=8"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        run = validate(compose("config", overrides=overrides))
    learner = build_learner(run, start(run))
    before = {name: p.detach().clone() for name, p in learner.policy.named_parameters()}
    metrics = train_step(learner, 0)
    assert not metrics["train/skipped"]
    moved = {name: (p.detach() != before[name]).float().mean().item() for name, p in learner.policy.named_parameters()}
    norms = [name for name in moved if "norm" in name]
    assert norms
    if precision == "bf16-mixed":
        assert all(p.dtype == torch.float32 for p in learner.policy.parameters())
        assert all(s.dtype == torch.float32 for st in learner.optimizer.state.values() for s in st.values() if s.ndim)
        assert min(moved.values()) > 0.9  # every tensor, nearly every element
    else:
        assert all(p.dtype == torch.bfloat16 for p in learner.policy.parameters())
        assert max(moved[name] for name in norms) == 0.0
        changed = sum(moved[n] * before[n].numel() for n in moved) / sum(t.numel() for t in before.values())
        assert changed < 0.2


def test_the_probe_sets_the_other_estimators_gradient_beside_the_runs_and_changes_nothing(opdx_cli, tmp_path):
    """trainer.probe_every=2: probe/* at steps 2 and 4, and every other metric as without the probe."""
    for name, probe in (("plain", []), ("probed", ["trainer.probe_every=2"])):
        opdx_cli("train", *FAST_TRAIN, *probe, f"hydra.run.dir={tmp_path / name}")
    plain, probed = train_metrics(tmp_path / "plain"), train_metrics(tmp_path / "probed")
    assert [r["step"] for r in probed if "probe/cosine" in r] == [2, 4]
    assert [{k: v for k, v in r.items() if not k.startswith("probe/")} for r in probed] == plain
    assert all(
        -1 <= r["probe/cosine"] < 0.999 and r["probe/relative_difference"] > 0.01 for r in probed if "probe/cosine" in r
    )


@pytest.mark.parametrize(("divergence", "same"), [("reverse_kl", True), ("forward_kl", False)])
def test_the_probe_finds_reverse_kl_estimators_equal_under_a_batch_baseline(divergence, same):
    """For reverse_kl, w_f(u) = -f(u) - 1: OPD+ is OPD with every reward shifted by -1, which the
    batch baseline removes at gamma = 0, so the two gradients are one; for forward_kl they differ."""
    from test_config import composed

    from opdx.run import start, validate
    from opdx.trainer import build_learner, train_step

    settings = [*FAST_TRAIN, f"divergence={divergence}", "estimator.batch_baseline=true", "trainer.probe_every=1"]
    run = validate(composed(*settings))
    metrics = train_step(build_learner(run, start(run)), 0)
    if same:
        assert metrics["probe/cosine"] == pytest.approx(1.0, abs=1e-6)
        assert metrics["probe/relative_difference"] < 1e-5
        assert metrics["probe/grad_norm_other"] == pytest.approx(metrics["train/grad_norm"], rel=1e-5)
    else:
        assert metrics["probe/cosine"] < 0.99 and metrics["probe/relative_difference"] > 0.1


@pytest.mark.parametrize(("divergence", "support"), [("reverse_kl", "full"), ("forward_kl", "full"), ("js", "sampled")])
def test_the_probes_reference_is_opd_plus_on_the_full_support(divergence, support):
    """A stop-gradient run's probe beside the exact reference (OPD+ on the full support). On the
    full support stop-gradient reverse_kl's gradient is OPD+'s exactly (the advantages differ by -1,
    and sum_c p_c grad log p_c = 0 at every state); forward_kl's is not. On the sampled token the
    reference is another estimator than the run's OPD+ beside it, and both cosines are < 1."""
    from test_config import composed

    from opdx.run import start, validate
    from opdx.trainer import build_learner, train_step

    settings = [*FAST_TRAIN, f"divergence={divergence}", "trainer.probe_every=1", "trainer.prompts_per_step=8"]
    run = validate(composed(*settings, "estimator=stopgrad", f"estimator.support={support}"))
    metrics = train_step(build_learner(run, start(run)), 0)
    if divergence == "reverse_kl":
        assert metrics["probe/reference_cosine"] == pytest.approx(1.0, abs=1e-6)
    else:
        assert -1 <= metrics["probe/reference_cosine"] < 0.99
    if support == "sampled":  # the OPD+ beside it is not the reference either
        assert -1 <= metrics["probe/reference_cosine_other"] < 0.999
    opd_plus = validate(composed(*settings, "estimator.support=full"))
    assert "probe/reference_cosine" not in train_step(build_learner(opd_plus, start(opd_plus)), 0)  # the reference


def test_each_rank_resumes_its_own_batches_sampled_ahead_or_samples_them_again_on_another_world(capsys):
    from opdx.dist import Ranks
    from opdx.trainer import PENDING, pending_batches

    one, second_of_two = Ranks(), Ranks(rank=1, world=2)
    assert pending_batches({PENDING: [{5: "a"}]}, one) == {5: "a"}
    assert pending_batches({PENDING: {5: "a"}}, one) == {5: "a"}  # a one-process checkpoint of the older format
    assert pending_batches({PENDING: [{5: "a"}, {5: "b"}]}, second_of_two) == {5: "b"}
    assert pending_batches({}, one) == {} and pending_batches({PENDING: [{}, {}]}, one) == {}
    assert capsys.readouterr().out == ""
    assert pending_batches({PENDING: [{5: "a"}, {5: "b"}]}, one) == {}
    assert "sampled ahead on 2 ranks are sampled again on 1" in capsys.readouterr().out


def test_an_early_warning_stops_the_run_at_its_step_and_the_resumed_run_is_the_uninterrupted_one(opdx_cli, tmp_path):
    """trainer.stop_on_warning: the run stops at the warning's step with that step's checkpoint; the
    monitor's state resumes with it, so the warning does not fire twice and the metrics are the
    uninterrupted run's (window 1 and a factor just above 1: the first step whose gradient norm
    rises above its lowest so far warns)."""
    others = ("eos_rate", "reverse_kl", "ess", "clip_fraction")
    rules = ["monitor.window=1", "monitor.grad_norm=1.001", *(f"monitor.{name}=null" for name in others)]
    common = [*FAST_TRAIN, "trainer.steps=6", "trainer.eval_every=6", "trainer.checkpoint_every=6", *rules]
    whole = opdx_cli("train", *common, f"hydra.run.dir={tmp_path / 'whole'}")
    records = read_metrics(tmp_path / "whole")
    fired = [r["step"] for r in records if "warning/grad_norm" in r]
    assert len(fired) == 1 and 1 < fired[0] < 6
    assert f"warning at step {fired[0]}: gradient norm (before clipping)" in whole.stdout
    norms = [r["train/grad_norm"] for r in records[1:]]
    for k, r in enumerate(records[1:]):  # the factor from its lowest so far
        assert r["monitor/grad_norm"] == pytest.approx(norms[k] / min(norms[: k + 1]), rel=1e-12)
    assert json.loads((tmp_path / "whole" / "summary.json").read_text())["early_warnings"] == {"grad_norm": fired[0]}
    assert f"early warnings: grad_norm at step {fired[0]}\n" in whole.stdout

    stop = tmp_path / "stop"
    stopped = opdx_cli("train", *common, "trainer.stop_on_warning=true", f"hydra.run.dir={stop}", check=False)
    assert stopped.returncode == 1 and "Traceback" not in stopped.stderr
    assert f"warning at step {fired[0]}: gradient norm" in stopped.stderr
    assert f"(trainer.stop_on_warning). The checkpoint of step {fired[0]}" in stopped.stderr
    assert read_extra(usable_checkpoint(stop))["step"] == fired[0] and not (stop / "summary.json").exists()
    listed = opdx_cli("table", str(stop), check=False).stdout
    assert f"stopped at its early warning (trainer.stop_on_warning): {stop} at step {fired[0]} of 6" in listed
    opdx_cli("train", f"trainer.resume={stop}")
    resumed = read_metrics(stop)
    assert [r["step"] for r in resumed] == list(range(7))
    sweep = tmp_path / "sweep"  # under -m a stopped run says so and the sweep goes on with the next
    result = opdx_cli("train", "-m", *common, "trainer.stop_on_warning=true", "seed=0,1", f"hydra.sweep.dir={sweep}")
    assert result.stderr.count("(trainer.stop_on_warning). The checkpoint of step") == 2
    assert all(usable_checkpoint(run_dir) for run_dir in sorted(sweep.glob("*_s[01]")))
    for a, b in zip(resumed, records, strict=True):
        assert a.keys() == b.keys()
        for key, value in a.items():
            if not key.startswith(("time/", "perf/")):
                assert value == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)
