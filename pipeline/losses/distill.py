"""`distill_loss`: the sparse distillation loss of a student's hidden states, chunked over positions.

The student's [N, V] logits never exist at once: positions are processed ``chunk_size`` at a time on
one of two paths:

* fused (the head is a plain ``nn.Linear``, the usual LM head): `kdpipe.losses.fused`, the gradients
  in closed form during forward; memory O(chunk x V + N x D + V x D).
* checkpointed (any other callable head): each chunk's vocab-sized work runs under
  ``torch.utils.checkpoint`` so that backward recomputes it instead of keeping [N, V] activations.
  Saved memory grows with N x (D + k) and chunk_size x V.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kdpipe.losses.atoms import student_atoms, teacher_targets, upcast
from kdpipe.losses.config import DistillLossConfig
from kdpipe.losses.divergences import divergence
from kdpipe.losses.fused import _fusable_linear, _FusedLinearDistill


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


def _student_chunk(
    head: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    ids: torch.Tensor,
    valid: torch.Tensor,
    labels: torch.Tensor | None,
    cfg: DistillLossConfig,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The vocab-sized part of one chunk: student atoms at T and per-position CE at T=1."""
    logits = upcast(head(hidden))
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
    head maps a [C, D] chunk to [C, V] logits; a plain ``nn.Linear`` takes the fused path
    (unless ``cfg.fused`` is False), anything else the checkpointed one. Pass Trainer's
    ``num_items_in_batch`` as ``num_items`` for correct gradient accumulation.
    """
    n = hidden.shape[0]
    if cfg.alpha < 1 and targets.labels is None:
        raise ValueError("targets.labels is required when alpha < 1")
    if n == 0:
        return hidden.sum() * 0.0
    if cfg.fused and _fusable_linear(head):
        labels = targets.labels if cfg.alpha < 1 else None
        total = _FusedLinearDistill.apply(hidden, head.weight, head.bias, targets.ids, targets.logprobs,
                                          targets.tail, labels, cfg)
        return total / (n if num_items is None else num_items)
    total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
    for start in range(0, n, cfg.chunk_size):
        sl = slice(start, start + cfg.chunk_size)
        chunk = targets[sl]
        valid = ~chunk.logprobs.isneginf()
        atoms, ce = checkpoint(_student_chunk, head, hidden[sl], chunk.ids, valid, chunk.labels, cfg,
                               use_reentrant=False)
        if cfg.alpha > 0:
            teacher = teacher_targets(chunk.logprobs, chunk.tail, cfg)
            total = total + cfg.alpha * cfg.temperature**2 * divergence(atoms, teacher, cfg).sum()
        if cfg.alpha < 1:
            total = total + (1.0 - cfg.alpha) * ce.sum()
    return total / (n if num_items is None else num_items)


@torch.no_grad()
def loss_terms(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], targets: SparseTargets,
               cfg: DistillLossConfig) -> dict[str, float]:
    """The parts of `distill_loss` summed over the N positions, for logging (no graph, chunked): the
    configured divergence at T (unscaled), forward and reverse KL over the same atoms, the cross-entropy of
    the labels at T=1 (when there are labels) and the teacher's tail mass. Divided by N they are the
    per-position means; ``alpha * T^2 * divergence + (1 - alpha) * ce`` is the loss. With alpha 0 (SFT
    through the same head: `kdpipe finetune`) there is no teacher, so only the cross-entropy is given."""
    sft = cfg.alpha == 0
    sums = {} if sft else {"divergence": 0.0, "fkl": 0.0, "rkl": 0.0,
                           "tail_mass": float(targets.tail.float().sum())}
    if targets.labels is not None:
        sums["ce"] = 0.0
    for start in range(0, len(targets), cfg.chunk_size):
        sl = slice(start, start + cfg.chunk_size)
        chunk = targets[sl]
        logits = upcast(head(hidden[sl]))
        if not sft:
            atoms = student_atoms(logits, chunk.ids, ~chunk.logprobs.isneginf(), cfg.temperature, cfg.tail)
            teacher = teacher_targets(chunk.logprobs, chunk.tail, cfg)
            for name, loss in (("divergence", cfg.loss), ("fkl", "fkl"), ("rkl", "rkl")):
                sums[name] += float(divergence(atoms, teacher, cfg, loss).sum())
        if chunk.labels is not None:
            sums["ce"] += float(F.cross_entropy(logits, chunk.labels, reduction="sum"))
    return sums
