"""The per-step metrics of a training step, reduced over every rank that shares the batch.

Each reduction is written once, as sums over the ranks (``opdx.dist.global_sum``, the identity
on one rank) divided by global counts, so one process and a torchrun launch log the same keys
computed the same way. Sums are taken in float64. Every rank must call these functions in the
same order (they run collectives).

Keys (the direction of each divergence is named; p = student, q = teacher, u = q/p of the
sampled token):

- ``reward/token_mean`` (mean -f(u) over response tokens), ``reward/sequence_mean`` (mean over
  sequences of the summed -f(u));
- ``adv/mean``, ``adv/std`` (n - 1), ``adv/min``, ``adv/max`` of the advantages on response tokens;
- ``div/f_mean`` (mean f(u)), ``div/reverse_kl`` (mean -log u, an estimate of KL(p || q) per
  token), ``div/forward_kl`` (mean u log u, of KL(q || p)), ``div/log_u_mean``;
- ``rollout/logprob_mismatch``: the largest |log p_sampler - log p_trainer| of a sampled token;
  ``rollout/sequence_log_ratio_max``: the largest |log rho_1:n| of a response prefix, rho_1:n =
  prod_{k<=n} p_trainer / p_sampler (the weights of ``rollout_correction=per_decision``);
  ``rollout/importance_ess``: Kish's effective sample size of the whole responses' weights rho_1:N,
  as a fraction of the sequences;
- ``div/log_ratio_clip_fraction`` with ``estimator.log_ratio_clip``: the share of response tokens
  whose log u was clipped;
- ``rollout/len_mean``, ``rollout/eos_rate``;
- ``rollout/staleness_mean``, ``rollout/staleness_max``: where the sampler records the weight
  version of each row, how many updates older than the step's weights the rows' are;
- and per mixture component c ``reward/<c>/token_mean``,
  ``adv/<c>/mean``, ``adv/<c>/std``, ``div/<c>/reverse_kl``, ``rollout/<c>/len_mean``,
  ``rollout/<c>/share``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from opdx.dist import global_max, global_min, global_sum
from opdx.divergences import Divergence
from opdx.objective import LossTerms
from opdx.rollout import Rollout


def nonfinite_parts(terms: LossTerms, mask_B_T: Tensor) -> dict[str, int]:
    """What of a step is not finite on the response tokens of any rank: the student's or the
    teacher's log-probs (through log u = log q - log p), the advantages, the loss; the count of each."""
    parts = {
        "student_logprobs": terms.logp_student_B_T[mask_B_T],
        "teacher_logprobs": terms.log_u_B_T[mask_B_T],
        "advantages": terms.advantages_B_T[mask_B_T],
        "loss": terms.loss.detach().reshape(1),
    }
    local = torch.tensor([int((~torch.isfinite(values)).sum()) for values in parts.values()])
    counts = dict(zip(parts, global_sum(local).tolist(), strict=True))  # every rank skips together
    if counts["student_logprobs"]:
        counts["teacher_logprobs"] = 0  # log u is not finite because log p is not
    return {name: int(count) for name, count in counts.items() if count}


def sequence_metrics(rollout: Rollout) -> dict[str, float]:
    """``rollout/len_mean`` (response tokens per sequence) and ``rollout/eos_rate`` (the share of
    sequences that ended before the token limit), over all ranks."""
    sums = torch.stack([rollout.lengths_B.sum(), rollout.finished_B.sum(), torch.tensor(len(rollout.lengths_B))])
    lengths, finished, sequences = global_sum(sums.double()).tolist()
    return {"rollout/len_mean": lengths / sequences, "rollout/eos_rate": finished / sequences}


def staleness_metrics(rollout: Rollout, version: int) -> dict[str, float]:
    """``rollout/staleness_mean`` and ``rollout/staleness_max`` over all ranks: ``version`` (the
    updates the trained weights have taken) less each row's ``weight_version_B``; nothing where
    the sampler does not record versions."""
    if rollout.weight_version_B is None:
        return {}
    staleness_B = (version - rollout.weight_version_B).double()
    total = global_sum(torch.stack([staleness_B.sum(), staleness_B.new_tensor(float(len(staleness_B)))]))
    return {
        "rollout/staleness_mean": (total[0] / total[1]).item(),
        "rollout/staleness_max": global_max(staleness_B.max()).item(),
    }


def mean_std_min_max(values: Tensor) -> tuple[float, float, float, float]:
    """Mean, standard deviation (n - 1), min and max of ``values`` over all ranks."""
    v = values.double()
    count, total, squares = global_sum(torch.stack([v.new_tensor(v.numel()), v.sum(), v.square().sum()])).tolist()
    mean = total / count
    variance = max(squares - count * mean * mean, 0.0) / (count - 1) if count > 1 else 0.0
    low = global_min(v.min() if v.numel() else v.new_tensor(torch.inf))
    high = global_max(v.max() if v.numel() else v.new_tensor(-torch.inf))
    return mean, variance**0.5, low.item(), high.item()


