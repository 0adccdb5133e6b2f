"""Reading a cache without loading it whole: shard by shard, a record batch at a time."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kdpipe.cache.format import ENCODINGS, CachedExample, read_manifest
from kdpipe.cache.storage import Store
from kdpipe.cache.values import check_decoded
from kdpipe.errors import KdpipeError


class Cache:
    """A cache folder (a path or an object-storage URL): its manifest and an iterator over decoded examples.

    `path` is a `Path` for a local folder and the URL string otherwise; `store` reads its files.
    """

    def __init__(self, path: str | Path):
        self.store = Store.open(path)
        self.path: Path | str = Path(self.store.root) if self.store.local else self.store.url
        self.manifest: dict[str, Any] = read_manifest(self.store)
        encoding = self.manifest["encoding"]
        if encoding not in ENCODINGS:
            raise KdpipeError(f"{self.path}: unknown cache encoding '{encoding}' (known: {', '.join(ENCODINGS)})")
        self._decode = ENCODINGS[encoding][1]

    @property
    def k(self) -> int:
        return int(self.manifest["sparse"]["k"])

    @property
    def shards(self) -> list[dict[str, Any]]:
        return sorted(self.manifest["shards"], key=lambda s: s["index"])

    def __len__(self) -> int:
        return sum(s["rows"] for s in self.shards)

    def iter_examples(self, batch_rows: int = 64) -> Iterator[CachedExample]:
        """Every example, shard by shard, decoded `batch_rows` at a time (memory-mapped reads when local)."""
        for shard in self.shards:
            yield from self.iter_shard(shard, batch_rows)

    def iter_shard(self, shard: dict[str, Any], batch_rows: int = 64) -> Iterator[CachedExample]:
        self.check_present(shard)
        for batch in self.store.parquet(shard["file"]).iter_batches(batch_size=batch_rows):
            yield from check_decoded(self._decode(batch), self.store.display(shard["file"]))

    def check_present(self, shard: dict[str, Any]) -> None:
        """Refuse a shard the manifest lists but the folder lacks, pointing at `kdpipe cache verify`."""
        if not self.store.is_file(shard["file"]):
            raise KdpipeError(
                f"{self.store.display(shard['file'])} is missing (listed in the manifest); run `kdpipe cache verify {self.path}`"
            )


def open_cache(path: str | Path) -> Cache:
    """Open a cache folder for reading (see `Cache`)."""
    return Cache(path)
