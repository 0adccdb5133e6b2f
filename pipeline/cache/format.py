"""The on-disk cache format (spec: cache/README.md): column schema and encodings (manifest: manifest.py).

A cache folder holds ``manifest.json`` and ``shard-NNNNN.parquet`` files. An *encoding* turns the
teacher's per-position targets into Arrow columns and back; ``plain`` is the default and the one
other tools can rely on.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa

from kdpipe.cache import ids as ids_coding
from kdpipe.cache.sections import SparseMode

METADATA_KEY = b"kdpipe"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def ids_hash(ids: Sequence[str]) -> str:
    """sha256 of a shard's example ids in row order (a compact JSON array): what proves which shard it is."""
    text = json.dumps(list(ids), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Targets:
    """The teacher's sparse targets for one example's P distilled positions (decoded, numpy).

    Top-k mode: the k most likely ids, most likely first, their log-probs and the tail mass.
    Sampled mode: the distinct sampled ids (most often drawn first, padded to N with id 0),
    ``topk_logprobs`` = log of the unbiased estimate p̂(v) = counts/N · p(v)/q(v) (-inf at padding),
    ``sample_counts`` (0 at padding) and a tail mass of 0.
    """

    topk_ids: np.ndarray  # int32 [P, k], most likely first (sampled: [P, N], most often drawn first)
    topk_logprobs: np.ndarray  # float32 [P, k], raw log-softmax at T=1 (sampled: log p̂)
    target_logprob: np.ndarray  # float32 [P], log-prob of the actual next token
    tail_mass: np.ndarray  # float32 [P], probability outside the top-k (sampled: 0)
    sample_counts: np.ndarray | None = None  # uint8 [P, N], sampled mode only


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


Rows = Sequence[tuple[str, np.ndarray, np.ndarray, Targets]]


def encode_plain(rows: Rows, k: int, metadata: dict[str, Any]) -> pa.Table:
    """Rows of (id, input_ids, positions, targets) -> an Arrow table in the plain encoding."""
    return _encode(rows, k, metadata, None)


def encode_compact(rows: Rows, k: int, metadata: dict[str, Any]) -> pa.Table:
    """The compact encoding: narrow ids, 8-bit quantized log-probs (see cache/README.md)."""
    return _encode(rows, k, metadata, 8)


def encode_compact16(rows: Rows, k: int, metadata: dict[str, Any]) -> pa.Table:
    """The compact encoding with 16-bit log-prob codes."""
    return _encode(rows, k, metadata, 16)


def _encode(rows: Rows, k: int, metadata: dict[str, Any], bits: int | None) -> pa.Table:
    compact = bits is not None
    id_type = id_dtype(metadata.get("vocab_size")) if compact else np.int32
    real = np.float16 if compact else np.float32
    offsets = _offsets([len(pos) for _, _, pos, _ in rows])
    targets = [r[3] for r in rows]
    targets, metadata, ranks = rank_coded(targets, metadata, compact)  # hook: kdpipe.cache.ids
    columns: dict[str, pa.Array] = {
        "id": pa.array([r[0] for r in rows], pa.string()),
        "input_ids": _list_array([r[1] for r in rows], id_type),
        "positions": _list_array([r[2] for r in rows], np.int32),
    }
    if targets and targets[0].sample_counts is not None or metadata.get("sparse_mode") == SparseMode.SAMPLED:
        ids, cnt, ratio = [], [], []
        for t in targets:
            valid = t.sample_counts > 0
            c = t.sample_counts[valid]
            ids.append(t.topk_ids[valid])
            cnt.append(c)
            n = t.sample_counts.sum(-1, keepdims=True).astype(np.float64)
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio.append(
                    (t.topk_logprobs.astype(np.float64) - np.log(t.sample_counts / np.maximum(n, 1)))[valid]
                )
        per_pos = [t.sample_counts.astype(bool).sum(-1) for t in targets]
        inner = _offsets(np.concatenate(per_pos) if per_pos else [])

        def nested(values: list[np.ndarray], dtype: Any) -> pa.Array:
            flat = (
                pa.array(np.concatenate(values).astype(dtype))
                if values
                else pa.array([], pa.from_numpy_dtype(dtype))
            )
            return pa.ListArray.from_arrays(
                pa.array(offsets), pa.ListArray.from_arrays(pa.array(inner), flat)
            )

        columns["sample_ids"] = nested(ids, id_type)
        columns["sample_counts"] = nested(cnt, np.uint8)
        if float(metadata.get("proposal_temperature", 1.0)) != 1.0:
            columns["sample_log_ratio"] = nested(ratio, real)
    else:
        columns["topk_ids"] = _per_position(offsets, [t.topk_ids for t in targets], id_type, k)
        if compact:
            codes = [logprob_codes(t.topk_logprobs, bits) for t in targets]
            columns["topk_logprob_codes"] = _per_position(
                offsets, codes, codes[0].dtype if codes else np.uint8, k
            )
        else:
            columns["topk_logprobs"] = _per_position(
                offsets, [t.topk_logprobs for t in targets], np.float16, k
            )
    columns["target_logprob"] = _per_position(offsets, [t.target_logprob for t in targets], real)
    if "topk_ids" in columns:
        columns["tail_mass"] = _per_position(offsets, [t.tail_mass for t in targets], real)
    meta = {METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()} if metadata else None
    if ranks is not None:
        meta[ids_coding.TABLE_KEY] = ranks.to_metadata()
    fields = [pa.field(name, col.type, nullable=False) for name, col in columns.items()]
    return pa.Table.from_arrays(list(columns.values()), schema=pa.schema(fields, metadata=meta))


def decode(batch: pa.RecordBatch | pa.Table) -> list[CachedExample]:
    """An Arrow batch in any encoding -> decoded examples (the columns say which encoding and mode)."""
    data = {name: batch.column(name) for name in batch.schema.names}
    if isinstance(batch, pa.Table):
        data = {name: col.combine_chunks() for name, col in data.items()}
    ids = data["id"].to_pylist()
    input_ids = [a.astype(np.int32) for a in _split(data["input_ids"])]
    positions = _split(data["positions"])
    target = [a.astype(np.float32) for a in _split(data["target_logprob"])]
    ranks = ids_coding.table_for(batch.schema.metadata)  # None: raw ids (every cache before rank coding)
    if "sample_ids" in data:
        meta = json.loads((batch.schema.metadata or {}).get(METADATA_KEY, b"{}"))
        targets = _decode_sampled(data, target, meta.get("samples"), ranks)
    else:
        k = batch.schema.field("topk_ids").type.value_type.list_size
        topk_ids = [
            a.astype(np.int32) if ranks is None else ranks.decode(a) for a in _split(data["topk_ids"], k)
        ]
        if "topk_logprob_codes" in data:
            topk_lp = [logprobs_from_codes(c) for c in _split(data["topk_logprob_codes"], k)]
        else:
            topk_lp = [a.astype(np.float32) for a in _split(data["topk_logprobs"], k)]
        tail = [a.astype(np.float32) for a in _split(data["tail_mass"])]
        targets = [Targets(topk_ids[i], topk_lp[i], target[i], tail[i]) for i in range(len(ids))]
    return [CachedExample(ids[i], input_ids[i], positions[i], targets[i]) for i in range(len(ids))]


def _decode_sampled(
    data: dict[str, pa.Array], target: list[np.ndarray], samples: int | None, ranks: Any = None
) -> list[Targets]:
    """Distinct ids and counts per position -> padded [P, N] ids, log p̂ and counts.

    N is the shard metadata's `samples`, else the counts' sum (a row without positions then gets width 1).
    """
    sample_ids, counts = data["sample_ids"], data["sample_counts"]
    ratio = data.get("sample_log_ratio")
    row_off = sample_ids.offsets.to_numpy()
    inner = sample_ids.values
    pos_off = inner.offsets.to_numpy()
    flat_ids = np.asarray(inner.values.to_numpy(zero_copy_only=False), np.int64)
    flat_ids = flat_ids if ranks is None else ranks.decode(flat_ids)
    flat_cnt = np.asarray(counts.values.values.to_numpy(zero_copy_only=False), np.int64)
    flat_ratio = (
        None if ratio is None else np.asarray(ratio.values.values.to_numpy(zero_copy_only=False), np.float64)
    )
    base = pos_off[0]
    out = []
    for i in range(len(row_off) - 1):
        p0, p1 = row_off[i] - row_off[0], row_off[i + 1] - row_off[0]
        starts, ends = pos_off[p0:p1] - base, pos_off[p0 + 1 : p1 + 1] - base
        sizes = ends - starts
        n = int(samples) if samples else int(flat_cnt[starts[0] : ends[0]].sum()) if len(starts) else 1
        width = max(n, int(sizes.max()) if len(sizes) else 1)
        rows_ = np.repeat(np.arange(len(sizes)), sizes)
        cols = np.arange(sizes.sum()) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        sl = slice(starts[0] if len(starts) else 0, ends[-1] if len(ends) else 0)
        ids = np.zeros((len(sizes), width), np.int32)
        cnt = np.zeros((len(sizes), width), np.uint8)
        lp = np.full((len(sizes), width), -np.inf, np.float32)
        ids[rows_, cols] = flat_ids[sl]
        cnt[rows_, cols] = flat_cnt[sl]
        est = np.log(flat_cnt[sl] / max(n, 1)) + (0.0 if flat_ratio is None else flat_ratio[sl])
        lp[rows_, cols] = est
        out.append(Targets(ids, lp, target[i], np.zeros(len(sizes), np.float32), cnt))
    return out


def rank_coded(
    targets: list[Targets], metadata: dict[str, Any], compact: bool
) -> tuple[list[Targets], dict, Any]:
    """A compact shard's targets with ids replaced by ranks (kdpipe.cache.ids) when its metadata asks for it;
    otherwise unchanged, without an ``id_coding`` in the metadata (raw ids)."""
    table = None
    if compact and ids_coding.wants_ranks(metadata) and targets:
        used = [
            t.topk_ids[t.sample_counts > 0] if t.sample_counts is not None else t.topk_ids for t in targets
        ]
        table = ids_coding.RankTable.of(np.concatenate([u.ravel() for u in used]), metadata.get("vocab_size"))
    if table is None:
        return targets, {k: v for k, v in metadata.items() if k != "id_coding"}, None
    coded = [
        Targets(table.encode(t.topk_ids), t.topk_logprobs, t.target_logprob, t.tail_mass, t.sample_counts)
        for t in targets
    ]
    return coded, metadata, table


# ---------------------------------------------------------------- compact log-prob codes

CODE_STEP = {8: 1.0 / 16, 16: 1.0 / 1024}  # nats per code unit


def logprob_codes(logprobs: np.ndarray, bits: int) -> np.ndarray:
    """Top-k log-probs [P, k] (most likely first) -> unsigned codes [P, k] of `bits` bits.

    Q_j = min(round(-lp_j / s), 2^bits - 1) is non-decreasing along j (the log-probs are sorted);
    stored are its first value and successive differences (small, mostly 0 or 1 for a flat tail:
    what zstd compresses well). Q never exceeds the maximum code, so the differences fit.
    """
    top = (1 << bits) - 1
    step = CODE_STEP[bits]
    with np.errstate(invalid="ignore"):
        q = np.minimum(np.rint(-logprobs.astype(np.float64) / step), top)
    q = np.nan_to_num(q, nan=top)
    q = np.maximum.accumulate(np.maximum(q, 0), axis=-1).astype(np.int64)
    codes = np.diff(q, axis=-1, prepend=0)
    return codes.astype(np.uint8 if bits == 8 else np.uint16)


def logprobs_from_codes(codes: np.ndarray) -> np.ndarray:
    """The inverse of `logprob_codes`: -s * cumsum(codes), float32 (error bound: cache/README.md)."""
    bits = codes.dtype.itemsize * 8
    return (-CODE_STEP[bits] * np.cumsum(codes.astype(np.int64), axis=-1)).astype(np.float32)


def id_dtype(vocab_size: int | None) -> Any:
    """The narrowest unsigned integer type that holds every id of the vocabulary."""
    return np.uint16 if vocab_size is not None and vocab_size <= 1 << 16 else np.uint32


# ---------------------------------------------------------------- Arrow helpers


def _per_position(
    offsets: np.ndarray, values: list[np.ndarray], dtype: Any, width: int | None = None
) -> pa.Array:
    """Per-position values of every row -> list<value> or list<fixed_size_list<value>[width]>."""
    flat = (
        pa.array(np.concatenate(values).reshape(-1).astype(dtype))
        if values
        else pa.array([], pa.from_numpy_dtype(dtype))
    )
    inner = pa.FixedSizeListArray.from_arrays(flat, width) if width else flat
    return pa.ListArray.from_arrays(pa.array(offsets), inner)


def _list_array(values: list[np.ndarray], dtype: Any) -> pa.Array:
    return _per_position(_offsets([len(v) for v in values]), values, dtype)


def _offsets(lengths: Sequence[int] | np.ndarray) -> np.ndarray:
    """Arrow list offsets (int32, starting at 0) of lists of these lengths."""
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int32)


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


