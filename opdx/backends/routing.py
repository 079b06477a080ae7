"""Several teachers behind one: each problem's tokens scored by the teacher of its mixture component.

    opdx train benchmark=mixture      # conf/benchmark/mixture.yaml: arith -> the arith teacher, products -> its own

``RoutedTeacher`` is the teacher backend of a ``benchmark=mixture`` run (``opdx.run`` builds it
from each component's teacher, every distinct one loaded once). It splits a rollout's rows by
``Problem.source``, hands each teacher its rows (``Rollout.select``) and puts the results back
in the rows' places, so the trainer and the estimators see one [B, T] tensor (or one
``DenseScores``, ``opdx.logits.RoutedScores``) as from a single teacher. Any backend may serve a
component (``teacher=hf``, ``teacher=server``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from opdx.backends import Teacher
from opdx.benchmarks import Problem
from opdx.logits import RoutedScores
from opdx.rollout import Rollout, SamplingParams


class RoutedTeacher:
    """The teacher of each problem's component: ``teachers`` maps a component's name to its
    backend (the same object for components that share a teacher). ``context`` is the smallest
    of the teachers'; ``supports`` are those every teacher supports."""

    def __init__(self, teachers: Mapping[str, Teacher]) -> None:
        self.teachers = dict(teachers)
        distinct = {id(teacher): teacher for teacher in self.teachers.values()}
        self.distinct = list(distinct.values())
        self.context = min(teacher.context for teacher in self.distinct)
        self.supports = tuple(s for s in self.distinct[0].supports if all(s in t.supports for t in self.distinct))

    def _rows_by_teacher(self, problems: Sequence[Problem | str] | None) -> list[tuple[Teacher, list[int]]]:
        """Each distinct teacher with the indices of the problems it serves; ValueError naming a
        problem without a component or with an unknown one."""
        if problems is None:
            raise ValueError("a mixture's teachers are chosen by each problem's source: the rollout needs its problems")
        rows: dict[int, list[int]] = {}
        for i, problem in enumerate(problems):
            source = getattr(problem, "source", None)
            if source not in self.teachers:
                raise ValueError(
                    f"problem {i} has source {source!r}, not a component with a teacher ({', '.join(self.teachers)})"
                )
            rows.setdefault(id(self.teachers[source]), []).append(i)
        return [(teacher, rows[id(teacher)]) for teacher in self.distinct if id(teacher) in rows]

    def prompt_ids(self, problems: Sequence[Problem | str]) -> list[list[int]]:
        """Each problem's prompt as its own teacher renders it."""
        ids: list[list[int]] = [[] for _ in problems]
        for teacher, rows in self._rows_by_teacher(problems):
            for row, prompt in zip(rows, teacher.prompt_ids([problems[i] for i in rows]), strict=True):
                ids[row] = prompt
        return ids

    def _scatter(self, rollout: Rollout, score: Callable[[Teacher, Rollout], Tensor]) -> Tensor:
        """Each teacher's ``score`` of its rows ([b, T]) put in those rows of one [B, T] tensor, in
        the widest dtype of the teachers' (float64 where one is)."""
        scored = [
            (rows, score(teacher, rollout.select(rows))) for teacher, rows in self._rows_by_teacher(rollout.problems)
        ]
        shape, dtype = scored[0][1].shape[1:], functools.reduce(torch.promote_types, (s.dtype for _, s in scored))
        merged = torch.empty((len(rollout.response_tokens_B_T), *shape), dtype=dtype)
        for rows, scores in scored:
            merged[torch.tensor(rows)] = scores.to(dtype)
        return merged

    def logprobs(self, rollout: Rollout) -> Tensor:
        """log q_c(response token | prefix) of each row under its component c's teacher, [B, T]."""
        return self._scatter(rollout, lambda teacher, rows: teacher.logprobs(rows))

    def dense(self, rollout: Rollout, top_k: int | None = None) -> RoutedScores:
        """Each row's next-token distribution under its component's teacher (over the pair's shared
        tokenizer), as that teacher gives it (``dense``)."""
        parts = [
            (torch.tensor(rows), teacher.dense(rollout.select(rows), top_k))
            for teacher, rows in self._rows_by_teacher(rollout.problems)
        ]
        return RoutedScores(parts, len(rollout.response_tokens_B_T))

    def sample(
        self,
        problems: Sequence[Problem | str],
        samples_per_prompt: int,
        max_new_tokens: int,
        params: SamplingParams,
        greedy: bool = False,
        on_step: Callable[[], object] | None = None,
    ) -> Rollout:
        """The answers of the teacher of ``problems``, which must all be served by one teacher
        (evaluation samples one component at a time); ValueError otherwise."""
        groups = self._rows_by_teacher(problems)
        if len(groups) != 1:
            raise ValueError(
                f"these {len(problems)} problems come from components with different teachers: sample each "
                "component's problems on their own (opdx.evaluation does)"
            )
        return groups[0][0].sample(problems, samples_per_prompt, max_new_tokens, params, greedy, on_step)

    def update_weights(self, model: nn.Module, version: int) -> None:
        """Each teacher takes what it takes of the trainer's module: nothing for a frozen one, the
        module itself for one that shares the student's model (``teacher=self``)."""
        for teacher in self.distinct:
            teacher.update_weights(model, version)
