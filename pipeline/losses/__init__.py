"""Sparse distillation losses, chunked over positions.

The teacher is cached as its top-k next-token log-probs (plus the probability mass outside them); the
student is the full-vocab softmax of ``head(hidden)``. Both are reduced to the same few *atoms* -- the
k cached ids, optionally plus one "tail" atom -- and a divergence is taken between the two atom
distributions, mixed with cross-entropy by ``alpha``.

| module | what |
|---|---|
| `config` | `DistillLossConfig` (options, checked once, the sampled-cache rule), `TAIL_MODES` |
| `divergences` | one small function per divergence; `DIVERGENCES` (name -> function), `LOSSES` |
| `atoms` | the teacher's and the student's atom log-probs |
| `distill` | `SparseTargets`, `distill_loss` (chunking, checkpointed path) |
| `fused` | the fused linear path (loss and gradients in closed form) |

Importing this package loads no torch: the command line takes its ``--loss`` / ``--tail`` choices and
stage configs their check from here. The tensor functions load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kdpipe.losses.config import SAMPLED_SOUND, TAIL_MODES, BiasedOnSampled, DistillLossConfig
from kdpipe.losses.divergences import DIVERGENCES, LOSSES, UNDERFLOW_LOGP, divergence

if TYPE_CHECKING:
    from kdpipe.losses.atoms import student_atoms, teacher_atoms, teacher_targets
    from kdpipe.losses.distill import SparseTargets, distill_loss
    from kdpipe.losses.fused import _fusable_linear as _fusable_linear

# The names that need torch: imported from their module when first asked for (PEP 562).
_TORCH_NAMES = {
    "SparseTargets": "distill", "distill_loss": "distill",
    "student_atoms": "atoms", "teacher_atoms": "atoms", "teacher_targets": "atoms",
    "_fusable_linear": "fused",
}

__all__ = ["DIVERGENCES", "LOSSES", "SAMPLED_SOUND", "TAIL_MODES", "UNDERFLOW_LOGP", "BiasedOnSampled",
           "DistillLossConfig", "SparseTargets", "distill_loss", "divergence", "student_atoms",
           "teacher_atoms", "teacher_targets"]


def __getattr__(name: str) -> Any:
    if name not in _TORCH_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_TORCH_NAMES[name]}"), name)
    globals()[name] = value  # once imported, a plain attribute
    return value
