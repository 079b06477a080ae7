import math

import pytest
import torch

from opdx.config import EstimatorConfig
from opdx.divergences import DIVERGENCES, get_divergence
from opdx.logits import HeadLogits, TopK, TopKOfLogits
from opdx.objective import ESTIMATORS, LossInputs, discounted_future_sum, on_support, opd_loss, token_advantages
from opdx.verify import divergence_for  # each divergence with the parameters of its YAML

LOGP = torch.log(torch.tensor([[0.5, 0.25, 0.8], [0.1, 0.9, 0.3]], dtype=torch.float64))
LOGQ = torch.log(torch.tensor([[0.25, 0.5, 0.4], [0.3, 0.6, 0.6]], dtype=torch.float64))
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


def sampled(name: str, **switches):
    """The sampled estimator ``name`` with ``EstimatorConfig`` switches."""
    return ESTIMATORS[name](EstimatorConfig(name, **switches))


def test_reverse_kl_stopgrad_value_by_hand():
    logp = LOGP.clone().requires_grad_(True)
    loss = opd_loss(logp, LOGQ, MASK, "reverse_kl", "stopgrad")
    log_u = (LOGQ - LOGP) * MASK
    expected = -(log_u * LOGP * MASK).sum() / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, -log_u / 2)  # d L / d log p = -A / B


