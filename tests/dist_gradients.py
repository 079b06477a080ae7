"""Run by tests/test_dist.py under torchrun (2 processes, gloo, one thread each):

    torchrun --standalone --nproc_per_node=2 tests/dist_gradients.py ddp     # or fsdp2

For fixed rollouts of 12 sequences (12 distinct prompts; 4 prompts x 3 samples) and each estimator
setting, the gradient that the ranks compute from their shares (rank r: sequences r, r + 2, ...)
with the trainer's global normalisers and the strategy's reduction must equal the one-process
gradient of the whole batch, in float64. Prints the largest difference of each rollout; exits 1
when it exceeds 1e-10 (distinct prompts) or 1e-6 of the gradient's scale (groups).
"""

import sys
from dataclasses import replace

import torch
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, AutoTokenizer

from opdx.backends.hf import HFModel
from opdx.config import EstimatorConfig, asset_path
from opdx.dist import Ranks, global_max, global_sum, init, wrap
from opdx.divergences import get_divergence
from opdx.objective import LossInputs, build_estimator
from opdx.policy import TokenScores
from opdx.rollout import Rollout

SETTINGS = [
    EstimatorConfig(name="unbiased", token_mean=True, batch_baseline=True),
    EstimatorConfig(name="stopgrad", whiten=True, gamma=1.0),
    EstimatorConfig(name="unbiased"),
    EstimatorConfig(name="analytic", token_mean=True),
]


def student() -> AutoModelForCausalLM:
    return AutoModelForCausalLM.from_pretrained(asset_path("tiny/student"), dtype=torch.float64)


def main() -> int:
    strategy = sys.argv[1]
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
    failed = False
    for name, (rollout, tolerance) in rollouts.items():
        worst, scale = largest_difference(strategy, ranks, teacher, rollout)
        if ranks.main:
            print(f"{strategy}, {name}: largest gradient difference from one process: {worst:.2e} (scale {scale:.1f})")
        failed |= worst > tolerance * (scale if tolerance > 1e-10 else 1.0)
    return int(failed)


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
    div, worst, scale = get_divergence("forward_kl"), 0.0, 0.0
    for config in SETTINGS:
        estimator = build_estimator(config)
        logits = estimator.needs_teacher_logits
        teacher_scores = teacher.logits(rollout) if logits else teacher.logprobs(rollout)
        whole = TokenScores(student())
        inputs = LossInputs(
            whole(rollout, logits=logits), teacher_scores, rollout.response_mask_B_T, rollout.response_tokens_B_T
        )
        loss = estimator.loss(inputs, div).loss
        loss.backward()
        expected = {name: p.grad for name, p in whole.named_parameters()}
        model = student()
        policy = wrap(TokenScores(model), strategy, model.model.layers, torch.device("cpu"), ("generate",))
        inputs = LossInputs(
            policy(share, logits=logits), teacher_scores[rows], share.response_mask_B_T, share.response_tokens_B_T
        )
        loss = estimator.loss(inputs, div, reduce=global_sum).loss
        loss.backward()
        for name, p in policy.named_parameters():
            grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            reference = expected[name.removeprefix("module.")]
            worst = max(worst, global_max((grad - reference).abs().max()).item())
            scale = max(scale, reference.abs().max().item())
    return worst, scale


if __name__ == "__main__":
    raise SystemExit(main())
