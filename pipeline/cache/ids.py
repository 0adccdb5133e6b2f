"""Rank-coded token ids of the compact encodings: frequent ids become small numbers before zstd.

Each shard of a ``compact``/``compact16`` cache stores, instead of a teacher id ``v``, its rank
``r(v)`` in an order of the whole id space fixed when the shard is written: the ids the shard's
targets use, by frequency class (``floor(log2 count)``, most frequent class first) and by id
within a class, then every other id in id order. The column type and Parquet layout stay the
same (uint16/uint32, BYTE_STREAM_SPLIT, zstd); small ranks leave the high byte planes mostly
zero and the low ones skewed, which zstd turns into fewer bytes (measured: bench/bench_bytes.py).

Why per shard and by class: the order is a function of that shard's own targets, so it is fixed
before the shard is written and needs nothing from other shards (resume, ``--num-shards`` parts
and ``cache merge`` are unchanged). Classes instead of an exact frequency order: the table then
is a sorted id set per class (small deltas) rather than a permutation (~13 bits an id), for
nearly the same skew. The table travels in the shard's own Parquet metadata (key
``kdpipe_id_ranks``), so any row group decodes by itself; the shard's kdpipe metadata says
``"id_coding": "rank"``. Shards without it (every cache written before) hold raw ids.

Decoding is one table lookup per id (``order[ranks]``); ids of a padded vocabulary (ids at or
above the tokenizer's size, up to the model's head size) are ordinary ids here.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import numpy as np
import pyarrow as pa

from kdpipe.errors import KdpipeError

MAX_IDS = 1 << 22  # the largest id space rank-coded (real vocabularies: up to ~2^18)
CODING = "rank"  # the kdpipe metadata's "id_coding" of rank-coded shards
TABLE_KEY = b"kdpipe_id_ranks"


class RankTable:
    """An order of the ids ``[0, size)``: ``order[r]`` is the id of rank r, ``rank[v]`` the rank of id v.

    Only the ranked head is stored (``head`` = the ids the shard uses, by class then id); the ids
    not in it follow in id order, so ``size`` only needs to cover the largest id.
    """

    def __init__(self, head: np.ndarray, size: int):
        self.head = np.asarray(head, np.int64)
        self.size = int(size)
        rest = np.ones(self.size, bool)
        rest[self.head] = False
        self.order = np.concatenate([self.head, np.flatnonzero(rest)]).astype(np.int32)
        self.rank = np.empty(self.size, np.int32)
        self.rank[self.order] = np.arange(self.size, dtype=np.int32)

    @classmethod
    def of(cls, ids: np.ndarray, vocab_size: int | None) -> RankTable | None:
        """The table of a shard whose id columns hold `ids` (any shape); None when an id is beyond any
        vocabulary (``MAX_IDS``): such a shard keeps raw ids rather than a table of that size."""
        flat = np.asarray(ids, np.int64).ravel()
        size = max(int(vocab_size or 0), int(flat.max()) + 1 if flat.size else 1)
        if size > MAX_IDS or (flat.size and flat.min() < 0):
            return None
        counts = np.bincount(flat, minlength=size)
        used = np.flatnonzero(counts)
        cls_ = np.floor(np.log2(counts[used])).astype(np.int64)
        head = used[np.lexsort((used, -cls_))]  # most frequent class first, by id within a class
        return cls(head, size)

    def encode(self, ids: np.ndarray) -> np.ndarray:
        return self.rank[np.asarray(ids, np.int64)].astype(np.int64)

    def decode(self, ranks: np.ndarray) -> np.ndarray:
        """Ranks -> ids; a rank beyond the table (a damaged shard) decodes to itself, which `cache verify`
        then names as an id outside the vocabulary instead of an IndexError."""
        r = np.asarray(ranks, np.int64)
        if r.size and r.max() >= self.size:
            out = r.copy()
            inside = r < self.size
            out[inside] = self.order[r[inside]]
            return out.astype(np.int32)
        return self.order[r]

    def to_metadata(self) -> bytes:
        """The table as Parquet metadata: JSON with the class runs' lengths and the zstd'd id deltas.

        Within a class the ids ascend, so each run is stored as deltas (small); a run starts where
        the next id is not larger than the one before.
        """
        head = self.head
        starts = np.flatnonzero(np.diff(head, prepend=head[:1] + 1) <= 0)  # the first id starts a run
        deltas = np.diff(head, prepend=0)
        deltas[starts] = head[starts]
        planes = deltas.astype("<u4").view(np.uint8).reshape(-1, 4).T.copy()  # byte planes: what zstd likes
        packed = pa.compress(planes.tobytes(), codec="zstd", asbytes=True)
        return json.dumps({"size": self.size, "n": int(head.size), "runs": starts.tolist(),
                           "zstd_b64": base64.b64encode(packed).decode()}, separators=(",", ":")).encode()

    @classmethod
    def from_metadata(cls, raw: bytes) -> RankTable:
        key = hashlib.sha1(raw).digest()
        table = _TABLES.get(key)
        if table is None:
            d = json.loads(raw)
            n = int(d["n"])
            planes = pa.decompress(base64.b64decode(d["zstd_b64"]), decompressed_size=4 * n, codec="zstd",
                                   asbytes=True)
            deltas = (
                np.frombuffer(planes, np.uint8).reshape(4, n).T.copy().view("<u4").ravel().astype(np.int64)
            )
            runs = np.asarray(d["runs"], np.int64)
            bounds = np.append(runs, n)
            head = np.concatenate(
                [np.cumsum(deltas[a:b]) for a, b in zip(bounds[:-1], bounds[1:])] or [np.zeros(0, np.int64)]
            )
            table = cls(head, int(d["size"]))
            if len(_TABLES) >= 8:  # a few shards' tables: a row group at a time, shard by shard
                _TABLES.pop(next(iter(_TABLES)))
            _TABLES[key] = table
        return table


_TABLES: dict[bytes, RankTable] = {}


def table_for(schema_metadata: dict[bytes, bytes] | None) -> RankTable | None:
    """The rank table of a shard (None: its ids are raw, as in every cache before rank coding)."""
    meta = schema_metadata or {}
    raw = meta.get(TABLE_KEY)
    if raw is None:
        if b'"id_coding":"rank"' in meta.get(b"kdpipe", b"").replace(b" ", b""):
            raise KdpipeError(
                "a rank-coded shard was read without its Parquet file metadata (the rank table): "
                "read it with pyarrow.parquet.ParquetFile(...).read() or kdpipe.cache.open_cache, "
                "not pyarrow.parquet.read_table"
            )
        return None
    return RankTable.from_metadata(raw)


def split_file_metadata(table: pa.Table) -> tuple[pa.Table, dict[bytes, bytes]]:
    """A table to write without its rank table, and the rank table as Parquet file metadata.

    In the Arrow schema's metadata it would be stored twice (pyarrow also embeds the schema, metadata
    included, base64'd in the footer); as file metadata it is stored once, and pyarrow still hands it
    back in every row group's and batch's schema metadata.
    """
    meta = dict(table.schema.metadata or {})
    raw = meta.pop(TABLE_KEY, None)
    if raw is None:
        return table, {}
    return table.replace_schema_metadata(meta), {TABLE_KEY: raw}


def wants_ranks(metadata: dict[str, Any]) -> bool:
    """Whether an encode call asked for rank-coded ids (its kdpipe metadata's id_coding)."""
    return metadata.get("id_coding") == CODING
