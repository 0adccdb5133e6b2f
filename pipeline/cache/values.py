"""The teacher's values must be finite: checked where they are written and wherever they are decoded.

A NaN or inf log-prob (an fp16 teacher that overflowed, a broken checkpoint, a hand-edited shard) would
train a NaN student that still looks finished; one `np.isfinite` over what was just computed or
decoded stops it at the batch, naming the example. Sampled caches pad their log p̂ with -inf where
nothing was drawn (count 0): those cells are not values and are not checked.
"""

from __future__ import annotations

from collections.abc import Sequence
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
