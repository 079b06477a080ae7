"""f-divergences for on-policy distillation, computed from log u.

Conventions (docs/opd-math.md): p = student (trained), q = teacher (frozen), and for a
sampled token y of state s, u = q(y|s) / p(y|s), always handled as ``log_u = log q - log p``.
The per-state divergence with the student as base measure is

    D_f(q || p) = sum_y p(y) f(q(y) / p(y)) = E_{y~p}[f(u)].

Each divergence gives, as functions of ``log_u`` (any shape, elementwise):
- ``f(log_u)``: f(u), the per-token divergence estimate (the OPD reward is -f(u));
- ``opd_advantage(log_u)``: -f(u), the stop-gradient OPD advantage (biased unless reverse_kl);
- ``unbiased_advantage(log_u)``: w_f(u) = -f(u) + u f'(u), the OPD+ advantage (unbiased).

Adding k(u - 1) to f leaves D_f unchanged but changes the stop-gradient bias, so each f is
exactly the one of the table in docs/opd-math.md.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

LogUFn = Callable[[Tensor], Tensor]
LOG_2 = math.log(2.0)


@dataclass(frozen=True)
class Divergence:
    """An f-divergence D_f(q || p) = E_{y~p}[f(u)], u = q/p, given in log space.

    ``f`` and ``w`` map log u to f(u) and to w_f(u) = -f(u) + u f'(u).
    """

    name: str
    description: str
    f: LogUFn
    w: LogUFn

    def opd_advantage(self, log_u: Tensor) -> Tensor:
        """Stop-gradient OPD advantage -f(u)."""
        return -self.f(log_u)

    def unbiased_advantage(self, log_u: Tensor) -> Tensor:
        """OPD+ advantage w_f(u) = -f(u) + u f'(u)."""
        return self.w(log_u)

    def full(self, logits_student: Tensor, logits_teacher: Tensor, chunk_size: int = 1024) -> Tensor:
        """Exact D_f(q || p) per state from full next-token logits.

        ``logits_student`` and ``logits_teacher`` are [..., V] over the same vocabulary; returns
        [...] = sum_v p_v f(q_v / p_v), computed in float32 at least (float64 stays float64) and
        in chunks of ``chunk_size`` states so the upcast copies never exceed one chunk.
        Differentiable with respect to both inputs.
        """
        if logits_student.shape != logits_teacher.shape:
            raise ValueError(
                f"student logits {tuple(logits_student.shape)} and teacher logits "
                f"{tuple(logits_teacher.shape)} must have the same shape"
            )
        dtype = torch.promote_types(logits_student.dtype, torch.float32)
        batch_shape, vocab = logits_student.shape[:-1], logits_student.shape[-1]
        flat_student_S_V = logits_student.reshape(-1, vocab)
        flat_teacher_S_V = logits_teacher.reshape(-1, vocab)
        chunks = []
        for start in range(0, flat_student_S_V.shape[0], chunk_size):
            logp_S_V = torch.log_softmax(flat_student_S_V[start : start + chunk_size].to(dtype), dim=-1)
            logq_S_V = torch.log_softmax(flat_teacher_S_V[start : start + chunk_size].to(dtype), dim=-1)
            p_S_V = logp_S_V.exp()
            # A student probability that underflows to 0 would give 0 * inf = nan; such terms are
            # dropped. Their limit as p -> 0 is q * lim_{u->inf} f(u)/u: 0 for reverse_kl, but
            # q log(2)/2 for js and q/2 for tv, so elsewhere this misses that much of the teacher's
            # mass on tokens whose student probability underflows (none in float32 unless log p < -103).
            log_u_S_V = torch.where(p_S_V > 0, logq_S_V - logp_S_V, 0.0)  # keeps backward finite too
            term_S_V = torch.where(p_S_V > 0, p_S_V * self.f(log_u_S_V), 0.0)
            chunks.append(term_S_V.sum(dim=-1))
        return torch.cat(chunks).reshape(batch_shape)


def _reverse_kl() -> Divergence:
    # f(u) = -log u; w = log u - 1
    return Divergence("reverse_kl", "KL(p || q), the mode-seeking direction", lambda lu: -lu, lambda lu: lu - 1)


def _forward_kl() -> Divergence:
    # f(u) = u log u; w = u
    return Divergence(
        "forward_kl", "KL(q || p), the mass-covering direction", lambda lu: lu.exp() * lu, lambda lu: lu.exp()
    )


