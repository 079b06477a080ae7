import pandas as pd
import pytest
import torch

from opdx.config import SUPPORTS
from opdx.divergences import DIVERGENCES
from opdx.verify import (
    VARIANTS,
    TabularProblem,
    cross_tokenizer_table,
    divergence_for,
    exact_table,
    main,
    monte_carlo_table,
    per_response_gradients,
    stale_table,
    true_gradient,
)


@pytest.fixture(scope="module")
def table():
    return exact_table(seed=3)


def test_enumeration_covers_every_response():
    problem = TabularProblem.random(vocab=3, length=3, seed=0)
    assert problem.responses_Y_T.shape == (27, 3)
    assert problem.logits_student_S_V.shape == (13, 3)  # 1 + 3 + 9 prefix states
    total = problem.token_logprobs(problem.logits_student_S_V).sum(-1).exp().sum()
    assert total.item() == pytest.approx(1.0, abs=1e-14)


def test_unbiased_is_exact_for_every_support_divergence_and_gamma(table):
    unbiased = table[table.estimator == "unbiased"]
    assert len(unbiased) == len(VARIANTS) * len(DIVERGENCES) * 3  # gamma 0 and 1 on the tabular policy, and T = 1
    assert set(VARIANTS) == {*SUPPORTS, "sampled+baseline"}
    assert unbiased.rel_error.max() < 1e-12
    assert unbiased.cosine.min() > 1 - 1e-12
    assert table.ok.all()


def test_stopgrad_is_exact_only_for_reverse_kl_on_every_support(table):
    stopgrad = table[table.estimator == "stopgrad"].set_index(["setting", "divergence", "gamma", "support"])
    for (_, name, _, support), row in stopgrad.iterrows():
        if name == "reverse_kl":
            assert row.rel_error < 1e-12
        else:
            assert row.rel_error > 0.1, (name, support)


def test_the_top_k_target_is_not_the_full_one():
    """J^topk (the teacher's top token and a tail) is another objective than J^f, at both gammas."""
    problem = TabularProblem.random(seed=1)
    div = divergence_for("js")
    for gamma in (0.0, 1.0):
        full, top = true_gradient(problem, div, gamma, "full"), true_gradient(problem, div, gamma, "topk")
        assert (full - top).norm() > 0.1 * full.norm()
        torch.testing.assert_close(full, true_gradient(problem, div, gamma, "sampled"), rtol=1e-12, atol=1e-14)


def test_gamma_zero_and_one_targets_differ():
    problem = TabularProblem.random(seed=1)
    div = divergence_for("js")
    per_state, full = true_gradient(problem, div, 0.0), true_gradient(problem, div, 1.0)
    assert (per_state - full).norm() > 0.3 * full.norm()


def test_a_broken_estimator_would_fail():
    """The check has teeth: the unbiased estimate with a wrong gamma misses the gamma = 1 target."""
    problem = TabularProblem.random(seed=2)
    div = divergence_for("forward_kl")
    weight_Y = problem.token_logprobs(problem.logits_student_S_V).sum(-1).exp()
    expected = torch.einsum("y,ysv->sv", weight_Y, per_response_gradients(problem, div, "unbiased", 0.0))
    assert (expected - true_gradient(problem, div, 1.0)).norm() / true_gradient(problem, div, 1.0).norm() > 0.05


def test_monte_carlo_unbiased_error_shrinks_like_inverse_sqrt_and_stopgrad_plateaus():
    mc = monte_carlo_table(4096, seed=0, gamma=1.0, repeats=40).set_index(["divergence", "estimator", "samples"])
    error = mc.rms_rel_error
    ratio_unbiased = error["forward_kl", "unbiased", 256] / error["forward_kl", "unbiased", 4096]
    assert 2.5 < ratio_unbiased < 6.5  # sqrt(16) = 4
    ratio_stopgrad = error["forward_kl", "stopgrad", 256] / error["forward_kl", "stopgrad", 4096]
    assert ratio_stopgrad < 1.3
    assert error["forward_kl", "stopgrad", 4096] > 5 * error["forward_kl", "unbiased", 4096]
    assert error["neyman", "unbiased state baseline", 4096] < error["neyman", "unbiased", 4096]


