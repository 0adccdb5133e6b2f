"""Sparse distillation losses, chunked over positions.

The teacher is cached as its top-k next-token log-probs (plus the probability mass
outside them); the student is the full-vocab softmax of ``head(hidden)``. Both are
reduced to the same few *atoms* -- the k cached ids, optionally plus one "tail"
atom -- and a divergence is taken between the two atom distributions.

The student's [N, V] logits never exist at once: positions are processed
``chunk_size`` at a time, and each chunk's vocab-sized work runs under
``torch.utils.checkpoint`` so that backward recomputes it instead of keeping
[N, V] activations. Saved memory grows with N x (D + k) and chunk_size x V.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LOSSES = ("fkl", "rkl", "skew-fkl", "skew-rkl", "jsd", "tvd")
TAIL_MODES = ("renorm", "bucket")


@dataclass
class SparseTargets:
    """Cached teacher distributions for N flattened target positions.

    ids:      int64 [N, k], most likely first; padded entries have logprob -inf.
    logprobs: float [N, k], teacher log-softmax at T=1 at ``ids``.
    tail:     float [N], teacher mass outside ``ids`` (0 when k = vocab).
    labels:   int64 [N], the actual next tokens (needed only when alpha < 1).
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    tail: torch.Tensor
    labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, sl: slice) -> SparseTargets:
        labels = None if self.labels is None else self.labels[sl]
        return SparseTargets(self.ids[sl], self.logprobs[sl], self.tail[sl], labels)