def _log_mean_with_one(log_u: Tensor) -> Tensor:
    """log((1 + u) / 2) = softplus(log u) - log 2, stable for any log u."""
    return torch.nn.functional.softplus(log_u) - LOG_2


def _js() -> Divergence:
    # f(u) = 1/2 [u log u - (1 + u) log((1 + u)/2)]; w = 1/2 log((1 + u)/2)
    def f(lu: Tensor) -> Tensor:
        u = lu.exp()
        return 0.5 * (u * lu - (1 + u) * _log_mean_with_one(lu))

    return Divergence("js", "Jensen-Shannon JS(p, q) with m = (p + q)/2", f, lambda lu: 0.5 * _log_mean_with_one(lu))


def _tv() -> Divergence:
    # f(u) = 1/2 |u - 1|; w = 1/2 sign(u - 1)
    return Divergence(
        "tv",
        "total variation 1/2 sum |q - p|",
        lambda lu: 0.5 * torch.expm1(lu).abs(),
        lambda lu: 0.5 * torch.sign(lu),
    )


def _hellinger() -> Divergence:
    # f(u) = (sqrt u - 1)^2; w = sqrt u - 1
    return Divergence(
        "hellinger",
        "squared Hellinger sum (sqrt p - sqrt q)^2",
        lambda lu: torch.expm1(0.5 * lu).square(),
        lambda lu: torch.expm1(0.5 * lu),
    )


def _pearson() -> Divergence:
    # f(u) = (u - 1)^2; w = u^2 - 1
    return Divergence(
        "pearson",
        "Pearson chi^2(q || p) = sum (q - p)^2 / p",
        lambda lu: torch.expm1(lu).square(),
        lambda lu: torch.expm1(2 * lu),
    )


def _neyman() -> Divergence:
    # f(u) = (1 - u)^2 / u = 4 sinh^2(log u / 2); w = 2 - 2/u
    return Divergence(
        "neyman",
        "Neyman chi^2(q || p) = sum (q - p)^2 / q",
        lambda lu: 4 * torch.sinh(0.5 * lu).square(),
        lambda lu: -2 * torch.expm1(-lu),
    )


def _alpha(alpha: float) -> Divergence:
    # f(u) = (u^a - a u - (1 - a)) / (a (a - 1)) = (expm1(a lu) - a expm1(lu)) / (a (a - 1));
    # w = (u^a - 1) / a
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha in (0, 1):
        raise ValueError(
            f"alpha divergence needs a finite alpha not equal to 0 or 1, got alpha={alpha!r} "
            "(alpha -> 0 is reverse_kl, alpha -> 1 is forward_kl: use those names)"
        )
    a = float(alpha)
    return Divergence(
        "alpha",
        f"Amari alpha-divergence, alpha={a:g}",
        lambda lu: (torch.expm1(a * lu) - a * torch.expm1(lu)) / (a * (a - 1)),
        lambda lu: torch.expm1(a * lu) / a,
    )


DIVERGENCES: dict[str, Callable[..., Divergence]] = {
    "reverse_kl": _reverse_kl,
    "forward_kl": _forward_kl,
    "js": _js,
    "tv": _tv,
    "hellinger": _hellinger,
    "pearson": _pearson,
    "neyman": _neyman,
    "alpha": _alpha,
}


def parameters(name: str) -> list[str]:
    """The parameter names the divergence ``name`` takes (``["alpha"]`` for alpha, else none)."""
    return list(inspect.signature(DIVERGENCES[name]).parameters)


def get_divergence(name: str, **params: float) -> Divergence:
    """The divergence registered as ``name`` with its parameters (``alpha`` takes ``alpha=``).

    Raises ValueError naming the bad name and the valid ones, or the parameters the divergence
    takes when they are not exactly those given.
    """
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}; valid divergences: {', '.join(DIVERGENCES)}")
    expected = parameters(name)
    if sorted(params) != sorted(expected):
        takes = f"takes {', '.join(f'{p}=' for p in expected)}" if expected else "takes no parameters"
        raise ValueError(f"divergence {name!r} {takes}; got {sorted(params) or 'none'}")
    return DIVERGENCES[name](**params)


def build_divergence(config: Mapping[str, Any]) -> Divergence:
    """The divergence of a config node ``{name: ..., <parameter>: ...}`` (a ``conf/divergence``
    file with its overrides), the one constructor for the run, its validation and ``opdx verify``."""
    params = {key: value for key, value in config.items() if key != "name"}
    return get_divergence(config["name"], **params)
