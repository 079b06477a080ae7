"""RoutedTeacher: each row of a mixed rollout scored by its own component's teacher."""

import dataclasses

import pytest
import torch

from opdx.backends.hf import HFModel
from opdx.backends.routing import RoutedTeacher
from opdx.benchmarks import get_benchmark
from opdx.config import asset_path
from opdx.models import load_model, load_tokenizer_of
from opdx.rollout import PLAIN_SAMPLING


@pytest.fixture(scope="module")
def parts():
    """The tiny arith teacher, the tiny student standing in for a second teacher (they differ),
    and a seeded rollout of 3 arith and 3 products prompts interleaved, 2 samples each."""
    tokenizer = load_tokenizer_of(asset_path("tiny/teacher"))
    arith_teacher, other = (
        HFModel(load_model(asset_path(f"tiny/{role}"), "float32", "cpu", tokenizer, trainable=False), tokenizer)
        for role in ("teacher", "student")
    )
    arith, products = (get_benchmark(name, train_size=50, eval_size=10).eval[:3] for name in ("arith", "products"))
    problems = [
        dataclasses.replace(p, source=s)
        for a, b in zip(arith, products, strict=True)
        for p, s in ((a, "arith"), (b, "products"))
    ]
    torch.manual_seed(0)
    rollout = arith_teacher.sample(problems, 2, 24, PLAIN_SAMPLING)
    return arith_teacher, other, RoutedTeacher({"arith": arith_teacher, "products": other}), rollout


def test_each_row_gets_the_log_probs_and_logits_of_its_components_teacher(parts):
    arith_teacher, other, routed, rollout = parts
    sources = [p.source for p in rollout.problems]
    arith_rows = [i for i, s in enumerate(sources) if s == "arith"]
    products_rows = [i for i, s in enumerate(sources) if s == "products"]
    assert len(arith_rows) == len(products_rows) == 6
    mask = rollout.response_mask_B_T
    logp = routed.logprobs(rollout)
    for teacher, rows, wrong in ((arith_teacher, arith_rows, other), (other, products_rows, arith_teacher)):
        expected = teacher.logprobs(rollout)[rows]
        torch.testing.assert_close(logp[rows][mask[rows]], expected[mask[rows]], atol=1e-5, rtol=1e-5)
        assert (logp[rows] - wrong.logprobs(rollout)[rows])[mask[rows]].abs().max() > 1.0  # the teachers differ
    states = routed.dense(rollout).at(mask)  # every response position's logits, row-major, in chunks of 5
    logits_S_V = torch.cat([states.chunk(start, start + 5) for start in range(0, int(mask.sum()), 5)])
    assert logits_S_V.shape == (mask.sum(), arith_teacher.scores.vocab_size)
    for teacher, rows in ((arith_teacher, arith_rows), (other, products_rows)):
        own_B_T = torch.zeros_like(mask, dtype=torch.bool)
        own_B_T[rows] = mask[rows]
        expected = teacher.dense(rollout).at(own_B_T).chunk(0, int(own_B_T.sum()))
        torch.testing.assert_close(logits_S_V[own_B_T[mask]], expected, atol=1e-4, rtol=1e-4)
    top = routed.dense(rollout, top_k=3).at(mask).chunk(0, int(mask.sum()))
    assert top.ids.shape == (mask.sum(), 3) and bool((top.logq_tail < 0).all())
    torch.testing.assert_close(top.logq_token, logp[mask], atol=1e-4, rtol=1e-4)


def test_prompts_samples_and_errors_route_by_source(parts):
    arith_teacher, other, routed, rollout = parts
    assert routed.prompt_ids(rollout.problems) == arith_teacher.prompt_ids(rollout.problems)  # one tokenizer
    assert routed.context == 64 and routed.supports == ("sampled", "topk", "full")
    products = [p for p in rollout.problems if p.source == "products"][:2]
    torch.manual_seed(1)
    routed_sample = routed.sample(products, 1, 24, PLAIN_SAMPLING, greedy=True)
    torch.testing.assert_close(
        routed_sample.response_tokens_B_T,
        other.sample(products, 1, 24, PLAIN_SAMPLING, greedy=True).response_tokens_B_T,
    )
    with pytest.raises(ValueError, match="components with different teachers"):
        routed.sample(rollout.problems[::2], 1, 24, PLAIN_SAMPLING)
    stray = dataclasses.replace(rollout.problems[0], source="gsm8k")
    with pytest.raises(ValueError, match="source 'gsm8k', not a component with a teacher \\(arith, products\\)"):
        routed.prompt_ids([stray])
    shared = RoutedTeacher({"arith": arith_teacher, "products": arith_teacher})
    assert shared.distinct == [arith_teacher]