def test_forward_kl_unbiased_advantage_is_u():
    advantages, log_u = token_advantages(LOGP, LOGQ, MASK, get_divergence("forward_kl"), sampled("unbiased"))
    expected = torch.tensor([[0.5, 2.0, 0.5], [3.0, 2 / 3, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(log_u, (LOGQ - LOGP) * MASK)


def test_discount_semantics_by_hand():
    rewards = torch.tensor([[1.0, 2.0, 4.0, 8.0]], dtype=torch.float64)
    torch.testing.assert_close(discounted_future_sum(rewards, 0.0), torch.zeros(1, 4, dtype=torch.float64))
    torch.testing.assert_close(
        discounted_future_sum(rewards, 1.0), torch.tensor([[14.0, 12.0, 8.0, 0.0]], dtype=torch.float64)
    )
    torch.testing.assert_close(
        discounted_future_sum(rewards, 0.5),
        torch.tensor([[0.5 * 2 + 0.25 * 4 + 0.125 * 8, 0.5 * 4 + 0.25 * 8, 4.0, 0.0]], dtype=torch.float64),
    )


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
def test_advantage_is_own_term_plus_discounted_future_rewards(gamma):
    div = get_divergence("js")
    log_u = (LOGQ - LOGP) * MASK
    rewards = -div.f(log_u) * MASK
    for name, own in (("stopgrad", rewards), ("unbiased", div.unbiased_advantage(log_u))):
        advantages, _ = token_advantages(LOGP, LOGQ, MASK, div, sampled(name, gamma=gamma))
        for b in range(2):
            for n in range(3):
                if not MASK[b, n]:
                    assert advantages[b, n] == 0
                    continue
                future = sum(gamma ** (m - n) * rewards[b, m] for m in range(n + 1, 3))
                assert advantages[b, n].item() == pytest.approx((own[b, n] + future).item(), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("estimator", ["stopgrad", "unbiased"])
def test_masked_positions_change_neither_value_nor_gradient(estimator):
    garbage_p = LOGP.clone()
    garbage_q = LOGQ.clone()
    garbage_p[1, 2], garbage_q[1, 2] = float("-inf"), float("nan")
    results = []
    for logp_in, logq_in in ((LOGP, LOGQ), (garbage_p, garbage_q)):
        logp = logp_in.clone().requires_grad_(True)
        loss = opd_loss(logp, logq_in, MASK.bool(), "forward_kl", estimator, gamma=1.0)
        (grad,) = torch.autograd.grad(loss, logp)
        results.append((loss, grad))
    assert torch.isfinite(results[1][0])
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
    assert results[1][1][1, 2] == 0


def test_padding_after_the_mask_does_not_leak_through_the_discount():
    short = opd_loss(LOGP[1:, :2].clone().requires_grad_(True), LOGQ[1:, :2], MASK[1:, :2], "js", "unbiased", 1.0)
    padded = opd_loss(LOGP[1:].clone().requires_grad_(True), LOGQ[1:], MASK[1:], "js", "unbiased", 1.0)
    torch.testing.assert_close(short, padded)


def test_dtypes_are_kept():
    for dtype in (torch.float64, torch.float32):
        loss = opd_loss(LOGP.to(dtype).requires_grad_(True), LOGQ.to(dtype), MASK, "js", "unbiased")
        assert loss.dtype == dtype


def test_token_mean_divides_by_response_tokens():
    base = opd_loss(LOGP, LOGQ, MASK, "js", "unbiased")
    token_mean = opd_loss(LOGP, LOGQ, MASK, "js", "unbiased", token_mean=True)
    assert token_mean.item() == pytest.approx(base.item() * 2 / 5, rel=1e-12)


def test_batch_baseline_and_whitening():
    advantages, _ = token_advantages(LOGP, LOGQ, MASK, get_divergence("forward_kl"), sampled("unbiased"))
    valid = advantages[MASK.bool()]
    logp = LOGP.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(opd_loss(logp, LOGQ, MASK, "forward_kl", "unbiased", batch_baseline=True), logp)
    torch.testing.assert_close(grad, -(advantages - valid.mean()) * MASK / 2)
    (grad,) = torch.autograd.grad(opd_loss(logp, LOGQ, MASK, "forward_kl", "unbiased", whiten=True), logp)
    torch.testing.assert_close(grad, -(advantages - valid.mean()) / (valid.std() + 1e-8) * MASK / 2)


def test_log_ratio_clip():
    advantages, log_u = token_advantages(
        LOGP, LOGQ, MASK, get_divergence("reverse_kl"), sampled("stopgrad", log_ratio_clip=0.5)
    )
    assert log_u.abs().max().item() == pytest.approx(0.5)
    assert advantages[1, 0].item() == pytest.approx(0.5)  # log(0.3/0.1) = 1.10 clipped to 0.5


@pytest.mark.parametrize("correction", ["tis", "ppo", "per_decision"])
def test_rollout_correction_is_the_identity_when_the_log_probs_agree(correction):
    logp = LOGP.clone().requires_grad_(True)
    corrected = opd_loss(logp, LOGQ, MASK, "js", "unbiased", rollout_logprobs=LOGP, rollout_correction=correction)
    (grad_corrected,) = torch.autograd.grad(corrected, logp)
    plain = opd_loss(logp, LOGQ, MASK, "js", "unbiased")
    (grad_plain,) = torch.autograd.grad(plain, logp)
    torch.testing.assert_close(grad_corrected, grad_plain, rtol=1e-12, atol=1e-12)
    if correction != "ppo":
        assert corrected.item() == pytest.approx(plain.item(), rel=1e-12)


def test_rollout_correction_weighs_by_the_ratio_truncated_or_clipped():
    advantages, _ = token_advantages(LOGP + 1.0, LOGQ, MASK, get_divergence("js"), sampled("unbiased"))
    # the trainer's policy moved up by e on every token against the sampler's: ratio e
    moved = (LOGP + 1.0).requires_grad_(True)
    (grad_tis,) = torch.autograd.grad(
        opd_loss(moved, LOGQ, MASK, "js", "unbiased", rollout_logprobs=LOGP, rollout_correction="tis", tis_cap=2.0),
        moved,
    )
    torch.testing.assert_close(grad_tis, -2.0 * advantages / 2)  # min(e, 2) * (-A / B)
    (grad_ppo,) = torch.autograd.grad(
        opd_loss(moved, LOGQ, MASK, "js", "unbiased", rollout_logprobs=LOGP, rollout_correction="ppo", ppo_clip=0.2),
        moved,
    )
    assert bool((grad_ppo[advantages > 0] == 0).all())  # ratio e > 1.2 clipped where A > 0: no gradient
    negative = (advantages < 0) & MASK.bool()
    torch.testing.assert_close(grad_ppo[negative], -(math.e * advantages / 2)[negative])


@pytest.mark.parametrize("cap", [None, 3.0])
def test_per_decision_weighs_each_reward_by_its_prefixs_ratio(cap):
    """rho_1:n = e^n when the trainer's log-probs are the sampler's plus 1 on every token: by hand,
    A_n = rho_1:n w(u_n) + gamma rho_1:n+1 (-f(u_n+1)) + gamma^2 rho_1:n+2 (-f(u_n+2)), rho at most cap."""
    div, gamma = get_divergence("js"), 0.5
    moved = LOGP + 1.0
    config = {"gamma": gamma, "rollout_correction": "per_decision", "per_decision_cap": cap}
    advantages, log_u = token_advantages(moved, LOGQ, MASK, div, sampled("unbiased", **config), LOGP)
    torch.testing.assert_close(log_u, torch.where(MASK.bool(), LOGQ - moved, 0.0))  # u from the trainer's p
    rho = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 2.0]], dtype=torch.float64).exp().clamp(max=cap or math.inf)
    own, reward = div.unbiased_advantage(log_u), div.opd_advantage(log_u)
    for b, n in MASK.nonzero().tolist():
        expected = rho[b, n] * own[b, n] + sum(
            gamma ** (m - n) * rho[b, m] * reward[b, m] for m in range(n + 1, 3) if MASK[b, m]
        )
        assert advantages[b, n].item() == pytest.approx(expected.item(), rel=1e-12)
    assert advantages[1, 2] == 0  # off the mask
    logp = moved.clone().requires_grad_(True)
    loss = opd_loss(logp, LOGQ, MASK, div, "unbiased", rollout_logprobs=LOGP, **config)
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, -advantages / 2)  # the weights sit in A; log p carries the gradient


