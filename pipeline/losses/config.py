"""`DistillLossConfig`: what the distillation loss computes, checked once, including the rule for sampled
caches. No torch here: stage configs build and check it while the command line parses its options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kdpipe.losses.divergences import LOSSES

TAIL_MODES = ("renorm", "bucket")

# A sampled cache stores an unbiased estimate p̂ of the teacher (E[p̂] = p). Only a loss that is linear in
# the teacher keeps the student's gradient unbiased: forward KL, at T = 1 (tempering is not linear), with
# the bucket atom (renormalising by the estimate's sum would divide by a random variable).
SAMPLED_SOUND: dict[str, Any] = {"loss": "fkl", "temperature": 1.0, "tail": "bucket"}


class BiasedOnSampled(ValueError):
    """Options whose loss would be biased on a sampled cache; ``unsound`` lists (name, value, sound value)."""

    def __init__(self, unsound: list[tuple[str, Any, Any]]):
        self.unsound = unsound
        name, value, sound = unsound[0]
        super().__init__(f"{name}={value!r} is not supported on a sampled cache (use {name}={sound!r}): "
                         "only forward KL at T = 1 over the full vocabulary has an unbiased sampled estimate")


@dataclass
class DistillLossConfig:
    """loss = alpha * T^2 * divergence_T(teacher, student) + (1 - alpha) * CE(labels).

    loss: one of ``LOSSES`` (`kdpipe.losses.divergences`). skew: lambda of the skewed KLs. beta: JSD
    mixing weight. tail: "renorm" (both sides restricted to the k ids and renormalised) or "bucket"
    (a (k+1)-th atom holding the mass outside the ids on both sides).
    chunk_size: positions per chunk.
    fused: use the fused linear path when the head is a plain ``nn.Linear`` (see `kdpipe.losses.fused`).
    sampled: the targets are a sampled cache's unbiased estimate p̂ (``logprobs`` = log p̂, not
    renormalised; see `teacher_targets`). Only `SAMPLED_SOUND` is accepted then (`BiasedOnSampled`).
    """

    loss: str = "fkl"
    alpha: float = 0.5
    temperature: float = 1.0
    skew: float = 0.1
    beta: float = 0.5
    tail: str = "bucket"
    chunk_size: int = 1024
    fused: bool = True
    sampled: bool = False

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
        unsound = self.biased_on_sampled()
        if unsound:
            raise BiasedOnSampled(unsound)

    def biased_on_sampled(self) -> list[tuple[str, Any, Any]]:
        """On a sampled cache, the (name, value, sound value) of each option that would bias the loss.

        Pure cross-entropy (alpha = 0) does not use the teacher, so nothing is biased then.
        """
        if not self.sampled or self.alpha == 0:
            return []
        return [(name, getattr(self, name), sound) for name, sound in SAMPLED_SOUND.items()
                if getattr(self, name) != sound]