def rollout_metrics(
    rollout: Rollout, terms: LossTerms, div: Divergence, log_ratio_clip: float | None = None
) -> dict[str, float]:
    """Reward, advantage and sampled divergence statistics over the response tokens of all ranks,
    the largest gap between the sampler's and the trainer's log-probs of a sampled token, and of
    their sums over a response prefix, the importance weights' ESS, and with ``log_ratio_clip``
    (the estimator's) the share of response tokens whose log u it clipped."""
    mask_B_T = rollout.response_mask_B_T
    log_u = terms.log_u_B_T[mask_B_T].double()
    adv_mean, adv_std, adv_min, adv_max = mean_std_min_max(terms.advantages_B_T[mask_B_T])
    per_sequence = (div.f(terms.log_u_B_T) * mask_B_T).double().sum()
    sums = torch.stack([
        log_u.new_tensor(float(log_u.numel())), -div.f(log_u).sum(), (-log_u).sum(), (log_u.exp() * log_u).sum(),
        log_u.sum(), -per_sequence, log_u.new_tensor(float(mask_B_T.shape[0])),
    ])  # fmt: skip
    tokens, reward, neg_log_u, u_log_u, log_u_sum, sequence_reward, sequences = global_sum(sums).tolist()
    log_ratio_B_T = torch.where(mask_B_T, terms.logp_student_B_T - rollout.logp_sampling_B_T, 0.0)
    return {
        "reward/token_mean": reward / tokens,
        "reward/sequence_mean": sequence_reward / sequences,
        "adv/mean": adv_mean,
        "adv/std": adv_std,
        "adv/min": adv_min,
        "adv/max": adv_max,
        "div/f_mean": -reward / tokens,
        "div/reverse_kl": neg_log_u / tokens,
        "div/forward_kl": u_log_u / tokens,
        "div/log_u_mean": log_u_sum / tokens,
        "rollout/logprob_mismatch": global_max(log_ratio_B_T.abs().max()).item(),
        "rollout/sequence_log_ratio_max": global_max(log_ratio_B_T.cumsum(-1).abs().max()).item(),
        "rollout/importance_ess": importance_ess(log_ratio_B_T.sum(-1)),
    } | ({} if log_ratio_clip is None else {"div/log_ratio_clip_fraction": clip_fraction(log_u, log_ratio_clip)})


def importance_ess(log_weight_B: Tensor) -> float:
    """Kish's effective sample size of the sequences' importance weights w_b = exp(log_weight_b), over
    all ranks, as a fraction of the sequences: (sum w)^2 / (B sum w^2), 1 when all weights are equal
    (a sampler with the trainer's weights), 1/B when one sequence carries all the weight. The weights
    are rescaled by the largest first, so none overflows."""
    log_weight_B = log_weight_B.double()
    top = global_max(log_weight_B.max() if log_weight_B.numel() else log_weight_B.new_tensor(-torch.inf))
    weight_B = (log_weight_B - top).exp()
    sums = torch.stack([weight_B.sum(), weight_B.square().sum(), weight_B.new_tensor(float(weight_B.numel()))])
    total, squares, count = global_sum(sums).tolist()
    return total * total / (count * squares)


def clip_fraction(log_u: Tensor, log_ratio_clip: float) -> float:
    """The share of the response tokens of all ranks whose log u was clipped to +-``log_ratio_clip``
    (``log_u``: after the clip, 1-D)."""
    clipped = (log_u.abs() >= log_ratio_clip).sum().double()
    clipped, tokens = global_sum(torch.stack([clipped, clipped.new_tensor(float(log_u.numel()))])).tolist()
    return clipped / tokens


def component_metrics(rollout: Rollout, terms: LossTerms, div: Divergence, components: list[str]) -> dict[str, float]:
    """Per mixture component c (its teacher's scale differs from the others'), over the response
    tokens of its rows on all ranks: ``reward/<c>/token_mean`` (mean -f(u)), ``adv/<c>/mean`` and
    ``adv/<c>/std`` (n - 1), ``div/<c>/reverse_kl`` (mean -log u), ``rollout/<c>/len_mean`` and
    ``rollout/<c>/share`` (its fraction of the step's sequences). A component with no token this
    step gets none of them."""
    mask_B_T = rollout.response_mask_B_T
    sources = [getattr(problem, "source", None) for problem in rollout.problems or []]
    sums_K_7 = torch.zeros(len(components), 7, dtype=torch.float64)  # per component: 7 sums
    for c, name in enumerate(components):
        rows_B = torch.tensor([source == name for source in sources], dtype=torch.bool)
        in_rows_B_T = mask_B_T & rows_B[:, None]
        log_u, adv = terms.log_u_B_T[in_rows_B_T].double(), terms.advantages_B_T[in_rows_B_T].double()
        sums_K_7[c] = torch.stack([
            log_u.new_tensor(float(log_u.numel())), -div.f(log_u).sum(), adv.sum(), adv.square().sum(), -log_u.sum(),
            rows_B.sum().double(), (rollout.lengths_B * rows_B).sum().double(),
        ])  # fmt: skip
    tokens, reward, adv_sum, adv_squares, neg_log_u, rows, lengths = global_sum(sums_K_7).T.tolist()
    sequences = sum(rows)
    metrics = {}
    for c, name in enumerate(components):
        if not tokens[c]:
            continue
        n, mean = tokens[c], adv_sum[c] / tokens[c]
        variance = max(adv_squares[c] - n * mean * mean, 0.0) / (n - 1) if n > 1 else 0.0
        metrics |= {
            f"reward/{name}/token_mean": reward[c] / n,
            f"adv/{name}/mean": mean,
            f"adv/{name}/std": variance**0.5,
            f"div/{name}/reverse_kl": neg_log_u[c] / n,
            f"rollout/{name}/len_mean": lengths[c] / rows[c],
            f"rollout/{name}/share": rows[c] / sequences,
        }
    return metrics


def eval_metrics(result: dict[str, float], benchmark: str, role: str = "") -> dict[str, float]:
    """An eval's metrics as logged: ``eval/<benchmark>/<role>metric``, and a mixture component's
    ``c/metric`` as ``eval/<c>/<role>metric`` (``role``: "" for the student, "teacher/")."""
    logged = {}
    for key, value in result.items():
        component, _, metric = key.rpartition("/")
        logged[f"eval/{component or benchmark}/{role}{metric}"] = value
    return logged
