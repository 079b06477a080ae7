"""Run by tests/test_dist.py under torchrun (2 processes, gloo, one thread each):

    torchrun --standalone --nproc_per_node=2 tests/dist_gradients.py ddp fsdp2   # or either alone

For fixed rollouts of 12 sequences (12 distinct prompts; 4 prompts x 3 samples) and each estimator
setting, the gradient that the ranks compute from their shares (rank r: sequences r, r + 2, ...)
through the trainer's ``accumulate_gradients`` (the whole batch's normalisers, micro-batches of 2
or 4 sequences, the strategy's reduction once per step) must equal the gradient of the estimator's
loss of the whole batch in one forward and one process, in float64. Prints the largest difference
of each rollout; exits 1 when it exceeds 1e-10 (distinct prompts) or 1e-6 of the gradient's scale
(groups). Then a step skipped at its second micro-batch must leave nothing in the next step's
gradient. Each strategy named in turn, in one process group.
"""

import sys
from dataclasses import replace

import torch
from hydra import compose, initialize_config_dir
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, AutoTokenizer

from opdx.backends import teacher_scores
from opdx.backends.hf import HFModel
from opdx.config import CONF_DIR, LoraConfig, asset_path, register_resolvers, register_schema
from opdx.dist import Ranks, global_max, init, wrap
from opdx.lora import add_adapters
from opdx.objective import LossInputs
from opdx.policy import TokenScores, full_weights
from opdx.rollout import Rollout
from opdx.run import Run, validate
from opdx.trainer import accumulate_gradients

SETTINGS = [  # estimator overrides, and the micro-batch size of each rank's share
    (["estimator=unbiased", "estimator.token_mean=true", "estimator.batch_baseline=true"], 2),
    (["estimator=stopgrad", "estimator.whiten=true", "estimator.gamma=1"], 4),
    (["estimator=unbiased"], None),
    (["estimator=analytic", "estimator.token_mean=true", "runtime.dense_chunk=5"], 2),
    (["estimator=unbiased", "estimator.support=topk", "estimator.top_k=3", "estimator.gamma=1"], 2),
]


def composed_run(overrides: list[str]) -> Run:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return validate(compose(config_name="config", overrides=["divergence=forward_kl", *overrides]))


def student() -> AutoModelForCausalLM:
    return AutoModelForCausalLM.from_pretrained(asset_path("tiny/student"), dtype=torch.float64)


def main() -> int:
    register_schema()
    register_resolvers()
    torch.set_num_threads(1)
    ranks = init()
    tokenizer = AutoTokenizer.from_pretrained(asset_path("tiny/student"))
    teacher = HFModel(AutoModelForCausalLM.from_pretrained(asset_path("tiny/teacher"), dtype=torch.float64), tokenizer)
    torch.manual_seed(0)  # the same rollouts on every rank
    # 12 distinct prompts: every row runs whole, exact to 1e-10. Groups of 3 samples share their
    # prompt's forward (not under FSDP2), whose float32 norms round differently for other batch
    # shapes: equal to 1e-6 of the gradient's scale.
    distinct = ["12+7=", "3-45+6=", "9=", "77-8=", "5*6=", "1+1=", "40-2=", "8+8+8=", "7=", "6-1=", "2*3+4=", "99="]
    rollouts = {
        "distinct prompts": (HFModel(student(), tokenizer).sample(distinct, 1, 10), 1e-10),
        "groups of 3": (HFModel(student(), tokenizer).sample(distinct[:4], 3, 10), 1e-6),
    }
    return int(any([check(strategy, ranks, teacher, rollouts) for strategy in sys.argv[1:]]))


def check(strategy: str, ranks: Ranks, teacher: HFModel, rollouts: dict[str, tuple[Rollout, float]]) -> bool:
    """Whether ``strategy`` failed any of the module docstring's checks (each printed by rank 0)."""
    failed = False
    for name, (rollout, tolerance) in rollouts.items():
        worst, scale = largest_difference(strategy, ranks, teacher, rollout)
        if ranks.main:
            print(f"{strategy}, {name}: largest gradient difference from one process: {worst:.2e} (scale {scale:.1f})")
        failed |= worst > tolerance * (scale if tolerance > 1e-10 else 1.0)
    leftover = leftover_after_a_skipped_step(strategy, ranks, teacher, rollouts["distinct prompts"][0])
    if ranks.main:
        print(f"{strategy}, after a skipped step: largest gradient difference from a fresh step: {leftover:.2e}")
    merged = lora_merged_difference(strategy)
    if ranks.main:
        print(f"{strategy}, a LoRA student's merged weights: largest difference from one process: {merged:.2e}")
    failed |= merged > 1e-12
    if strategy == "fsdp2":
        dtypes = mixed_precision_dtypes(rollouts["distinct prompts"][0])
        if ranks.main:
            print(f"fsdp2 bf16-mixed: {dtypes}")
        failed |= dtypes != {"computed": "bfloat16", "master": "float32", "gradients": "float32"}
    return failed or leftover > 1e-12


