"""The on-disk cache format (spec: cache/README.md): column schema, encodings, manifest I/O.

A cache folder holds ``manifest.json`` and ``shard-NNNNN.parquet`` files. An *encoding* turns the
teacher's per-position targets into Arrow columns and back; ``plain`` is the default and the one
other tools can rely on.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from kdpipe.cache.storage import Store, as_store, write_atomic  # noqa: F401  (write_atomic: re-exported)
from kdpipe.errors import KdpipeError

FORMAT = "kdpipe-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
METADATA_KEY = b"kdpipe"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


@dataclass
class Targets:
    """The teacher's sparse targets for one example's P distilled positions (decoded, numpy)."""

    topk_ids: np.ndarray  # int32 [P, k], most likely first
    topk_logprobs: np.ndarray  # float32 [P, k], raw log-softmax at T=1
    target_logprob: np.ndarray  # float32 [P], log-prob of the actual next token
    tail_mass: np.ndarray  # float32 [P], probability outside the top-k


@dataclass
class CachedExample:
    """One cached row, decoded: what the reader yields, whatever the encoding."""

    id: str
    input_ids: np.ndarray  # int32 [L]
    positions: np.ndarray  # int32 [P]
    targets: Targets

    @property
    def labels(self) -> np.ndarray:
        """The actual next token at each distilled position."""
        return self.input_ids[self.positions + 1]


def plain_schema(k: int, metadata: dict[str, Any] | None = None) -> pa.Schema:
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("positions", pa.list_(pa.int32()), nullable=False),
        pa.field("topk_ids", pa.list_(pa.list_(pa.int32(), k)), nullable=False),
        pa.field("topk_logprobs", pa.list_(pa.list_(pa.float16(), k)), nullable=False),
        pa.field("target_logprob", pa.list_(pa.float32()), nullable=False),
        pa.field("tail_mass", pa.list_(pa.float32()), nullable=False),
    ]
    meta = {METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()} if metadata else None
    return pa.schema(fields, metadata=meta)


def encode_plain(rows: Sequence[tuple[str, np.ndarray, np.ndarray, Targets]], k: int, metadata: dict[str, Any]) -> pa.Table:
    """Rows of (id, input_ids, positions, targets) -> an Arrow table in the plain encoding."""
    counts = np.array([len(pos) for _, _, pos, _ in rows], np.int64)
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))

    def per_position(values: list[np.ndarray], dtype: Any, width: int | None = None) -> pa.Array:
        flat = pa.array(np.concatenate(values).reshape(-1).astype(dtype))
        inner = pa.FixedSizeListArray.from_arrays(flat, width) if width else flat
        return pa.ListArray.from_arrays(offsets, inner)

    columns = [
        pa.array([r[0] for r in rows], pa.string()),
        _list_array([r[1] for r in rows], np.int32),
        per_position([r[2] for r in rows], np.int32),
        per_position([r[3].topk_ids for r in rows], np.int32, k),
        per_position([r[3].topk_logprobs for r in rows], np.float16, k),
        per_position([r[3].target_logprob for r in rows], np.float32),
        per_position([r[3].tail_mass for r in rows], np.float32),
    ]
    return pa.Table.from_arrays(columns, schema=plain_schema(k, metadata))


def decode_plain(batch: pa.RecordBatch | pa.Table) -> list[CachedExample]:
    """An Arrow batch in the plain encoding -> decoded examples (numpy views where possible)."""
    data = {name: batch.column(name) for name in batch.schema.names}
    if isinstance(batch, pa.Table):
        data = {name: col.combine_chunks() for name, col in data.items()}
    k = batch.schema.field("topk_ids").type.value_type.list_size
    ids = data["id"].to_pylist()
    input_ids = _split(data["input_ids"])
    positions = _split(data["positions"])
    topk_ids = _split(data["topk_ids"], k)
    topk_lp = _split(data["topk_logprobs"], k)
    target = _split(data["target_logprob"])
    tail = _split(data["tail_mass"])
    return [
        CachedExample(ids[i], input_ids[i], positions[i], Targets(topk_ids[i], topk_lp[i].astype(np.float32), target[i], tail[i]))
        for i in range(len(ids))
    ]


def _list_array(values: list[np.ndarray], dtype: Any) -> pa.Array:
    offsets = np.concatenate([[0], np.cumsum([len(v) for v in values])]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(values).astype(dtype)))


def _split(column: pa.ListArray, width: int | None = None) -> list[np.ndarray]:
    """A list column -> one numpy array per row ([n] or [n, width])."""
    offsets = column.offsets.to_numpy()
    values = column.values
    if width:
        values = values.values.slice(values.offset * width, len(values) * width)
    flat = np.array(values.to_numpy(zero_copy_only=False))  # writable, owned by the caller
    base = offsets[0]
    rows = []
    for start, end in zip(offsets[:-1] - base, offsets[1:] - base):
        row = flat[start * (width or 1) : end * (width or 1)]
        rows.append(row.reshape(-1, width) if width else row)
    return rows


ENCODINGS = {"plain": (encode_plain, decode_plain)}


def read_manifest(folder: str | Path | Store) -> dict[str, Any]:
    """The manifest of a cache folder (a path or a URL), checked for format and version."""
    store = as_store(folder)
    path = store.display(MANIFEST)
    try:
        text = store.read_bytes(MANIFEST) if store.is_file(MANIFEST) else None
    except FileNotFoundError:
        text = None
    if text is None:
        raise KdpipeError(f"{folder} is not a kdpipe cache: {MANIFEST} is missing")
    try:
        manifest = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KdpipeError(f"{path} is damaged (not valid JSON: {e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise KdpipeError(f"{path} is not a kdpipe cache manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise KdpipeError(
            f"{path} has cache format version {version}, newer than this kdpipe understands ({FORMAT_VERSION}); "
            "upgrade kdpipe to read it"
        )
    return manifest


def write_manifest(folder: str | Path | Store, manifest: dict[str, Any]) -> None:
    """Write the manifest whole (atomic locally and on object storage): a reader never sees half of one."""
    as_store(folder).write_bytes(MANIFEST, (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode())