def test_cli_writes_tables_and_exits_zero(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--samples", "64"]) == 0
    out = capsys.readouterr().out
    assert "forward_kl" in out and "OK:" in out and "Monte-Carlo" in out and "stale policy" in out
    assert "A teacher with another tokenizer" in out
    for name in (
        "exact.md",
        "exact.csv",
        "stale.md",
        "stale.csv",
        "monte_carlo.md",
        "monte_carlo.csv",
        "cross_tokenizer.md",
        "cross_tokenizer.csv",
    ):
        assert (tmp_path / name).stat().st_size > 100


def test_divergence_parameters_come_from_their_yaml_or_the_command_line(tmp_path, capsys):
    assert divergence_for("alpha").description.endswith("alpha=0.5")  # conf/divergence/alpha.yaml
    assert divergence_for("alpha", {"alpha": 0.3}).description.endswith("alpha=0.3")
    assert divergence_for("js", {"alpha": 0.3}).name == "js"  # a parameter only those taking it get
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--param", "alpha=1"])
    assert "alpha divergence needs a finite alpha not equal to 0 or 1" in capsys.readouterr().err


USER_LOSSES = """
import torch
from opdx.objective import opd_loss


def token_logprobs(logits, tokens):
    return torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def opd_plus(student_logits, teacher_logits, tokens, mask, divergence, gamma):
    logp, logq = token_logprobs(student_logits, tokens), token_logprobs(teacher_logits, tokens)
    return opd_loss(logp, logq, mask, divergence, "unbiased", gamma)


def stopgrad_forward_kl(student_logits, teacher_logits, tokens, mask, divergence, gamma):
    if divergence != "forward_kl":
        raise NotImplementedError(divergence)
    logp, logq = token_logprobs(student_logits, tokens), token_logprobs(teacher_logits, tokens)
    return opd_loss(logp, logq, mask, divergence, "stopgrad", gamma)


def per_token_mean(student_logits, teacher_logits, tokens, mask, divergence, gamma):
    logp, logq = token_logprobs(student_logits, tokens), token_logprobs(teacher_logits, tokens)
    return opd_loss(logp, logq, mask, divergence, "unbiased", gamma, token_mean=True)
"""


def test_anyones_loss_is_checked_against_the_exact_gradient(tmp_path, monkeypatch, capsys):
    """A correct loss (OPD+) is exact everywhere; the stop-gradient forward-KL loss is biased (and
    says which divergences it does not take); a per-token mean is the right direction at 1/T."""
    (tmp_path / "user_losses.py").write_text(USER_LOSSES)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["--out", str(tmp_path / "out"), "--loss", "user_losses:opd_plus"]) == 0
    assert "OK: every supported case is exact" in capsys.readouterr().out
    table = pd.read_csv(tmp_path / "out" / "conformance.csv")
    assert len(table) == 2 * (len(DIVERGENCES) - 1) and set(table.verdict) == {"exact"}  # alpha takes a parameter
    assert main(["--out", str(tmp_path / "out"), "--loss", "user_losses:stopgrad_forward_kl"]) == 1
    table = pd.read_csv(tmp_path / "out" / "conformance.csv").set_index("divergence")
    assert set(table.loc["forward_kl", "verdict"]) == {"biased"} and table.loc["forward_kl", "rel_error"].min() > 1
    assert set(table.drop(index="forward_kl").verdict) == {"not supported"}
    assert main(["--out", str(tmp_path / "out"), "--loss", "user_losses:per_token_mean"]) == 1
    assert set(pd.read_csv(tmp_path / "out" / "conformance.csv").verdict) == {"scaled"}
    with pytest.raises(SystemExit):
        main(["--loss", "user_losses:nothing_here"])
    assert "cannot be loaded" in capsys.readouterr().err


def test_per_decision_weights_make_a_stale_policys_samples_exact_and_the_token_ratio_alone_does_not():
    stale = stale_table(length=2, seed=1)
    exact = stale[stale.must_be_exact]
    # OPD+ for every f and stop-gradient OPD for reverse_kl, gamma 0 and 1, one and two updates old
    assert len(exact) == 2 * 2 * (len(DIVERGENCES) + 1)
    assert set(exact.weighting) == {"per_decision"} and exact.rel_error.max() < 1e-12
    unbiased = (
        stale[stale.estimator == "unbiased"].set_index(["weighting", "updates", "divergence", "gamma"]).sort_index()
    )
    assert unbiased.loc["token ratio"].rel_error.min() > 1e-3  # the states are still the old policy's
    assert unbiased.loc["none"].rel_error.min() > 1e-3
    # two updates old is further off than one when nothing or the token's ratio alone corrects it
    for weighting in ("none", "token ratio"):
        assert unbiased.loc[(weighting, 2)].rel_error.mean() > unbiased.loc[(weighting, 1)].rel_error.mean()


def test_span_estimators_are_exact_where_spans_are_actions_and_the_whole_return_everywhere():
    """Another seed than the command's default. With the teacher's pieces cut by position alone,
    causal OPD+ on spans is exact at gamma 0 and 1 (stop-gradient only for reverse_kl); with a
    merge whose boundary depends on the next character, causal OPD+ is biased for every f at
    gamma 1 (reverse_kl included) and OPD+ with the whole return is exact."""
    spans = cross_tokenizer_table(seed=2)
    assert spans[spans.must_be_exact].rel_error.max() < 1e-12
    causal = spans[spans.estimator == "causal unbiased"].set_index(["teacher tokenizer", "divergence", "gamma"])
    assert (causal.loc["merges"].rel_error > 1e-3).all() and (causal.loc["pairs"].rel_error < 1e-12).all()
    stopgrad = spans[(spans.estimator == "causal stopgrad") & (spans["teacher tokenizer"] == "pairs")]
    assert (stopgrad[stopgrad.divergence != "reverse_kl"].rel_error > 0.1).all()
    whole = spans[spans.estimator == "whole unbiased"]
    assert set(whole["teacher tokenizer"]) == {"pairs", "merges"} and set(whole.gamma) == {1.0}
