"""Training on several caches at once (``train-student --cache A --cache B``): checks and the mixed dataset.

The caches' rows are simply pooled: the student sees every row of every cache once per epoch, in the
block-shuffled order of `BlockShuffleSampler` over all their row groups, so a row of A and a row of B
share batches. The mix is thus set by the caches' sizes (e.g. `generate --limit` for the generated
part). Caches mix only when their targets mean the same thing to the loss: the same teacher, the same
tokenizer (token ids) and the same sparse settings (k, top-k or sampled); encodings, templates and
data may differ.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from kdpipe.errors import KdpipeError
from kdpipe.train.data import CacheDataset


def check_mixable(caches: Sequence[Any]) -> None:
    """Every cache's targets are interchangeable with the first's; a KdpipeError naming what differs."""
    first = caches[0]
    for other in caches[1:]:
        for what, get in (("teacher", lambda m: m.teacher.model),
                          ("tokenizer (vocabulary hash)", lambda m: m.tokenizer.vocab_hash),
                          ("sparse settings", lambda m: m.sparse.to_dict())):
            a, b = get(first.manifest), get(other.manifest)
            if a != b:
                raise KdpipeError(
                    f"caches {first.path} and {other.path} cannot be mixed: their {what} differ ({a} vs "
                    f"{b}). Mixed caches must come from the same teacher with the same tokenizer and the "
                    "same --top-k / --sparse-mode; cache the other data again with the first cache's "
                    "settings")


def cache_identity(caches: Sequence[Any]) -> str | list[str]:
    """What a run folder records as its data: one cache's settings hash, or the list of them (in order)."""
    hashes = [c.manifest.settings_hash for c in caches]
    return hashes[0] if len(hashes) == 1 else hashes


class MixedCacheDataset(torch.utils.data.Dataset):
    """The rows of several caches, one after the other (global index: cache, then its own index).

    `sizes` lists every cache's row groups in that order, as `BlockShuffleSampler` wants them; each cache
    keeps its own `keep_groups` decoded row groups.
    """

    def __init__(self, caches: Sequence[Any], keep_groups: int = 2):
        self.parts = [CacheDataset(c, keep_groups=keep_groups) for c in caches]
        self.sizes = [s for part in self.parts for s in part.sizes]
        self.starts = np.concatenate([[0], np.cumsum([len(p) for p in self.parts])]).astype(np.int64).tolist()

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < len(self):
            raise IndexError(index)
        part = bisect.bisect_right(self.starts, index) - 1
        return self.parts[part][index - self.starts[part]]
