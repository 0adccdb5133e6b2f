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
from pathlib import Path
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


def check_distinct(caches: Sequence[Any], given: Sequence[str], allow_overlap: bool = False) -> None:
    """No cache pooled twice, no example in two caches (each would be trained on twice per epoch).

    The same cache: the same folder however spelled (``c/base``, ``c/base/``, ``./c/../c/base``, a symlink)
    or a copy (the same shard files, by sha256): always refused. An overlap (a cache plus one of its parts,
    two caches of the same data): shards holding the same example ids (``ids_sha256``) of the same data;
    refused unless `allow_overlap`.
    """
    for j, b in enumerate(caches):
        for i, a in enumerate(caches[:j]):
            if _where(a) == _where(b) or _shard_files(a) == _shard_files(b):
                how = "the same folder" if _where(a) == _where(b) else "a copy: the same shard files"
                raise KdpipeError(f"--cache {given[j]} is the same cache as --cache {given[i]} ({how}); "
                                  "pooling it twice would train every example twice: give it once")
            shared = _examples(a) & _examples(b)
            if shared and not allow_overlap:
                rows = sum(s.rows for s in b.manifest.shards if (_data(b), s.ids_sha256) in shared)
                raise KdpipeError(
                    f"--cache {given[i]} and --cache {given[j]} overlap: {len(shared)} of the latter's "
                    f"{len(b.manifest.shards)} shards ({rows} examples) hold the same examples as shards of "
                    "the former (a cache and one of its parts, or two caches of the same data), which would "
                    "be trained on twice; leave one out, or pass --allow-overlap to pool them on purpose")


def _where(cache: Any) -> str:
    return str(Path(cache.path).resolve()) if isinstance(cache.path, Path) else str(cache.path).rstrip("/")


def _shard_files(cache: Any) -> frozenset[str]:
    return frozenset(s.sha256 for s in cache.manifest.shards)


def _data(cache: Any) -> Any:
    """Which data a cache's example ids refer to: the file's sha256, or the source and split."""
    d = cache.manifest.dataset
    return (d.file or {}).get("sha256") or (d.source, d.split)


def _examples(cache: Any) -> set[tuple[Any, str]]:
    """(data, ids hash) of every shard that records its ids hash (older caches do not)."""
    return {(_data(cache), s.ids_sha256) for s in cache.manifest.shards if s.ids_sha256}


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