def lora_merged_difference(strategy: str) -> float:
    """The merged weights of a LoRA student (``full_weights``: W + (alpha / r) B A, what a sampler
    gets) gathered from the ranks' replicas or shards, against the same in one process."""
    policies = []
    for _ in range(2):  # the same adapters twice: seeded A, and B moved off its zero start
        torch.manual_seed(0)
        model = student()
        add_adapters(model, LoraConfig(r=4, alpha=8))
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.data.normal_(0, 0.1)
        policies.append((model, TokenScores(model)))
    reference = dict(full_weights(policies[0][1], torch.float64))
    model, policy = policies[1]
    gathered = dict(
        full_weights(wrap(policy, strategy, model.model.layers, torch.device("cpu"), ("generate",)), torch.float64)
    )
    assert list(gathered) == list(reference)
    return max((gathered[name] - tensor).abs().max().item() for name, tensor in reference.items())


def mixed_precision_dtypes(rollout: Rollout) -> dict[str, str]:
    """Under FSDP2 with ``param_dtype=bfloat16`` (``trainer.precision=bf16-mixed``): the dtype of a
    layer's weight inside its forward, of the optimizer's (sharded) parameters and of their gradients."""
    model = AutoModelForCausalLM.from_pretrained(asset_path("tiny/student"))
    policy = wrap(TokenScores(model), "fsdp2", model.model.layers, torch.device("cpu"), ("generate",), torch.bfloat16)
    seen = {}
    projection = model.model.layers[0].mlp.down_proj
    projection.register_forward_pre_hook(lambda module, _: seen.update(computed=module.weight.dtype))
    policy(rollout)[rollout.response_mask_B_T].sum().backward()
    parameter = next(policy.parameters())
    return {
        key: str(dtype).removeprefix("torch.")
        for key, dtype in (
            ("computed", seen["computed"]),
            ("master", parameter.dtype),
            ("gradients", parameter.grad.dtype),
        )
    }


class PoisonedTeacher:
    """The teacher, with non-finite log-probs from its ``poisoned``-th call on (a fault to inject)."""

    def __init__(self, teacher: HFModel, poisoned: int) -> None:
        self.teacher, self.calls, self.poisoned = teacher, 0, poisoned

    def logprobs(self, rollout: Rollout) -> torch.Tensor:
        self.calls += 1
        scores = self.teacher.logprobs(rollout)
        return scores * float("nan") if self.calls >= self.poisoned else scores


def leftover_after_a_skipped_step(strategy: str, ranks: Ranks, teacher: HFModel, rollout: Rollout) -> float:
    """A step whose second micro-batch is not finite is skipped after the first micro-batch's
    backward (without sync); the optimizer's zero_grad then the next step must give the gradient of
    a fresh step: nothing of the skipped one may remain (FSDP2 keeps unsynced gradients apart)."""
    rows = list(range(ranks.rank, rollout.response_tokens_B_T.shape[0], ranks.world))
    share = rollout.select(rows)
    run = composed_run(["estimator=unbiased", "trainer.micro_batch_size=2"])
    grads = []
    for skip_first in (False, True):
        model = student()
        policy = wrap(TokenScores(model), strategy, model.model.layers, torch.device("cpu"), ("generate",))
        optimizer = torch.optim.SGD(policy.parameters(), lr=0.0)
        if skip_first:
            _, bad = accumulate_gradients(policy, PoisonedTeacher(teacher, poisoned=2), run, share, {})
            assert bad, "the poisoned micro-batch must be found"
            optimizer.zero_grad(set_to_none=True)
        accumulate_gradients(policy, teacher, run, share, {})
        grads.append([p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad for p in policy.parameters()])
    worst = max((a - b).abs().max().item() for a, b in zip(*grads, strict=True))
    return global_max(torch.tensor(worst)).item()


def largest_difference(strategy: str, ranks: Ranks, teacher: HFModel, rollout: Rollout) -> tuple[float, float]:
    """The largest |2-rank gradient - 1-process gradient| over the estimator settings, and the
    largest |gradient|."""
    rows = list(range(ranks.rank, rollout.response_tokens_B_T.shape[0], ranks.world))
    share = replace(
        rollout,
        **{name: getattr(rollout, name)[rows] for name in ("prompt_tokens_B_L", "prompt_mask_B_L",
           "response_tokens_B_T", "response_mask_B_T", "logp_sampling_B_T", "finished_B")},
        problems=[rollout.problems[i] for i in rows],
    )  # fmt: skip
    worst, scale = 0.0, 0.0
    for overrides, micro_batch_size in SETTINGS:
        run = composed_run(overrides)  # the reference: the estimator's loss of the whole batch, in one forward
        estimator = run.estimator
        whole = TokenScores(student())
        scores = teacher_scores(teacher, rollout, estimator.teacher_support, estimator.config.top_k)
        inputs = LossInputs(
            whole(rollout, logits=estimator.needs_dense), scores, rollout.response_mask_B_T, rollout.response_tokens_B_T
        )
        run.estimator.loss(inputs, run.divergence).loss.backward()
        expected = {name: p.grad for name, p in whole.named_parameters()}
        model = student()
        policy = wrap(TokenScores(model), strategy, model.model.layers, torch.device("cpu"), ("generate",))
        run = composed_run([*overrides, f"trainer.micro_batch_size={micro_batch_size or 'null'}"])
        accumulate_gradients(policy, teacher, run, share, {})
        for name, p in policy.named_parameters():
            grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            reference = expected[name.removeprefix("module.")]
            worst = max(worst, global_max((grad - reference).abs().max()).item())
            scale = max(scale, reference.abs().max().item())
    return worst, scale


if __name__ == "__main__":
    raise SystemExit(main())