def dense_loss(estimator: str, support: str, logits_p, logits_q, mask, div, gamma: float = 0.0, top_k: int = 16):
    config = EstimatorConfig(estimator, gamma=gamma, support=support, top_k=top_k)
    tokens = logits_p.detach().argmax(-1)
    teacher = HeadLogits(logits_q) if support == "full" else TopKOfLogits(HeadLogits(logits_q), tokens, top_k)
    inputs = LossInputs(HeadLogits(logits_p), teacher, mask, tokens)
    return ESTIMATORS[estimator](config, chunk_size=2).loss(inputs, div).loss


def test_the_full_support_gradient_is_the_exact_per_state_gradient():
    """d D_f(q||p) / d z_k = -p_k (w_f(u_k) - E_p[w_f(u)]) for student logits z (equation (1)), at
    gamma = 0 (estimator=analytic's loss)."""
    generator = torch.Generator().manual_seed(0)
    logits_p = torch.randn(2, 3, 6, generator=generator, dtype=torch.float64)
    logits_q = torch.randn(2, 3, 6, generator=generator, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    for name in DIVERGENCES:
        div = divergence_for(name)
        z = logits_p.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(dense_loss("unbiased", "full", z, logits_q, mask, div), z)
        p = logits_p.softmax(-1)
        w = div.unbiased_advantage(logits_q.log_softmax(-1) - logits_p.log_softmax(-1))
        expected = -p * (w - (p * w).sum(-1, keepdim=True)) * mask.unsqueeze(-1) / 2
        torch.testing.assert_close(grad, expected, msg=name)


def test_a_dense_loss_value_is_the_states_divergence_on_its_support_and_masked():
    logits_p = torch.zeros(1, 2, 3, dtype=torch.float64)
    logits_q = torch.log(torch.tensor([[[0.7, 0.2, 0.1], [0.2, 0.2, 0.6]]], dtype=torch.float64))
    mask, forward_kl = torch.tensor([[1, 0]]), get_divergence("forward_kl")
    for estimator in ESTIMATORS:  # the value is D^S whichever advantage moves it
        full = dense_loss(estimator, "full", logits_p, logits_q, mask, forward_kl).item()
        assert full == pytest.approx(sum(q * math.log(3 * q) for q in (0.7, 0.2, 0.1)))
        top1 = dense_loss(estimator, "topk", logits_p, logits_q, mask, forward_kl, top_k=1).item()
        assert top1 == pytest.approx(0.7 * math.log(0.7 * 3) + 0.3 * math.log(0.3 * 3 / 2))  # {top token, tail}
        assert top1 < full  # merging categories loses divergence (data processing)


def test_on_support_keeps_the_teachers_top_k_and_a_tail_of_the_rest():
    logits_p = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=torch.float64))
    logits_q = torch.log(torch.tensor([[0.5, 0.05, 0.4, 0.05]], dtype=torch.float64))
    token = torch.tensor([1])
    logp, logq = on_support(logits_p, TopK.of(logits_q, 2, token))
    torch.testing.assert_close(logp.exp(), torch.tensor([[0.1, 0.3, 0.6]], dtype=torch.float64))
    torch.testing.assert_close(logq.exp(), torch.tensor([[0.5, 0.4, 0.1]], dtype=torch.float64))
    everything, _ = on_support(logits_p, TopK.of(logits_q, 9, token))  # more than V: an empty tail of log-prob -inf
    assert everything.shape == (1, 5) and everything[0, -1] == -math.inf


