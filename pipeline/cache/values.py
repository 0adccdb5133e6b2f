"""The teacher's values must be finite: checked where they are written and wherever they are decoded.

A NaN or inf log-prob (an fp16 teacher that overflowed, a broken checkpoint, a hand-edited shard) would
train a NaN student that still looks finished; one `np.isfinite` over what was just computed or
decoded stops it at the batch, naming the example. Sampled caches pad their log p̂ with -inf where
nothing was drawn (count 0): those cells are not values and are not checked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kdpipe.cache.format import CachedExample, Targets
from kdpipe.errors import KdpipeError

RECOMPUTE = "--dtype fp32 (or bf16 on a GPU with compute capability >= 8)"


def nonfinite(t: Targets, positions: np.ndarray | None = None) -> str | None:
    """What in one example's targets is NaN or infinite ("2 NaN top-k log-probs, the first at position 7")."""
    drawn = t.sample_counts > 0 if t.sample_counts is not None else np.ones(t.topk_logprobs.shape, bool)
    checked = (("top-k log-prob", t.topk_logprobs, drawn), ("target log-prob", t.target_logprob, None),
               ("tail mass", t.tail_mass, None))
    for what, values, valid in checked:
        bad = ~np.isfinite(values) if valid is None else valid & ~np.isfinite(values)
        if bad.any():
            row = int(np.flatnonzero(bad.reshape(len(bad), -1).any(-1))[0])
            nan = np.isnan(values[bad])
            kind = "NaN" if nan.all() else "inf" if not nan.any() else "NaN/inf"
            where = f"position {int(positions[row])}" if positions is not None else f"row {row}"
            return f"{int(bad.sum())} {kind} {what}{'s' if bad.sum() > 1 else ''}, the first at {where}"
    return None


def check_decoded(rows: Sequence[CachedExample], where: str) -> list[CachedExample]:
    """Refuse decoded rows holding a non-finite value (a cache written by an old kdpipe or by hand)."""
    for e in rows:
        problem = nonfinite(e.targets, e.positions)
        if problem:
            raise KdpipeError(
                f"{where}: example '{e.id}' has {problem}: this cache holds non-finite teacher values and "
                f"would train or score NaN. Compute it again: cache-teacher --overwrite with {RECOMPUTE}"
            )
    return list(rows)


def value_stats(targets: Sequence[Targets]) -> dict[str, Any]:
    """A shard's value statistics, recorded at write time (its Parquet metadata and manifest entry)."""
    lp = [t.topk_logprobs[t.sample_counts > 0] if t.sample_counts is not None else t.topk_logprobs.ravel()
          for t in targets]
    parts = {"logprob": lp, "target_logprob": [t.target_logprob for t in targets],
             "tail_mass": [t.tail_mass for t in targets]}
    stats: dict[str, Any] = {"nonfinite": 0}
    for name, arrays in parts.items():
        values = np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays] or [np.zeros(0)])
        stats["nonfinite"] += int((~np.isfinite(values)).sum())
        finite = values[np.isfinite(values)]
        stats[f"{name}_min"] = round(float(finite.min()), 6) if finite.size else None
        stats[f"{name}_max"] = round(float(finite.max()), 6) if finite.size else None
    return stats


def check_finite(t: Targets, example: Any, index: int, dtype: str) -> None:
    """Refuse a non-finite teacher value where it appears (before anything of its shard is written)."""
    problem = nonfinite(t, example.positions)
    if problem:
        hint = (f"A {dtype} teacher can overflow: rerun with {RECOMPUTE}" if dtype != "float32" else
                "The teacher already runs in float32 (--dtype fp32), so its checkpoint itself gives them "
                "(NaN or inf weights?): check the model")
        raise KdpipeError(f"the teacher gave example '{example.id}' (shard {index}) {problem}; nothing was "
                          f"cached for that shard. {hint}")


LOW_TARGET_PROB = 0.1  # below: the teacher does not say the completions it is asked to teach
ONE_HOT_TOP1 = 0.99  # above: a near one-hot teacher, whose targets carry little beyond the label


@dataclass
class TeacherConfidence:
    """How much the teacher itself says the cached completions, over the positions scored in this run: the
    mean probability of the actual next token and (top-k caches) of its top-1 token. A real chat teacher
    asked zero-shot for a one-word label put 0.0016 on it (docs/results/real-teacher.md): distilling it
    teaches its own answer format, not the labels; a fine-tuned teacher near one-hot makes KD act as SFT."""

    sampled: bool
    heldout: bool = False  # a cache to score fidelity on, not to train from: the one-hot note does not apply
    positions: int = 0
    target_prob: float = 0.0
    top1_prob: float = 0.0

    def add(self, targets: list[Targets]) -> None:
        for t in targets:
            self.positions += len(t.target_logprob)
            self.target_prob += float(np.exp(np.asarray(t.target_logprob, np.float64)).sum())
            if not self.sampled and len(t.target_logprob):
                self.top1_prob += float(np.exp(np.asarray(t.topk_logprobs[:, 0], np.float64)).sum())

    def notes(self) -> list[str]:
        if not self.positions:
            return []
        target, top1 = self.target_prob / self.positions, self.top1_prob / self.positions
        if target < LOW_TARGET_PROB:
            return [f"note: over the {self.positions:,} cached positions the teacher gives the actual next "
                    f"token a mean probability of {target:.4f} (under {LOW_TARGET_PROB}): it does not say "
                    "these completions, so distilling it teaches its own answers rather than yours; "
                    "fine-tune it on the task first (kdpipe finetune) or write the completions as it says "
                    "them (its label words, its chat format)"]
        if not self.sampled and not self.heldout and top1 > ONE_HOT_TOP1:
            return [f"note: over the {self.positions:,} cached positions the teacher is near one-hot (mean "
                    f"top-1 probability {top1:.4f}): its targets carry little beyond the completions, so KD "
                    "will act much like SFT; --temperature above 1 at train time spreads what it has"]
        return []
