"""Both sides reduced to the same few atoms: the k cached ids, plus (bucket mode) one tail atom.

The divergence is then taken between two small distributions [C, atoms] (`kdpipe.losses.divergences`).
These are the reference forms, used by the checkpointed path; the fused path (`kdpipe.losses.fused`)
computes the student's side from per-row scalars instead, with the same result.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kdpipe.losses.config import DistillLossConfig


def upcast(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 (fp64 stays fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def student_atoms(
    logits: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor, temperature: float, tail: str
) -> torch.Tensor:
    """Student log-probs at T over the atoms: [C, k] (renorm) or [C, k + 1] (bucket).

    logits [C, V]; ids [C, k] int64; valid [C, k] bool (False at padded ids, which get -inf). In
    bucket mode the last atom is the exact mass outside the valid ids: logsumexp over the logits
    with those ids masked out.
    """
    z = upcast(logits)
    if temperature != 1.0:
        z = z / temperature
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


def teacher_atoms(
    logprobs: torch.Tensor, tail_mass: torch.Tensor, temperature: float, tail: str
) -> torch.Tensor:
    """Teacher log-probs at T over the atoms: [C, k] (renorm) or [C, k + 1] (bucket).

    logprobs [C, k] (-inf at padded ids); tail_mass [C].
    renorm: softmax(logprobs / T) over the k ids (exact when k = vocab).
    bucket: weights exp(logprobs / T) and tail^(1/T), renormalised. This treats the
    tail as a single token, so it is exact at T = 1 (or when the tail is empty) and
    an approximation otherwise: the true tempered tail is sum_{v not cached} p_v^(1/T).
    """
    t = upcast(logprobs) / temperature
    if tail == "bucket":
        log_tail = upcast(tail_mass).clamp_min(0.0).log() / temperature
        t = torch.cat([t, log_tail.unsqueeze(-1)], -1)
    return t.log_softmax(-1)


def teacher_targets(logprobs: torch.Tensor, tail_mass: torch.Tensor, cfg: DistillLossConfig) -> torch.Tensor:
    """The teacher side of the divergence: `teacher_atoms`, or for a sampled cache log p̂ as stored.

    A sampled cache's p̂(v) = count(v)/N · p(v)/q(v) has E[p̂] = p; it is used as is (plus the
    bucket atom of mass `tail_mass`, the estimate's mass on ids the student cannot produce), never
    renormalised: Σ p̂ is 1 only when the proposal is p itself, and dividing by it would bias the
    estimate. Forward KL is linear in the teacher, so its gradient w.r.t. the student is then unbiased.
    """
    if not cfg.sampled:
        return teacher_atoms(logprobs, tail_mass, cfg.temperature, cfg.tail)
    log_tail = upcast(tail_mass).clamp_min(0.0).log()
    return torch.cat([upcast(logprobs), log_tail.unsqueeze(-1)], -1)
