"""The OPD surrogate losses: stop-gradient OPD, unbiased OPD+, and the analytic reference.

Shapes: B sequences, T token positions, V vocabulary. p = student, q = teacher, and for the
sampled token of position n, log u_n = log q(y_n|s_n) - log p(y_n|s_n).

Token advantages with discount gamma (to maximise):

    stopgrad:  A_n = -f(u_n)  + sum_{m>n} gamma^(m-n) (-f(u_m))
    unbiased:  A_n = w_f(u_n) + sum_{m>n} gamma^(m-n) (-f(u_m)),   w_f(u) = -f(u) + u f'(u)

and the surrogate whose gradient estimates grad J^f, J^f = E_{y~p}[sum_n f(u_n)]:

    L = -(1/B) sum_b sum_n mask_bn * stopgrad(A_bn) * log p(y_bn | s_bn).

With gamma = 1 the unbiased estimate is exact for grad J^f; with gamma = 0 it is exact for the
per-state gradient sum_n grad D_f(q || p)(s_n) with the state distribution held fixed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from opdx.divergences import Divergence, get_divergence

ESTIMATORS: dict[str, str] = {
    "stopgrad": "OPD: advantage -f(u) under stop-gradient (biased unless reverse_kl)",
    "unbiased": "OPD+: advantage w_f(u) = -f(u) + u f'(u) (unbiased for every f)",
    "analytic": "exact per-state D_f(q || p) over the full vocabulary (needs teacher logits)",
}
SAMPLED_ESTIMATORS = ("stopgrad", "unbiased")


@dataclass(frozen=True)
class LossOptions:
    """Bias/variance switches of the surrogate, all off by default (opd-math.md).

    - ``log_ratio_clip``: clamp log u to [-c, c] before computing the advantage.
    - ``token_mean``: divide by the number of response tokens instead of by B.
    - ``batch_baseline``: subtract the mean advantage over the batch's response tokens.
    - ``whiten``: z-score the advantage over the batch's response tokens (erases the
      difference between the estimators).
    - ``ppo_clip``: with behaviour log-probs, clip the importance ratio to [1 - c, 1 + c].
    """

    log_ratio_clip: float | None = None
    token_mean: bool = False
    batch_baseline: bool = False
    whiten: bool = False
    ppo_clip: float | None = None


def resolve_divergence(divergence: str | Divergence) -> Divergence:
    """A divergence object from a registry name or the object itself."""
    return divergence if isinstance(divergence, Divergence) else get_divergence(divergence)


def check_estimator(estimator: str, valid: tuple[str, ...] | None = None) -> None:
    """Raise ValueError naming ``estimator`` and the valid ones if it is not one of them."""
    valid = tuple(ESTIMATORS) if valid is None else valid
    if estimator not in valid:
        hint = " ('analytic' needs full logits: use analytic_loss)" if estimator == "analytic" else ""
        raise ValueError(f"unknown estimator {estimator!r}; valid estimators here: {', '.join(valid)}{hint}")


def discounted_future_sum(rewards_B_T: Tensor, gamma: float) -> Tensor:
    """sum_{m>n} gamma^(m-n) r_m for every n, i.e. gamma * G_{n+1} with G_n = r_n + gamma G_{n+1}."""
    future_B_T = torch.zeros_like(rewards_B_T)
    if gamma == 0:
        return future_B_T
    running_B = torch.zeros_like(rewards_B_T[:, 0])
    for n in range(rewards_B_T.shape[1] - 1, 0, -1):
        running_B = rewards_B_T[:, n] + gamma * running_B
        future_B_T[:, n - 1] = gamma * running_B
    return future_B_T


def token_advantages(
    logp_student_B_T: Tensor,
    logp_teacher_B_T: Tensor,
    mask_B_T: Tensor,
    divergence: str | Divergence = "reverse_kl",
    estimator: str = "unbiased",
    gamma: float = 0.0,
    log_ratio_clip: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Advantages A_B_T (detached, 0 off the mask) and the per-token log u_B_T they come from.

    ``logp_student_B_T`` are the log-probs of the distribution the tokens were sampled from.
    """
    div = resolve_divergence(divergence)
    check_estimator(estimator, SAMPLED_ESTIMATORS)
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1], got {gamma!r}")
    mask_B_T = mask_B_T.bool()
    log_u_B_T = torch.where(mask_B_T, logp_teacher_B_T.detach() - logp_student_B_T.detach(), 0.0)
    if log_ratio_clip is not None:
        log_u_B_T = log_u_B_T.clamp(-log_ratio_clip, log_ratio_clip)
    rewards_B_T = torch.where(mask_B_T, div.opd_advantage(log_u_B_T), 0.0)
    own_B_T = rewards_B_T if estimator == "stopgrad" else div.unbiased_advantage(log_u_B_T)
    advantages_B_T = own_B_T + discounted_future_sum(rewards_B_T, gamma)
    return torch.where(mask_B_T, advantages_B_T, 0.0), log_u_B_T


def normalise_advantages(advantages_B_T: Tensor, mask_B_T: Tensor, options: LossOptions) -> Tensor:
    """Apply the optional batch baseline and whitening over the response tokens."""
    mask_B_T = mask_B_T.bool()
    if not (options.batch_baseline or options.whiten):
        return advantages_B_T
    values = advantages_B_T[mask_B_T]
    centred_B_T = advantages_B_T - values.mean()
    if options.whiten:
        std = values.std() if values.numel() > 1 else values.new_zeros(())
        centred_B_T = centred_B_T / (std + 1e-8)
    return torch.where(mask_B_T, centred_B_T, 0.0)


