import math

import pytest
import torch

from opdx.divergences import DIVERGENCES, get_divergence
from opdx.verify import divergence_for  # each divergence with the parameters of its YAML


@pytest.fixture(autouse=True)
def float64_default():
    """float64 for every tensor made in this module's tests, restored after each (a worker runs other
    modules' tests next)."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


LOG_U = torch.linspace(-4.0, 4.0, 41, dtype=torch.float64)
U = LOG_U.exp()


def closed_form_f(name: str, u: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """The f column of opd-math.md, written from u directly."""
    return {
        "reverse_kl": -torch.log(u),
        "forward_kl": u * torch.log(u),
        "js": 0.5 * (u * torch.log(u) - (1 + u) * torch.log((1 + u) / 2)),
        "tv": 0.5 * (u - 1).abs(),
        "hellinger": (u.sqrt() - 1) ** 2,
        "pearson": (u - 1) ** 2,
        "neyman": (1 - u) ** 2 / u,
        "alpha": (u**alpha - alpha * u - (1 - alpha)) / (alpha * (alpha - 1)),
    }[name]


def closed_form_w(name: str, u: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """The OPD+ column of opd-math.md."""
    return {
        "reverse_kl": torch.log(u) - 1,
        "forward_kl": u,
        "js": 0.5 * torch.log((1 + u) / 2),
        "tv": 0.5 * torch.sign(u - 1),
        "hellinger": u.sqrt() - 1,
        "pearson": u**2 - 1,
        "neyman": 2 - 2 / u,
        "alpha": (u**alpha - 1) / alpha,
    }[name]


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_f_and_advantages_match_closed_forms(name):
    div = divergence_for(name)
    torch.testing.assert_close(div.f(LOG_U), closed_form_f(name, U), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(div.opd_advantage(LOG_U), -closed_form_f(name, U), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(div.unbiased_advantage(LOG_U), closed_form_w(name, U), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_f_is_zero_at_one_and_convex(name):
    div = divergence_for(name)
    assert div.f(torch.zeros(1)).item() == pytest.approx(0.0, abs=1e-15)
    values = closed_form_f(name, U)
    # convexity in u on the grid: secant slopes increase
    slopes = (values[1:] - values[:-1]) / (U[1:] - U[:-1])
    assert bool((slopes[1:] - slopes[:-1] >= -1e-9).all())


@pytest.mark.parametrize("name", [n for n in DIVERGENCES if n != "tv"])
def test_unbiased_advantage_is_minus_f_plus_u_fprime_by_autograd(name):
    div = divergence_for(name)
    u = U.clone().requires_grad_(True)
    f_u = closed_form_f(name, u)
    (fprime,) = torch.autograd.grad(f_u.sum(), u)
    torch.testing.assert_close(div.unbiased_advantage(LOG_U), (-f_u + u * fprime).detach(), rtol=1e-10, atol=1e-10)


def test_tv_advantage_away_from_the_kink():
    div = get_divergence("tv")
    assert div.unbiased_advantage(torch.tensor([-1.0, 1.0])).tolist() == [-0.5, 0.5]


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_log_space_is_stable_for_extreme_ratios(name):
    log_u = torch.tensor([-60.0, 60.0], dtype=torch.float64)
    assert torch.isfinite(divergence_for(name).unbiased_advantage(log_u)).all()
    assert torch.isfinite(divergence_for(name).f(log_u)).all()


def test_only_reverse_kl_advantages_differ_by_a_constant():
    for name in DIVERGENCES:
        div = divergence_for(name)
        gap = div.unbiased_advantage(LOG_U) - div.opd_advantage(LOG_U)  # = u f'(u)
        is_constant = bool(torch.allclose(gap, gap[0].expand_as(gap)))
        assert is_constant == (name == "reverse_kl"), name
    reverse = get_divergence("reverse_kl")
    torch.testing.assert_close(reverse.unbiased_advantage(LOG_U) - reverse.opd_advantage(LOG_U), -torch.ones(41))


def test_alpha_half_is_twice_squared_hellinger():
    torch.testing.assert_close(get_divergence("alpha", alpha=0.5).f(LOG_U), 2 * get_divergence("hellinger").f(LOG_U))


def test_alpha_tends_to_the_two_kl_directions_up_to_linear_terms():
    u = U
    near_zero = get_divergence("alpha", alpha=1e-6).f(LOG_U)
    near_one = get_divergence("alpha", alpha=1 - 1e-6).f(LOG_U)
    torch.testing.assert_close(near_zero, -torch.log(u) + (u - 1), rtol=1e-4, atol=1e-4)  # reverse_kl + (u - 1)
    torch.testing.assert_close(near_one, u * torch.log(u) - (u - 1), rtol=1e-4, atol=1e-4)  # forward_kl - (u - 1)


def random_logits(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_full_divergence_nonnegative_and_zero_iff_equal(name):
    div = divergence_for(name)
    student, teacher = random_logits(4, 5, 11, seed=1), random_logits(4, 5, 11, seed=2)
    d = div.full(student, teacher, chunk_size=3)
    assert d.shape == (4, 5)
    assert bool((d > 1e-6).all())
    torch.testing.assert_close(div.full(student, student + 3.0), torch.zeros(4, 5), atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_full_divergence_matches_direct_sum(name):
    student, teacher = random_logits(3, 7, seed=3), random_logits(3, 7, seed=4)
    p, q = student.softmax(-1), teacher.softmax(-1)
    expected = (p * closed_form_f(name, q / p)).sum(-1)
    torch.testing.assert_close(divergence_for(name).full(student, teacher, chunk_size=2), expected)


def test_full_divergence_known_values():
    p_logits = torch.log(torch.tensor([0.5, 0.5]))
    q_logits = torch.log(torch.tensor([0.9, 0.1]))
    reverse = get_divergence("reverse_kl").full(p_logits, q_logits).item()
    forward = get_divergence("forward_kl").full(p_logits, q_logits).item()
    assert reverse == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1))  # KL(p||q)
    assert forward == pytest.approx(0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5))  # KL(q||p)
    assert get_divergence("tv").full(p_logits, q_logits).item() == pytest.approx(0.4)


def test_js_is_symmetric_and_bounded_by_log2():
    div = get_divergence("js")
    a, b = random_logits(6, 9, seed=5), random_logits(6, 9, seed=6)
    torch.testing.assert_close(div.full(a, b), div.full(b, a))
    far = torch.tensor([[0.0, -200.0]]), torch.tensor([[-200.0, 0.0]])
    assert div.full(*far).item() == pytest.approx(math.log(2), rel=1e-9)


def test_full_keeps_float64_and_upcasts_bfloat16():
    a, b = random_logits(2, 5, seed=7), random_logits(2, 5, seed=8)
    assert get_divergence("js").full(a, b).dtype == torch.float64
    assert get_divergence("js").full(a.bfloat16(), b.bfloat16()).dtype == torch.float32


def test_unknown_divergence_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"'jsd'.*reverse_kl, forward_kl, js, tv, hellinger, pearson, neyman, alpha"):
        get_divergence("jsd")


@pytest.mark.parametrize("alpha", [0, 1, 1.0, float("nan")])
def test_alpha_rejects_degenerate_parameters(alpha):
    with pytest.raises(ValueError, match="alpha"):
        get_divergence("alpha", alpha=alpha)


def test_parameter_on_a_divergence_without_one():
    with pytest.raises(ValueError, match="takes no parameters"):
        get_divergence("js", alpha=0.3)


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_full_divergence_gradient_stays_finite_when_student_probability_underflows(name):
    student = torch.tensor([[0.0, -800.0, 0.0]], dtype=torch.float64, requires_grad=True)
    teacher = torch.zeros(1, 3, dtype=torch.float64)
    (grad,) = torch.autograd.grad(divergence_for(name).full(student, teacher).sum(), student)
    assert torch.isfinite(grad).all()