@dataclass
class DistillLossConfig:
    """loss = alpha * T^2 * divergence_T(teacher, student) + (1 - alpha) * CE(labels).

    loss: one of ``LOSSES``. skew: lambda of the skewed KLs. beta: JSD mixing weight.
    tail: "renorm" (both sides restricted to the k ids and renormalised) or "bucket"
    (a (k+1)-th atom holding the mass outside the ids on both sides).
    chunk_size: positions per checkpointed chunk.
    """

    loss: str = "fkl"
    alpha: float = 0.5
    temperature: float = 1.0
    skew: float = 0.1
    beta: float = 0.5
    tail: str = "bucket"
    chunk_size: int = 1024

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}; got {self.loss!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0; got {self.temperature}")
        for name in ("alpha", "skew", "beta"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]; got {value}")
        if self.tail not in TAIL_MODES:
            raise ValueError(f"tail must be one of {', '.join(TAIL_MODES)}; got {self.tail!r}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1; got {self.chunk_size}")


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 (fp64 stays fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def student_atoms(
    logits: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor, temperature: float, tail: str
) -> torch.Tensor:
    """Student log-probs at T over the atoms: [C, k] (renorm) or [C, k + 1] (bucket).

    Invalid (padded) ids get -inf. In bucket mode the last atom is the exact mass
    outside the valid ids: logsumexp over the logits with those ids masked out.
    """
    z = _upcast(logits) / temperature
    picked = z.gather(-1, ids).masked_fill(~valid, -math.inf)
    if tail == "renorm":
        return picked.log_softmax(-1)
    vocab = z.shape[-1]
    hit = torch.zeros(z.shape[0], vocab + 1, dtype=torch.bool, device=z.device)
    hit = hit.scatter_(-1, torch.where(valid, ids, vocab), True)[:, :vocab]
    full = hit.all(-1, keepdim=True)  # every id cached: the tail is empty (and its grad must not be NaN)
    rest = z.masked_fill(hit, -math.inf).masked_fill(full, 0.0).logsumexp(-1, keepdim=True)
    rest = rest.masked_fill(full, -math.inf)
    return torch.cat([picked, rest], -1) - z.logsumexp(-1, keepdim=True)


def teacher_atoms(logprobs: torch.Tensor, tail_mass: torch.Tensor, temperature: float, tail: str) -> torch.Tensor:
    """Teacher log-probs at T over the atoms: [C, k] (renorm) or [C, k + 1] (bucket).

    renorm: softmax(logprobs / T) over the k ids (exact when k = vocab).
    bucket: weights exp(logprobs / T) and tail^(1/T), renormalised. This treats the
    tail as a single token, so it is exact at T = 1 (or when the tail is empty) and
    an approximation otherwise: the true tempered tail is sum_{v not cached} p_v^(1/T).
    """
    t = _upcast(logprobs) / temperature
    if tail == "bucket":
        log_tail = _upcast(tail_mass).clamp_min(0.0).log() / temperature
        t = torch.cat([t, log_tail.unsqueeze(-1)], -1)
    return t.log_softmax(-1)


def _kl_terms(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Elementwise a * (log a - log b), with 0 where a = 0 (value and grad NaN-free)."""
    zero = log_a.isneginf()
    log_a, log_b = log_a.masked_fill(zero, 0.0), log_b.masked_fill(zero, 0.0)
    return torch.where(zero, 0.0, log_a.exp() * (log_a - log_b))


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, w: float) -> torch.Tensor:
    """log(w * a + (1 - w) * b)."""
    if w == 0.0:
        return log_b
    if w == 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(w), log_b + math.log1p(-w))


def divergence(student_logp: torch.Tensor, teacher_logp: torch.Tensor, cfg: DistillLossConfig) -> torch.Tensor:
    """Per-position divergence [...] between teacher p and student q given as log-probs [..., atoms].

    fkl KL(p||q); rkl KL(q||p); skew-fkl KL(p || l*p + (1-l)*q); skew-rkl KL(q || l*q + (1-l)*p)
    (l = cfg.skew); jsd b*KL(p||m) + (1-b)*KL(q||m), m = b*p + (1-b)*q (b = cfg.beta);
    tvd 0.5 * sum |p - q|. Atoms where both sides are 0 contribute nothing; a KL whose
    second argument is 0 where the first is not is +inf, as the definition says.
    """
    dead = student_logp.isneginf() & teacher_logp.isneginf()
    q, p = student_logp.masked_fill(dead, 0.0), teacher_logp.masked_fill(dead, 0.0)
    if cfg.loss == "fkl":
        terms = _kl_terms(p, q)
    elif cfg.loss == "rkl":
        terms = _kl_terms(q, p)
    elif cfg.loss == "skew-fkl":
        terms = _kl_terms(p, _log_mix(p, q, cfg.skew))
    elif cfg.loss == "skew-rkl":
        terms = _kl_terms(q, _log_mix(q, p, cfg.skew))
    elif cfg.loss == "jsd":
        m = _log_mix(p, q, cfg.beta)
        terms = cfg.beta * _kl_terms(p, m) + (1.0 - cfg.beta) * _kl_terms(q, m)
    else:  # tvd
        terms = 0.5 * (p.exp() - q.exp()).abs()
    return terms.masked_fill(dead, 0.0).sum(-1)


def _student_chunk(
    head: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    ids: torch.Tensor,
    valid: torch.Tensor,
    labels: torch.Tensor | None,
    cfg: DistillLossConfig,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The vocab-sized part of one chunk: student atoms at T and per-position CE at T=1."""
    logits = _upcast(head(hidden))
    atoms = student_atoms(logits, ids, valid, cfg.temperature, cfg.tail) if cfg.alpha > 0 else None
    ce = F.cross_entropy(logits, labels, reduction="none") if cfg.alpha < 1 else None
    return atoms, ce


def distill_loss(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    targets: SparseTargets,
    cfg: DistillLossConfig,
    num_items: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Distillation loss summed over the N positions, divided by ``num_items`` (default N).

    hidden: [N, D] student hidden states (or logits, with ``head = lambda x: x``);
    head maps a [C, D] chunk to [C, V] logits. Pass Trainer's ``num_items_in_batch``
    as ``num_items`` for correct gradient accumulation.
    """
    n = hidden.shape[0]
    if cfg.alpha < 1 and targets.labels is None:
        raise ValueError("targets.labels is required when alpha < 1")
    if n == 0:
        return hidden.sum() * 0.0
    total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
    for start in range(0, n, cfg.chunk_size):
        sl = slice(start, start + cfg.chunk_size)
        chunk = targets[sl]
        valid = ~chunk.logprobs.isneginf()
        atoms, ce = checkpoint(_student_chunk, head, hidden[sl], chunk.ids, valid, chunk.labels, cfg, use_reentrant=False)
        if cfg.alpha > 0:
            teacher = teacher_atoms(chunk.logprobs, chunk.tail, cfg.temperature, cfg.tail)
            total = total + cfg.alpha * cfg.temperature**2 * divergence(atoms, teacher, cfg).sum()
        if cfg.alpha < 1:
            total = total + (1.0 - cfg.alpha) * ce.sum()
    return total / (n if num_items is None else num_items)
