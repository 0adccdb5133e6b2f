"""Reading a cache without loading it whole: shard by shard, a row group or a record batch at a time.

Everything outside ``kdpipe.cache`` reads a cache through `Cache` (its typed `Manifest`, its examples,
its row groups, its token ids): nothing else opens its Parquet files or its manifest JSON, so a local
folder and an object-storage URL behave the same.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from kdpipe.cache.format import ENCODINGS, CachedExample
from kdpipe.cache.manifest import Manifest, as_entry
from kdpipe.cache.sections import ShardEntry
from kdpipe.cache.storage import Store
from kdpipe.cache.values import check_decoded
from kdpipe.errors import KdpipeError


class RowGroup(NamedTuple):
    """One Parquet row group of a shard: the unit a map-style dataset decodes at a time."""

    file: str
    index: int  # within its shard file
    rows: int


class Cache:
    """A cache folder (a path or an object-storage URL): its manifest and an iterator over decoded examples.

    `path` is a `Path` for a local folder and the URL string otherwise; `store` reads its files.
    """

    def __init__(self, path: str | Path):
        self.store = Store.open(path)
        self.path: Path | str = Path(self.store.root) if self.store.local else self.store.url
        self.manifest: Manifest = Manifest.read(self.store)
        encoding = self.manifest.encoding
        if encoding not in ENCODINGS:
            raise KdpipeError(f"{self.path}: unknown cache encoding '{encoding}' "
                              f"(known: {', '.join(ENCODINGS)})")
        self._decode = ENCODINGS[encoding].decode

    @property
    def k(self) -> int:
        return self.manifest.k

    @property
    def sampled(self) -> bool:
        return self.manifest.sampled

    @property
    def shards(self) -> list[ShardEntry]:
        """The listed shards by index."""
        return self.manifest.sorted_shards

    def __len__(self) -> int:
        return self.manifest.rows

    def iter_examples(self, batch_rows: int = 64) -> Iterator[CachedExample]:
        """Every example, shard by shard, decoded `batch_rows` at a time (memory-mapped reads when local)."""
        for shard in self.shards:
            yield from self.iter_shard(shard, batch_rows)

    def iter_shard(self, shard: ShardEntry | Mapping[str, Any],
                   batch_rows: int = 64) -> Iterator[CachedExample]:
        shard = as_entry(shard)  # callers holding the manifest's JSON pass its entry
        self.check_present(shard)
        for batch in self.store.parquet(shard.file).iter_batches(batch_size=batch_rows):
            yield from check_decoded(self._decode(batch), self.store.display(shard.file))

    def row_groups(self) -> list[RowGroup]:
        """Every row group in shard order (from the Parquet footers: only those are read)."""
        groups = []
        for shard in self.shards:
            self.check_present(shard)
            meta = self.store.parquet(shard.file).metadata
            groups += [RowGroup(shard.file, g, meta.row_group(g).num_rows)
                       for g in range(meta.num_row_groups)]
        return groups

    def read_row_group(self, group: RowGroup) -> list[CachedExample]:
        """One row group, decoded and checked for non-finite values."""
        table = self.store.parquet(group.file).read_row_group(group.index)
        where = f"{self.store.display(group.file)} (row group {group.index})"
        return check_decoded(self._decode(table), where)

    def iter_input_ids(self) -> Iterator[np.ndarray]:
        """Each example's token ids (int32), in order, reading the input_ids column alone."""
        for shard in self.shards:
            self.check_present(shard)
            column = self.store.parquet(shard.file).read(columns=["input_ids"])["input_ids"]
            for chunk in column.chunks:
                offsets, values = chunk.offsets.to_numpy(), chunk.values.to_numpy(zero_copy_only=False)
                for start, end in zip(offsets[:-1], offsets[1:]):
                    yield values[start:end].astype(np.int32)

    def row_lengths(self) -> np.ndarray:
        """Tokens per cached example (int64), in row order, reading the input_ids column alone."""
        import pyarrow.compute as pc

        parts = [np.zeros(0, np.int64)]
        for shard in self.shards:
            self.check_present(shard)
            column = self.store.parquet(shard.file).read(columns=["input_ids"])["input_ids"]
            parts.append(pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64))
        return np.concatenate(parts)

    def longest_example(self) -> int:
        """Tokens in the longest cached example (0 for none), reading the input_ids column alone."""
        lengths = self.row_lengths()
        return int(lengths.max()) if len(lengths) else 0

    def check_present(self, shard: ShardEntry | Mapping[str, Any]) -> None:
        """Refuse a shard the manifest lists but the folder lacks, pointing at `kdpipe cache verify`."""
        shard = as_entry(shard)
        if not self.store.is_file(shard.file):
            raise KdpipeError(f"{self.store.display(shard.file)} is missing (listed in the manifest); "
                              f"run `kdpipe cache verify {self.path}`")


def open_cache(path: str | Path) -> Cache:
    """Open a cache folder for reading (see `Cache`)."""
    return Cache(path)