def plain_parquet_options(schema: pa.Schema) -> dict[str, Any]:
    """pyarrow write options of the plain encoding: zstd level 3, dictionary pages as pyarrow chooses."""
    return {"compression": "zstd", "compression_level": PLAIN_ZSTD_LEVEL}


def compact_parquet_options(schema: pa.Schema) -> dict[str, Any]:
    """pyarrow write options of the compact encodings (chosen by measurement: bench/bench_encoding.py).

    Parquet stores uint8/uint16/uint32 as 32-bit integers: BYTE_STREAM_SPLIT puts each byte plane in
    its own stream, so the always-zero high bytes of narrow values cost zstd next to nothing.
    Positions (consecutive indices) are delta-encoded. No dictionaries (they did not pay off).
    """
    leaves = _leaves(schema)
    encodings = {
        leaf: "DELTA_BINARY_PACKED" if leaf.startswith("positions.") else "BYTE_STREAM_SPLIT"
        for leaf in leaves
        if not leaf.startswith("id")
    }
    return {
        "compression": "zstd",
        "compression_level": COMPACT_ZSTD_LEVEL,
        "use_dictionary": False,
        "column_encoding": encodings,
    }


PLAIN_ZSTD_LEVEL = 3
COMPACT_ZSTD_LEVEL = 9


def _leaves(schema: pa.Schema) -> list[str]:
    """Parquet leaf column paths (``topk_ids.list.element.list.element``) of an Arrow schema."""

    def walk(prefix: str, t: pa.DataType) -> list[str]:
        if pa.types.is_list(t) or pa.types.is_fixed_size_list(t) or pa.types.is_large_list(t):
            return walk(f"{prefix}.list.element", t.value_type)
        return [prefix]

    return [leaf for f in schema for leaf in walk(f.name, f.type)]


class Encoding(NamedTuple):
    """An encoding: rows -> Arrow table, Arrow batch -> decoded examples, pyarrow write options."""

    encode: Callable[[Rows, int, dict[str, Any]], pa.Table]
    decode: Callable[[pa.RecordBatch | pa.Table], list[CachedExample]]
    parquet_options: Callable[[pa.Schema], dict[str, Any]]


ENCODINGS = {
    "plain": Encoding(encode_plain, decode, plain_parquet_options),
    "compact": Encoding(encode_compact, decode, compact_parquet_options),
    "compact16": Encoding(encode_compact16, decode, compact_parquet_options),
}
