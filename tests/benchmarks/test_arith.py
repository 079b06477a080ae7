import pytest

from opdx.benchmarks import get_benchmark
from opdx.benchmarks.arith import final_answer, partial_products, running_sums


@pytest.fixture(scope="module")
def arith():
    return get_benchmark("arith", train_size=3000, eval_size=300)


def test_splits_are_disjoint_and_reproducible(arith):
    assert len(arith.eval) == 300
    assert not {p.prompt for p in arith.train} & {p.prompt for p in arith.eval}
    again = get_benchmark("arith", train_size=3000, eval_size=300)
    assert [p.prompt for p in again.eval[:20]] == [p.prompt for p in arith.eval[:20]]


def test_prompts_are_reasoning_gym_chain_sums(arith):
    for problem in arith.eval[:50]:
        assert problem.prompt == problem.entry["metadata"]["expression"].replace(" ", "") + "="
        assert int(problem.answer) == eval(problem.prompt[:-1])  # noqa: S307 - digits and +/- only


def test_worked_solution_and_grading(arith):
    assert running_sums("98 + 93 - 77") == "98+93=191;191-77=114"
    assert running_sums("4 - 9") == "4-9=-5"
    assert final_answer("98+93=191;191-77=114") == "114"
    for problem in arith.eval[:50]:
        assert arith.score(problem, arith.worked_solution(problem)) == 1.0
        assert arith.score(problem, f"={int(problem.answer) + 1}") == 0.0
    problem = arith.eval[0]
    assert arith.score(problem, f"1+1=2;  ={problem.answer} ") == 1.0
    assert arith.score(problem, "") == 0.0


def test_unknown_benchmark():
    with pytest.raises(ValueError, match="'gsm9k'.*arith"):
        get_benchmark("gsm9k")


def test_products_worked_solutions_multiply_by_tens_then_ones_and_grade_right():
    assert partial_products("15 * 43") == "15*4=60;15*3=45;600+45=645"
    assert partial_products("20 * 50") == "20*5=100;20*0=0;1000+0=1000"
    assert partial_products("7 * 8") == "7*8=56"
    products = get_benchmark("products", train_size=200, eval_size=50)
    assert not {p.prompt for p in products.train} & {p.prompt for p in products.eval}
    for problem in products.eval:
        assert len(problem.prompt) == 6 and problem.prompt[2] == "*"  # two 2-digit factors
        assert products.score(problem, products.worked_solution(problem)) == 1.0
    with pytest.raises(ValueError, match="no worked solution for generator='basic_arithmetic'"):
        get_benchmark("arith", generator="basic_arithmetic").worked_solution(products.eval[0])


def test_a_self_teacher_sees_the_solved_expression_or_the_worked_solution_in_the_pairs_characters(arith):
    from opdx.benchmarks import Subset, privileged

    problem = next(p for p in arith.eval if p.prompt.count("+") + p.prompt.count("-") == 2)
    worked = running_sums(problem.prompt.rstrip("="))
    assert privileged(arith, problem, "none") == problem
    assert privileged(arith, problem, "reference").prompt == f"{problem.prompt}{problem.answer};{problem.prompt}"
    assert privileged(arith, problem, "worked").prompt == f"{worked};{problem.prompt}"
    assert privileged(arith, problem, "worked").answer == problem.answer
    assert privileged(Subset(arith, [], [problem]), problem, "worked").prompt == f"{worked};{problem.prompt}"
    with pytest.raises(ValueError, match="teacher.context='hint' is invalid; valid: none, reference, worked"):
        privileged(arith, problem, "hint")