def test_errors_name_the_bad_value_and_the_valid_ones():
    with pytest.raises(ValueError, match=r"'biased'.*stopgrad, unbiased"):
        opd_loss(LOGP, LOGQ, MASK, "js", "biased")
    with pytest.raises(ValueError, match=r"'analytic'.*valid estimators: stopgrad, unbiased"):
        opd_loss(LOGP, LOGQ, MASK, "js", "analytic")
    with pytest.raises(ValueError, match=r"'kl'.*reverse_kl"):
        opd_loss(LOGP, LOGQ, MASK, "kl", "unbiased")
    with pytest.raises(ValueError, match=r"gamma=2 is invalid.*\[0, 1\]"):
        opd_loss(LOGP, LOGQ, MASK, "js", "unbiased", gamma=2)
    with pytest.raises(ValueError, match="rollout_correction='tis' needs the sampler's log-probs"):
        opd_loss(LOGP, LOGQ, MASK, "js", "unbiased", rollout_correction="tis")
    with pytest.raises(ValueError, match="rollout_correction='is' is invalid; valid: null, tis, ppo, per_decision"):
        opd_loss(LOGP, LOGQ, MASK, "js", "unbiased", rollout_correction="is")
    with pytest.raises(ValueError, match="per_decision_cap=0.5 is invalid"):
        opd_loss(LOGP, LOGQ, MASK, "js", "unbiased", rollout_correction="per_decision", per_decision_cap=0.5)
    with pytest.raises(ValueError, match="per_decision weighs each reward.*batch_baseline, whiten, state_baseline"):
        opd_loss(
            LOGP, LOGQ, MASK, "js", "unbiased", rollout_logprobs=LOGP, rollout_correction="per_decision", whiten=True
        )


def test_whitening_a_single_token_stays_finite():
    logp = LOGP[:1, :1].clone().requires_grad_(True)
    loss = opd_loss(logp, LOGQ[:1, :1], MASK[:1, :1], "js", "unbiased", whiten=True)
    assert torch.isfinite(loss) and loss.item() == 0.0


def test_huge_but_finite_advantages_are_applied_as_computed_not_clipped():
    """Stop-gradient Pearson at u = e^20: the advantage -(u - 1)^2 is about -2.4e17, finite, and
    reaches the loss unclipped (clipping stays the explicit log_ratio_clip)."""
    logp = torch.tensor([[-25.0, -1.0]], dtype=torch.float64, requires_grad=True)
    logq = torch.tensor([[-5.0, -1.0]], dtype=torch.float64)
    advantages, _ = token_advantages(logp, logq, torch.ones(1, 2), get_divergence("pearson"), sampled("stopgrad"))
    assert advantages[0, 0].item() == pytest.approx(-((math.exp(20) - 1) ** 2), rel=1e-12)
    (grad,) = torch.autograd.grad(opd_loss(logp, logq, torch.ones(1, 2), "pearson", "stopgrad"), logp)
    assert torch.isfinite(grad).all() and grad[0, 0].item() == pytest.approx((math.exp(20) - 1) ** 2, rel=1e-12)


@pytest.mark.parametrize("support", ["full", "topk"])
def test_a_dense_loss_holds_a_few_chunks_of_logits_never_the_whole_batchs(support):
    """Student and teacher logits made from hidden states [S, D] by output heads, 2,048 states of a
    4,096-token vocabulary in float64: the whole [S, V] is 64 MiB a model, a chunk of 64 states 2 MiB. The
    loss + backward holds a few chunks at a time (``LiveTensorBytes``) and gives the gradient of one
    unchunked computation."""
    from opdx.memory_tracking import LiveTensorBytes

    torch.manual_seed(0)
    states, hidden, vocab, chunk = 2048, 16, 4096, 64
    head_p = torch.nn.Linear(hidden, vocab, dtype=torch.float64)
    head_q = torch.nn.Linear(hidden, vocab, dtype=torch.float64).requires_grad_(False)
    hidden_p = torch.randn(states, hidden, dtype=torch.float64, requires_grad=True)
    hidden_q = torch.randn(states, hidden, dtype=torch.float64)
    tokens, mask = torch.randint(vocab, (1, states)), torch.ones(1, states, dtype=torch.bool)
    config = EstimatorConfig("unbiased", gamma=1.0, support=support, top_k=16)
    teacher = HeadLogits(hidden_q.unsqueeze(0), head_q)
    teacher = teacher if support == "full" else TopKOfLogits(teacher, tokens, 16)

    def gradients(chunk_size: int) -> list[torch.Tensor]:
        inputs = LossInputs(HeadLogits(hidden_p.unsqueeze(0), head_p), teacher, mask, tokens)
        loss = ESTIMATORS["unbiased"](config, chunk_size).loss(inputs, get_divergence("js")).loss
        return torch.autograd.grad(loss, [hidden_p, head_p.weight])

    with LiveTensorBytes() as live:
        before = live.current
        chunked = gradients(chunk)
        held = live.peak - before
    whole = states * vocab * 8
    assert held < whole / 2, f"{held / 2**20:.1f} MiB held; one [S, V] is {whole / 2**20:.0f} MiB"
    for a, b in zip(chunked, gradients(states), strict=True):
        torch.testing.assert_close(a, b)
