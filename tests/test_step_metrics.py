"""The per-step metrics: each reduction against its plain formula on one process."""

import math

import pytest
import torch

from opdx.benchmarks import Problem
from opdx.divergences import get_divergence
from opdx.objective import LossTerms
from opdx.rollout import Rollout
from opdx.step_metrics import (
    component_metrics,
    eval_metrics,
    importance_ess,
    mean_std_min_max,
    rollout_metrics,
    sequence_metrics,
)


def rollout_and_terms():
    torch.manual_seed(0)
    rollout = Rollout.from_token_lists([[1]] * 4, [[5, 6, 7], [5, 6], [5], [5, 6, 7]], pad_id=0)
    rollout.problems = [Problem("p", "a", source=s) for s in ("arith", "products", "arith", "products")]
    log_u_B_T, advantages_B_T = torch.randn(4, 3), torch.randn(4, 3)
    rollout.logp_sampling_B_T = torch.randn(4, 3)
    logp_student_B_T = rollout.logp_sampling_B_T + 0.01 * torch.randn(4, 3)
    mask_B_T = rollout.response_mask_B_T
    log_u_B_T = torch.where(mask_B_T, log_u_B_T, 0.0)  # as the estimators give it
    return rollout, LossTerms(torch.tensor(0.0), logp_student_B_T, log_u_B_T, advantages_B_T)


def test_rollout_metrics_equal_their_plain_formulas():
    rollout, terms = rollout_and_terms()
    js, mask = get_divergence("js"), rollout.response_mask_B_T
    log_u, adv = terms.log_u_B_T[mask], terms.advantages_B_T[mask]
    metrics = rollout_metrics(rollout, terms, js)
    expected = {
        "reward/token_mean": -js.f(log_u).mean(),
        "reward/sequence_mean": -(js.f(terms.log_u_B_T) * mask).sum(-1).mean(),
        "adv/mean": adv.mean(),
        "adv/std": adv.std(),
        "adv/min": adv.min(),
        "adv/max": adv.max(),
        "div/f_mean": js.f(log_u).mean(),
        "div/reverse_kl": -log_u.mean(),
        "div/forward_kl": (log_u.exp() * log_u).mean(),
        "div/log_u_mean": log_u.mean(),
        "rollout/logprob_mismatch": (rollout.logp_sampling_B_T - terms.logp_student_B_T)[mask].abs().max(),
        "rollout/sequence_log_ratio_max": max(
            abs(sum(terms.logp_student_B_T[b, k] - rollout.logp_sampling_B_T[b, k] for k in range(n + 1) if mask[b, k]))
            for b in range(mask.shape[0])
            for n in range(mask.shape[1])
        ),
        "rollout/importance_ess": kish_ess(
            [
                math.exp(
                    sum(
                        terms.logp_student_B_T[b, k] - rollout.logp_sampling_B_T[b, k]
                        for k in range(mask.shape[1])
                        if mask[b, k]
                    )
                )
                for b in range(mask.shape[0])
            ]
        ),
    }
    assert set(metrics) == set(expected)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(float(value), rel=1e-6), key
    clip = float(log_u.abs().median())
    clipped = rollout_metrics(rollout, terms, js, log_ratio_clip=clip)["div/log_ratio_clip_fraction"]
    assert clipped == pytest.approx(sum(abs(v) >= clip for v in log_u.tolist()) / len(log_u))
    assert 0 < clipped < 1


def kish_ess(weights: list[float]) -> float:
    """Kish's effective sample size over the count: (sum w)^2 / (n sum w^2)."""
    return sum(weights) ** 2 / (len(weights) * sum(w * w for w in weights))


def test_the_importance_ess_is_one_for_equal_weights_and_one_over_b_for_one_dominant_weight():
    assert importance_ess(torch.zeros(5)) == pytest.approx(1.0)
    assert importance_ess(torch.tensor([0.0, -800.0, -900.0, -1000.0])) == pytest.approx(0.25)  # no underflow trouble
    assert importance_ess(torch.tensor([900.0, 0.0])) == pytest.approx(0.5)  # nor overflow


def test_sequence_metrics_and_the_statistics_of_values():
    rollout, _ = rollout_and_terms()
    rollout.finished_B = torch.tensor([True, True, False, True])
    assert sequence_metrics(rollout) == {"rollout/len_mean": 9 / 4, "rollout/eos_rate": 0.75}
    values = torch.tensor([1.0, 2.0, 4.0])
    mean, std, low, high = mean_std_min_max(values)
    assert (mean, low, high) == (pytest.approx(7 / 3), 1.0, 4.0) and std == pytest.approx(values.std().item())
    assert mean_std_min_max(torch.tensor([3.0]))[1] == 0.0  # one value: no spread


def test_eval_metrics_name_the_benchmark_or_the_component():
    logged = eval_metrics({"greedy_acc": 0.5, "arith/greedy_acc": 0.25}, "mixture", "teacher/")
    assert logged == {"eval/mixture/teacher/greedy_acc": 0.5, "eval/arith/teacher/greedy_acc": 0.25}


def test_component_metrics_are_those_of_each_components_rows():
    """Two components' rows of a rollout: each metric equals the one computed on its rows alone
    (reward = mean -f(u) over their response tokens, the advantage's mean and std, -log u)."""
    rollout, terms = rollout_and_terms()
    log_u_B_T, advantages_B_T = terms.log_u_B_T, terms.advantages_B_T
    js = get_divergence("js")
    metrics = component_metrics(rollout, terms, js, ["arith", "products", "gsm8k"])
    for name, rows in (("arith", [0, 2]), ("products", [1, 3])):
        mask = rollout.response_mask_B_T[rows]
        log_u, adv = log_u_B_T[rows][mask], advantages_B_T[rows][mask]
        assert metrics[f"reward/{name}/token_mean"] == pytest.approx(-js.f(log_u).mean().item(), rel=1e-6)
        assert metrics[f"adv/{name}/mean"] == pytest.approx(adv.mean().item(), rel=1e-6)
        assert metrics[f"adv/{name}/std"] == pytest.approx(adv.std().item(), rel=1e-6)
        assert metrics[f"div/{name}/reverse_kl"] == pytest.approx(-log_u.mean().item(), rel=1e-6)
        assert metrics[f"rollout/{name}/share"] == 0.5
    assert metrics["rollout/arith/len_mean"] == 2.0 and metrics["rollout/products/len_mean"] == 2.5
    assert not any("gsm8k" in key for key in metrics)  # no row this step: nothing logged
