"""The divergences between the teacher's and the student's atom distributions, one small function each.

Every divergence takes ``p`` (teacher) and ``q`` (student) as log-probs [..., A] over the same A atoms
(the k cached ids, plus the tail bucket in bucket mode) and the loss config (for ``skew`` / ``beta``),
and returns its terms per atom [..., A]; `divergence` prepares both sides and sums the terms to one
value per position [...]. `DIVERGENCES` maps the ``--loss`` names to the functions: the command
line's choices and `DistillLossConfig`'s check both come from it.

This module imports no torch (the functions use tensor methods only), so the command line can list
the names without loading torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from torch import Tensor


class Settings(Protocol):
    """What a divergence reads of the loss config (`kdpipe.losses.config.DistillLossConfig`, which imports
    this module's names: a protocol rather than an import back)."""

    loss: str
    skew: float
    beta: float

# log of float32's smallest positive value: the cache's resolution of a tail mass
UNDERFLOW_LOGP = -149 * math.log(2.0)


def kl_terms(log_a: Tensor, log_b: Tensor) -> Tensor:
    """Elementwise a * (log a - log b), with 0 where a = 0 (value and grad NaN-free)."""
    zero = log_a.isneginf()
    log_a, log_b = log_a.masked_fill(zero, 0.0), log_b.masked_fill(zero, 0.0)
    return (log_a.exp() * (log_a - log_b)).where(~zero, 0.0)


def log_mix(log_a: Tensor, log_b: Tensor, w: float) -> Tensor:
    """log(w * a + (1 - w) * b)."""
    if w == 0.0:
        return log_b
    if w == 1.0:
        return log_a
    return (log_a + math.log(w)).logaddexp(log_b + math.log1p(-w))


def fkl(p: Tensor, q: Tensor, cfg: Settings) -> Tensor:
    """Forward KL(p || q): the classic distillation loss; mass-covering."""
    return kl_terms(p, q)


def rkl(p: Tensor, q: Tensor, cfg: Settings) -> Tensor:
    """Reverse KL(q || p): mode-seeking."""
    return kl_terms(q, p)


def skew_fkl(p: Tensor, q: Tensor, cfg: Settings) -> Tensor:
    """Skewed forward KL(p || l*p + (1-l)*q), l = ``cfg.skew`` (DistiLLM's definition)."""
    return kl_terms(p, log_mix(p, q, cfg.skew))


def skew_rkl(p: Tensor, q: Tensor, cfg: Settings) -> Tensor:
    """Skewed reverse KL(q || l*q + (1-l)*p), l = ``cfg.skew`` (DistiLLM's definition)."""
    return kl_terms(q, log_mix(q, p, cfg.skew))


def jsd(p: Tensor, q: Tensor, cfg: Settings) -> Tensor:
    """Generalized JSD b*KL(p||m) + (1-b)*KL(q||m), m = b*p + (1-b)*q, b = ``cfg.beta``."""
    m = log_mix(p, q, cfg.beta)
    return cfg.beta * kl_terms(p, m) + (1.0 - cfg.beta) * kl_terms(q, m)


def tvd(p: Tensor, q: Tensor, cfg: Settings) -> Tensor:
    """Total variation 0.5 * sum |p - q|."""
    return 0.5 * (p.exp() - q.exp()).abs()


Divergence = Callable[["Tensor", "Tensor", Settings], "Tensor"]
DIVERGENCES: dict[str, Divergence] = {
    "fkl": fkl, "rkl": rkl, "skew-fkl": skew_fkl, "skew-rkl": skew_rkl, "jsd": jsd, "tvd": tvd,
}
LOSSES = tuple(DIVERGENCES)  # the --loss names, in the order --help lists them


def divergence(student_logp: Tensor, teacher_logp: Tensor, cfg: Settings,
               loss: str | None = None) -> Tensor:
    """Per-position divergence ``loss`` (default ``cfg.loss``) [...] between teacher p and student q,
    log-probs [..., atoms].

    Atoms where both sides are 0 contribute nothing. A teacher atom that is 0 where the student's is
    not can only be a float32 underflow of the cached tail mass (a softmax is never 0; padded ids are
    -inf on both sides): it is floored at float32's smallest value, 2^-149, so that reverse KL stays
    finite for a very confident teacher.
    """
    floor = teacher_logp.isneginf() & ~student_logp.isneginf()
    teacher_logp = teacher_logp.where(~floor, UNDERFLOW_LOGP)
    dead = student_logp.isneginf() & teacher_logp.isneginf()
    q, p = student_logp.masked_fill(dead, 0.0), teacher_logp.masked_fill(dead, 0.0)
    return DIVERGENCES[loss or cfg.loss](p, q, cfg).masked_fill(dead, 0.0).sum(-1)
