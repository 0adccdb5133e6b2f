"""The losses of ``--cross-tokenizer``: the universal logit distillation term and their combination.

ULD (Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss")
compares two next-token distributions over different vocabularies by their sorted probabilities: the
closed-form Wasserstein-1 distance sum_i |p_(i) - q_(i)| between the probability vectors sorted in
decreasing order (the shorter one padded with zeros). A top-k cache knows the teacher's k largest
probabilities and the rest as one tail mass: ranks 1..k are compared exactly and the ranks past k as
one bucket (|tail_teacher - tail_student|), a lower bound of the full distance (triangle inequality).
Both sides at temperature 1.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from kdpipe.losses import DistillLossConfig, SparseTargets, distill_loss
from kdpipe.train.trainer import DistillTrainer, student_at_targets


def _uld_chunk(head: Any, hidden: torch.Tensor, teacher_p: torch.Tensor, teacher_tail: torch.Tensor,
               ) -> torch.Tensor:
    probs = head(hidden).float().softmax(-1)
    k = teacher_p.shape[-1]
    top = probs.topk(min(k, probs.shape[-1]), dim=-1).values
    if top.shape[-1] < k:
        top = torch.nn.functional.pad(top, (0, k - top.shape[-1]))
    student_tail = (1.0 - top.sum(-1)).clamp_min(0.0)
    return (top - teacher_p).abs().sum(-1) + (student_tail - teacher_tail).abs()


def uld_loss(hidden: torch.Tensor, head: Any, logprobs: torch.Tensor, tail: torch.Tensor,
             chunk_size: int = 1024) -> torch.Tensor:
    """Summed ULD distance over N positions: student hidden [N, D], teacher top-k log-probs [N, k]
    (most likely first, -inf at padding) and tail mass [N]."""
    total = hidden.new_zeros((), dtype=torch.float32)
    teacher_p = logprobs.float().exp()  # -inf -> 0
    for start in range(0, hidden.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        per = checkpoint(_uld_chunk, head, hidden[sl], teacher_p[sl], tail[sl].float(), use_reentrant=False)
        total = total + per.sum()
    return total


def cross_loss(hidden: torch.Tensor, head: Any, inputs: dict[str, torch.Tensor], cfg: DistillLossConfig,
               uld_weight: float, num_items: Any = None) -> torch.Tensor:
    """(alpha·T²·Σ_aligned D + (1 − alpha)·Σ_all CE + uld_weight·Σ_paired ULD) / num_items (default: N).

    `hidden` [N, D] is the student at every trained position (`CrossCollator`'s targets); D is taken
    only at ``kd_index`` against the projected teacher targets, ULD only at ``uld_index``.
    """
    from dataclasses import replace

    n = hidden.shape[0]
    labels = inputs["labels"]
    total = hidden.sum() * 0.0
    if n == 0:  # a batch of rows without recoverable text: nothing to learn, and no count to divide by
        return total
    if cfg.alpha < 1:
        dummy = SparseTargets(labels.new_zeros(n, 1), hidden.new_zeros(n, 1, dtype=torch.float32),
                              hidden.new_zeros(n, dtype=torch.float32), labels)
        ce = distill_loss(hidden, head, dummy, replace(cfg, alpha=0.0), num_items=1)
        total = total + (1.0 - cfg.alpha) * ce
    kd = inputs["kd_index"]
    if cfg.alpha > 0 and kd.numel():
        targets = SparseTargets(inputs["topk_ids"], inputs["topk_logprobs"], inputs["tail_mass"], labels[kd])
        div = distill_loss(hidden[kd], head, targets, replace(cfg, alpha=1.0), num_items=1)
        total = total + cfg.alpha * div
    pair = inputs["uld_index"]
    if uld_weight > 0 and pair.numel():
        total = total + uld_weight * uld_loss(hidden[pair], head, inputs["uld_logprobs"], inputs["uld_tail"],
                                              cfg.chunk_size)
    return total / (max(n, 1) if num_items is None else num_items)


class CrossTokenizerTrainer(DistillTrainer):
    """`DistillTrainer` on the batches of `kdpipe.vocab.cross_tokenizer.CrossCollator`: the same order,
    checkpoints and divergence checks, with `cross_loss` (plus ULD with `loss_config.uld_weight`)."""

    def __init__(self, *args: Any, uld_weight: float = 0.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.uld_weight = uld_weight

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        selected, head = student_at_targets(model, inputs)
        loss = cross_loss(selected, head, inputs, self.loss_config, self.uld_weight, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as DistillTrainer: the count was global
        return (loss, None) if return_outputs else loss
