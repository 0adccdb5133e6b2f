"""Evaluation metrics as plain functions of predictions, log-probs and cached teacher targets.

Everything here is model-free (numpy / torch on given arrays), so each metric is tested against a
hand-computed value. `kdpipe.evaluation.scoring` runs the models; `kdpipe.stages.evaluate` puts them together.

Fidelity to the teacher is measured per target position of a cache and averaged over positions
(token-weighted). With the teacher's cached top-k ids ``T`` (k of them) and its tail mass ``r``:

- ``kl``: KL(p̄ ‖ q̄) in nats, where p̄ and q̄ are the teacher's and the student's distributions
  coarsened to k + 1 atoms: the k teacher ids and one "everything else" atom (the teacher's cached
  tail mass r; the student's exact mass outside T). The teacher's atoms are renormalised (its
  float16 log-probs and tail need not sum to exactly 1). By the data-processing inequality this is
  a lower bound on the full-vocabulary KL(p ‖ q), and equal to it when the tail is empty (k = V).
  It is not a cross-entropy: a student identical to the teacher scores 0.
- ``top1_agreement``: fraction of positions where the student's argmax (full vocabulary) is the
  teacher's top-1 id.
- ``topk_recall``: mean of |student top-k ∩ teacher top-k| / k (k = the cache's k).
- ``ece``: expected calibration error of the student's top-1 confidence (its max probability)
  against whether its argmax is the actual next token of the data; 15 equal-width bins on [0, 1],
  ECE = Σ_b (n_b / N) · |accuracy_b − mean confidence_b|.
- ``ece_teacher``: the same confidence against agreement with the teacher's top-1 instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

ECE_BINS = 15


# ---------------------------------------------------------------- task metrics


def accuracy(gold: Sequence[str], predicted: Sequence[str | None]) -> float:
    """Fraction of exact label matches (a None prediction, e.g. unparsable output, is wrong)."""
    if not gold:
        return math.nan
    return sum(g == p for g, p in zip(gold, predicted)) / len(gold)


def macro_f1(gold: Sequence[str], predicted: Sequence[str | None],
             labels: Sequence[str] | None = None) -> float:
    """Unweighted mean over classes of F1 = 2·TP / (2·TP + FP + FN).

    The classes are `labels` restricted to those that occur in `gold` or `predicted` (as scikit-learn
    does without ``labels=``): a class nobody predicted and nobody has is not averaged in. A None
    prediction is a miss of the gold class (a false negative) and a false positive of no class.
    """
    present = set(gold) | {p for p in predicted if p is not None}
    classes = [c for c in (labels if labels is not None else sorted(present)) if c in present]
    if not classes:
        return math.nan
    scores = []
    for c in classes:
        tp = sum(g == c and p == c for g, p in zip(gold, predicted))
        fp = sum(g != c and p == c for g, p in zip(gold, predicted))
        fn = sum(g == c and p != c for g, p in zip(gold, predicted))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return float(np.mean(scores))


def exact_match(correct: Sequence[bool]) -> float:
    """Fraction of answers the checker accepted."""
    return sum(map(bool, correct)) / len(correct) if len(correct) else math.nan


def perplexity(nll_sum: float, tokens: int) -> float:
    """exp(total negative log-likelihood / number of scored tokens)."""
    return math.exp(nll_sum / tokens) if tokens else math.nan


def ece(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error: Σ_b (n_b / N) |acc_b − conf_b| over `bins` equal-width bins.

    Bin b holds confidences in ((b−1)/bins, b/bins]; a confidence of exactly 0 goes to the first bin.
    """
    confidence, correct = np.asarray(confidence, np.float64), np.asarray(correct, np.float64)
    if confidence.size == 0:
        return math.nan
    index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            gap = abs(correct[members].mean() - confidence[members].mean())
            total += members.sum() / confidence.size * gap
    return float(total)


# ---------------------------------------------------------------- fidelity to the teacher