def policy_gradient_loss(
    logp_student_B_T: Tensor,
    advantages_B_T: Tensor,
    mask_B_T: Tensor,
    options: LossOptions = LossOptions(),
    logp_behaviour_B_T: Tensor | None = None,
) -> Tensor:
    """L = -(1/B) sum mask * stopgrad(A) * log p, or with behaviour log-probs the PPO form
    -(1/B) sum mask * min(r A, clip(r, 1 - c, 1 + c) A), r = p / p_behaviour.

    Divides by the number of response tokens instead of B when ``options.token_mean``.
    """
    mask_B_T = mask_B_T.bool()
    advantages_B_T = advantages_B_T.detach()
    logp_B_T = torch.where(mask_B_T, logp_student_B_T, 0.0)
    if logp_behaviour_B_T is None:
        objective_B_T = advantages_B_T * logp_B_T
    else:
        ratio_B_T = torch.exp(logp_B_T - torch.where(mask_B_T, logp_behaviour_B_T.detach(), 0.0))
        objective_B_T = ratio_B_T * advantages_B_T
        if options.ppo_clip is not None:
            clipped_B_T = ratio_B_T.clamp(1 - options.ppo_clip, 1 + options.ppo_clip) * advantages_B_T
            objective_B_T = torch.minimum(objective_B_T, clipped_B_T)
    objective_B_T = torch.where(mask_B_T, objective_B_T, 0.0)
    denominator = mask_B_T.sum().clamp(min=1) if options.token_mean else logp_student_B_T.shape[0]
    return -objective_B_T.sum() / denominator


def opd_loss(
    student_logprobs: Tensor,
    teacher_logprobs: Tensor,
    mask: Tensor,
    divergence: str | Divergence = "reverse_kl",
    estimator: str = "unbiased",
    gamma: float = 0.0,
    *,
    log_ratio_clip: float | None = None,
    token_mean: bool = False,
    batch_baseline: bool = False,
    whiten: bool = False,
    behaviour_logprobs: Tensor | None = None,
    ppo_clip: float | None = None,
) -> Tensor:
    """The OPD / OPD+ surrogate loss of the sampled tokens; a scalar.

    ``student_logprobs`` [B, T] (with grad): log p_theta of the sampled tokens;
    ``teacher_logprobs`` [B, T]: log q of the same tokens (constant); ``mask`` [B, T]: response
    tokens (off-mask entries may hold anything, -inf included, and affect nothing).
    ``estimator`` is "stopgrad" (OPD, -f(u)) or "unbiased" (OPD+, w_f(u)). The advantages are
    computed from ``behaviour_logprobs`` when given (the sampling policy of a stale batch),
    which also switches on the importance ratio (PPO-clipped if ``ppo_clip``).
    """
    options = LossOptions(log_ratio_clip, token_mean, batch_baseline, whiten, ppo_clip)
    loss, _, _ = sampled_loss(
        student_logprobs, teacher_logprobs, mask, divergence, estimator, gamma, options, behaviour_logprobs
    )
    return loss


def sampled_loss(
    logp_student_B_T: Tensor,
    logp_teacher_B_T: Tensor,
    mask_B_T: Tensor,
    divergence: str | Divergence,
    estimator: str,
    gamma: float,
    options: LossOptions = LossOptions(),
    logp_behaviour_B_T: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``opd_loss`` with its options as one object; also returns the advantages A_B_T (after
    baseline / whitening) and log u_B_T, which the trainer logs."""
    if options.ppo_clip is not None and logp_behaviour_B_T is None:
        raise ValueError("ppo_clip needs behaviour_logprobs (the log-probs the batch was sampled with)")
    logp_sampling_B_T = logp_student_B_T if logp_behaviour_B_T is None else logp_behaviour_B_T
    advantages_B_T, log_u_B_T = token_advantages(
        logp_sampling_B_T, logp_teacher_B_T, mask_B_T, divergence, estimator, gamma, options.log_ratio_clip
    )
    advantages_B_T = normalise_advantages(advantages_B_T, mask_B_T, options)
    loss = policy_gradient_loss(logp_student_B_T, advantages_B_T, mask_B_T, options, logp_behaviour_B_T)
    return loss, advantages_B_T, log_u_B_T


def analytic_loss(
    logits_student_B_T_V: Tensor,
    logits_teacher_B_T_V: Tensor,
    mask_B_T: Tensor,
    divergence: str | Divergence = "reverse_kl",
    token_mean: bool = False,
    chunk_size: int = 1024,
) -> Tensor:
    """(1/B) sum_b sum_n mask_bn D_f(q || p)(s_bn), exact over the vocabulary (GKD-style).

    Its gradient is the exact per-state gradient at the visited states (the gamma = 0 ground
    truth). The teacher logits are treated as constant.
    """
    div = resolve_divergence(divergence)
    mask_B_T = mask_B_T.bool()
    per_state_B_T = div.full(logits_student_B_T_V, logits_teacher_B_T_V.detach(), chunk_size)
    per_state_B_T = torch.where(mask_B_T, per_state_B_T, 0.0)
    denominator = mask_B_T.sum().clamp(min=1) if token_mean else mask_B_T.shape[0]
    return per_state_B_T.sum() / denominator