def teacher_bucket_logp(topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, tail_mass: torch.Tensor,
                        vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher over k + 1 atoms (its top-k ids, then the tail), renormalised: ([N, k+1] log-probs,
    valid [N, k]).

    Cached ids at or above the student's vocabulary (a teacher vocabulary padded larger) cannot be
    told apart by the student: their mass joins the tail atom and they are marked invalid.
    """
    lp = topk_logprobs.double()
    valid = topk_ids < vocab
    moved = torch.where(valid, 0.0, lp.exp()).sum(-1)
    tail = (tail_mass.double().clamp_min(0.0) + moved).log()
    atoms = torch.cat([lp.masked_fill(~valid, -math.inf), tail.unsqueeze(-1)], -1)
    return atoms.log_softmax(-1), valid


def student_bucket_logp(student_logp: torch.Tensor, topk_ids: torch.Tensor,
                        valid: torch.Tensor) -> torch.Tensor:
    """The student's full-vocabulary log-probs [N, V] over the same k + 1 atoms: [N, k+1]."""
    logp = student_logp.double()
    ids = torch.where(valid, topk_ids, 0)
    picked = logp.gather(-1, ids).masked_fill(~valid, -math.inf)
    vocab = logp.shape[-1]
    hit = torch.zeros(logp.shape[0], vocab + 1, dtype=torch.bool, device=logp.device)
    # invalid ids go to a spare column, cut off after the scatter
    hit = hit.scatter_(-1, torch.where(valid, topk_ids, vocab), True)[:, :vocab]
    rest = logp.masked_fill(hit, -math.inf).logsumexp(-1, keepdim=True)
    return torch.cat([picked, rest], -1)


def kl_atoms(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """Per-row KL(p ‖ q) = Σ p (log p − log q) over atoms; atoms with p = 0 contribute 0."""
    zero = teacher_logp.isneginf()
    p_log = teacher_logp.masked_fill(zero, 0.0)
    q_log = student_logp.masked_fill(zero, 0.0)
    return torch.where(zero, 0.0, p_log.exp() * (p_log - q_log)).sum(-1)


def fidelity_stats(student_logp: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                   tail_mass: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-position fidelity quantities from the student's [N, V] log-probs and the cached teacher targets.

    Returns float64 tensors [N]: ``kl``, ``agree`` (student argmax == teacher top-1), ``recall``
    (|student top-k ∩ teacher top-k| / k), ``confidence`` (student max prob), ``correct`` (student
    argmax == actual next token) and ``nll`` (−log q of the actual next token).
    """
    vocab, k = student_logp.shape[-1], topk_ids.shape[-1]
    ids = topk_ids.long()
    teacher, valid = teacher_bucket_logp(ids, topk_logprobs, tail_mass, vocab)
    student = student_bucket_logp(student_logp, ids, valid)
    top_lp, top_ids = student_logp.topk(min(k, vocab), dim=-1)
    argmax = top_ids[:, 0]
    overlap = (top_ids.unsqueeze(-1) == ids.unsqueeze(-2)).any(-1).sum(-1)
    labels = labels.long()
    return {
        "kl": kl_atoms(teacher, student).clamp_min(0.0),
        "agree": (argmax == ids[:, 0]).double(),
        "recall": overlap.double() / k,
        "confidence": top_lp[:, 0].double().exp(),
        "correct": (argmax == labels).double(),
        "nll": -student_logp.double().gather(-1, labels.clamp(max=vocab - 1).unsqueeze(-1)).squeeze(-1),
    }


def summarize_fidelity(stats: dict[str, np.ndarray]) -> dict[str, float]:
    """Position-averaged fidelity metrics (see the module docstring) from concatenated `fidelity_stats`."""
    return {
        "kl": float(np.mean(stats["kl"])),
        "top1_agreement": float(np.mean(stats["agree"])),
        "topk_recall": float(np.mean(stats["recall"])),
        "ece": ece(stats["confidence"], stats["correct"]),
        "ece_teacher": ece(stats["confidence"], stats["agree"]),
        "cache_ppl": perplexity(float(np.sum(stats["nll"])), int(stats["nll"].size)),
        "positions": int(stats["kl"].size),
    }
