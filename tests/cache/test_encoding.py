"""Cache encodings: compact round-trips (ids exact, log-probs within the documented bound), plain still loads."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import kdpipe
from hypothesis import given, settings
from hypothesis import strategies as st
from test_properties import cache_rows

from kdpipe.cache import open_cache
from kdpipe.cache.format import CODE_STEP, ENCODINGS, Targets, logprob_codes, logprobs_from_codes
from kdpipe.cache.writer import shard_bytes


def random_targets(rng: np.random.Generator, positions: int, k: int, vocab: int) -> Targets:
    """Sorted top-k log-probs spanning the codes' whole range (and beyond it), distinct ids."""
    lp = -np.sort(rng.exponential(4.0, (positions, k)), axis=1).astype(np.float32)
    ids = np.array([rng.choice(vocab, k, replace=False) for _ in range(positions)], np.int32).reshape(positions, k)
    return Targets(ids, lp, -rng.exponential(3.0, positions).astype(np.float32), rng.random(positions).astype(np.float32) ** 4)


def roundtrip(encoding: str, rows: list, k: int, vocab: int) -> tuple[pa.Table, list]:
    table = ENCODINGS[encoding].encode(rows, k, {"encoding": encoding, "vocab_size": vocab})
    stored = pq.read_table(pa.BufferReader(shard_bytes(table)))
    return stored, ENCODINGS[encoding].decode(stored)


@pytest.mark.parametrize("bits", [8, 16])
def test_logprob_codes_error_bound(bits):
    rng = np.random.default_rng(bits)
    lp = -np.sort(rng.exponential(6.0, (2000, 32)), axis=1)
    lp[:5, 0] = 0.0
    decoded = logprobs_from_codes(logprob_codes(lp.astype(np.float32), bits)).astype(np.float64)
    step, top = CODE_STEP[bits], (1 << bits) - 1
    inside = -lp < (top - 0.5) * step
    assert inside.mean() > 0.5 and (~inside).any(), "cover both sides of the range"
    # documented bound: |error| <= step / 2 (+ float32 rounding) inside the range ...
    assert np.abs(decoded - lp)[inside].max() <= step / 2 + 1e-5 * np.abs(lp[inside]).max()
    # ... and below it the value saturates at -(2^bits - 1) * step, above the true one
    np.testing.assert_allclose(decoded[~inside], -top * step, rtol=1e-6)
    assert np.all(np.diff(decoded, axis=1) <= 0), "decoded top-k stays sorted"


@pytest.mark.parametrize("encoding", ["plain", "compact", "compact16"])
@pytest.mark.parametrize("vocab", [5000, 151936])
def test_encode_decode_roundtrip(encoding, vocab):
    rng = np.random.default_rng(vocab)
    k = 16
    rows = [(f"ex-{i}", rng.integers(0, vocab, 30).astype(np.int32), np.sort(rng.choice(29, n, replace=False)).astype(np.int32),
             random_targets(rng, n, k, vocab)) for i, n in enumerate([5, 0, 17, 1, 29])]
    stored, decoded = roundtrip(encoding, rows, k, vocab)
    if encoding != "plain":
        assert stored.schema.field("topk_ids").type.value_type.value_type == (pa.uint16() if vocab <= 65536 else pa.uint32())
    for (rid, input_ids, positions, t), e in zip(rows, decoded):
        assert e.id == rid
        np.testing.assert_array_equal(e.input_ids, input_ids)
        np.testing.assert_array_equal(e.positions, positions)
        np.testing.assert_array_equal(e.targets.topk_ids, t.topk_ids)
        assert e.targets.topk_logprobs.shape == (len(positions), k) and e.targets.topk_logprobs.dtype == np.float32
        if encoding == "plain":  # float16: relative error <= 2^-11
            np.testing.assert_allclose(e.targets.topk_logprobs, t.topk_logprobs, rtol=2**-11, atol=0)
        else:
            bits = 8 if encoding == "compact" else 16
            step, top = CODE_STEP[bits], (1 << bits) - 1
            inside = -t.topk_logprobs < (top - 0.5) * step
            err = np.abs(e.targets.topk_logprobs - t.topk_logprobs)
            assert np.all(err[inside] <= step / 2 + 1e-5)
            assert np.all(e.targets.topk_logprobs[~inside] == np.float32(-top * step))
        real_rtol = 2**-11 if encoding != "plain" else 0  # compact stores target log-prob and tail in float16
        np.testing.assert_allclose(e.targets.target_logprob, t.target_logprob, rtol=real_rtol)
        np.testing.assert_allclose(e.targets.tail_mass, t.tail_mass, rtol=real_rtol, atol=2**-25 if real_rtol else 0)


def test_compact_is_smaller_than_plain():
    rng = np.random.default_rng(0)
    rows = [(f"ex-{i}", rng.integers(0, 151936, 200).astype(np.int32), np.arange(199, dtype=np.int32),
             random_targets(rng, 199, 32, 151936)) for i in range(20)]
    sizes = {}
    for encoding in ENCODINGS:
        table = ENCODINGS[encoding].encode(rows, 32, {"encoding": encoding, "vocab_size": 151936})
        sizes[encoding] = len(shard_bytes(table))
    assert sizes["compact"] < sizes["compact16"] < sizes["plain"]


@pytest.fixture(scope="module")
def caches(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("enc")
    for encoding in ("plain", "compact"):
        kdpipe("cache-teacher", "--model", tiny_model_dir, "--dataset", "kdpipe:arithmetic", "--limit", 24, "--top-k", 8,
               "--dtype", "fp32", "--encoding", encoding, "--rows-per-shard", 10, "--cache", root / encoding)
    return root


def test_compact_cache_matches_plain_cache(caches):
    plain, compact = (list(open_cache(caches / name).iter_examples()) for name in ("plain", "compact"))
    assert len(plain) == len(compact) == 24
    step = CODE_STEP[8]
    for p, c in zip(plain, compact):
        np.testing.assert_array_equal(c.targets.topk_ids, p.targets.topk_ids)
        np.testing.assert_array_equal(c.input_ids, p.input_ids)
        # plain's float16 rounding plus the 8-bit code's half step
        assert np.abs(c.targets.topk_logprobs - p.targets.topk_logprobs).max() <= step / 2 + 2**-11 * 16
    meta = json.loads(pq.read_schema(caches / "compact" / "shard-00000.parquet").metadata[b"kdpipe"])
    assert meta["encoding"] == "compact" and meta["vocab_size"] == 512


def test_cache_info_and_verify_name_the_encoding(caches):
    out = kdpipe("cache", "info", caches / "compact", "--json").output
    info = json.loads(out)
    assert info["encoding"] == "compact" and info["sparse_mode"] == "topk" and info["k"] == 8
    assert info["bytes_per_target_token"] == round(info["bytes"] / info["target_tokens"], 2)
    assert "ok" in kdpipe("cache", "verify", caches / "compact").output


def test_verify_catches_a_bad_id_in_a_compact_cache(caches):
    from kdpipe.cache.checks import check_values
    from kdpipe.cache.manifest import read_manifest

    table = pq.ParquetFile(caches / "compact" / "shard-00000.parquet").read()  # with the id rank table
    assert check_values(table, read_manifest(caches / "compact")) == []
    ids = table["topk_ids"].combine_chunks()
    assert ids.type.value_type.value_type == pa.uint16()
    vals = ids.values.values.to_numpy().copy()
    vals[3] = 600  # the tiny teacher has 512 ids
    bad_ids = pa.ListArray.from_arrays(ids.offsets, pa.FixedSizeListArray.from_arrays(pa.array(vals), 8))
    bad = table.set_column(table.schema.get_field_index("topk_ids"), table.schema.field("topk_ids"), bad_ids)
    problems = check_values(bad, read_manifest(caches / "compact"))
    assert problems and "outside the teacher's vocabulary" in problems[0]


@settings(max_examples=40, deadline=None)
@given(cache_rows(), st.sampled_from(["compact", "compact16"]))
def test_compact_round_trip_property(data, encoding):
    """Any rows (any ids, log-probs down to -60, P = 0 included): ids exact, log-probs within the bound."""
    k, rows = data
    vocab = max([int(r[3].topk_ids.max(initial=0)) for r in rows] + [int(r[1].max()) for r in rows]) + 1
    _, decoded = roundtrip(encoding, rows, k, vocab)
    step, top = CODE_STEP[8 if encoding == "compact" else 16], (1 << (8 if encoding == "compact" else 16)) - 1
    for e, (rid, input_ids, positions, t) in zip(decoded, rows):
        assert e.id == rid
        np.testing.assert_array_equal(e.input_ids, input_ids)
        np.testing.assert_array_equal(e.positions, positions)
        np.testing.assert_array_equal(e.targets.topk_ids, t.topk_ids)
        true = t.topk_logprobs.astype(np.float64)
        inside = -true < (top - 0.5) * step
        assert np.all(np.abs(e.targets.topk_logprobs - true)[inside] <= step / 2 + 1e-6)
        assert np.all(e.targets.topk_logprobs[~inside] == np.float32(-top * step))


# ---------------------------------------------------------------- rank-coded ids (kdpipe.cache.ids)


def rank_roundtrip(encoding: str, rows: list, k: int, vocab: int | None) -> tuple[pa.Table, list]:
    """Encode with rank-coded ids (as cache-teacher does), write, read back with the file metadata, decode."""
    meta = {"encoding": encoding, "vocab_size": vocab, "id_coding": "rank"}
    stored = pq.ParquetFile(pa.BufferReader(shard_bytes(ENCODINGS[encoding].encode(rows, k, meta)))).read()
    return stored, ENCODINGS[encoding].decode(stored)


@pytest.mark.parametrize("encoding", ["compact", "compact16"])
@pytest.mark.parametrize("tokenizer_size,head_size", [(5000, 5000), (151646, 151936), (65536, 65536)])
def test_rank_coded_ids_are_exact(encoding, tokenizer_size, head_size):
    """Ids decode exactly: the largest id, id 0 and a padded vocabulary (ids >= the tokenizer's size, up to the
    model's head size, which the teacher can rank in its top-k)."""
    rng = np.random.default_rng(head_size)
    k = 16
    rows = [(f"ex-{i}", rng.integers(0, tokenizer_size, 30).astype(np.int32),
             np.sort(rng.choice(29, n, replace=False)).astype(np.int32), random_targets(rng, n, k, head_size))
            for i, n in enumerate([5, 0, 17, 1, 29])]
    rows[0][3].topk_ids[0, :3] = [head_size - 1, 0, tokenizer_size]  # largest id, smallest, first padded id
    rows[0][3].topk_ids[1, 0] = head_size - 1
    rows[2][3].topk_ids[:, 0] = 7  # a frequent id: rank 0
    stored, decoded = rank_roundtrip(encoding, rows, k, head_size)
    meta = json.loads(stored.schema.metadata[b"kdpipe"])
    assert meta["id_coding"] == "rank" and b"kdpipe_id_ranks" in stored.schema.metadata
    ranks = stored["topk_ids"].combine_chunks().values.values.to_numpy()
    assert ranks.max() < head_size and stored.schema.field("topk_ids").type.value_type.value_type == (
        pa.uint16() if head_size <= 65536 else pa.uint32())
    for (_, _, _, t), e in zip(rows, decoded):
        np.testing.assert_array_equal(e.targets.topk_ids, t.topk_ids)
        assert e.targets.topk_ids.dtype == np.int32
    assert decoded[0].targets.topk_ids[0, 0] == head_size - 1
    # each row group decodes by itself (the rank table is in the file's metadata, not in a row)
    f = pq.ParquetFile(pa.BufferReader(shard_bytes(ENCODINGS[encoding].encode(
        rows * 60, k, {"encoding": encoding, "vocab_size": head_size, "id_coding": "rank"}))))
    assert f.metadata.num_row_groups == 2
    last = ENCODINGS[encoding].decode(f.read_row_group(1))
    np.testing.assert_array_equal(last[-1].targets.topk_ids, rows[-1][3].topk_ids)


def test_rank_coding_orders_ids_by_frequency_class():
    from kdpipe.cache.ids import RankTable

    ids = np.array([9] * 8 + [3] * 4 + [5] * 4 + [100] * 1 + [2] * 1)
    table = RankTable.of(ids, 200)
    # class floor(log2 count): 9 (3), then 3 and 5 (2, by id), then 2 and 100 (0, by id), then the rest by id
    assert table.order[:7].tolist() == [9, 3, 5, 2, 100, 0, 1]
    back = RankTable.from_metadata(table.to_metadata())
    np.testing.assert_array_equal(back.order, table.order)
    assert RankTable.of(np.array([2**31 - 1]), None) is None  # beyond any vocabulary: raw ids


def test_rank_coded_shard_read_without_its_file_metadata_is_refused():
    """pq.read_table drops Parquet file metadata: decoding must say so, not return wrong ids."""
    from kdpipe.errors import KdpipeError

    rng = np.random.default_rng(1)
    rows = [("a", rng.integers(0, 999, 9).astype(np.int32), np.arange(8, dtype=np.int32),
             random_targets(rng, 8, 4, 1000))]
    data = shard_bytes(ENCODINGS["compact"].encode(rows, 4, {"encoding": "compact", "vocab_size": 1000,
                                                             "id_coding": "rank"}))
    with pytest.raises(KdpipeError, match="rank table"):
        ENCODINGS["compact"].decode(pq.read_table(pa.BufferReader(data)))


def test_rank_coded_sampled_ids_are_exact():
    rng = np.random.default_rng(2)
    vocab, n = 151936, 6
    rows = []
    for i, p in enumerate([4, 0, 9]):
        ids = np.zeros((p, n), np.int32)
        counts = np.zeros((p, n), np.uint8)
        for j in range(p):
            m = int(rng.integers(1, n + 1))
            ids[j, :m] = rng.choice(vocab, m, replace=False)
            c = np.sort(rng.multinomial(n - m, np.ones(m) / m) + 1)[::-1]
            counts[j, :m] = c
        lp = np.where(counts > 0, np.log(np.maximum(counts, 1) / n), -np.inf).astype(np.float32)
        if p:
            ids[0, 0] = vocab - 1
        rows.append((f"s{i}", rng.integers(0, vocab, p + 1).astype(np.int32), np.arange(p, dtype=np.int32),
                     Targets(ids, lp, np.zeros(p, np.float32), np.zeros(p, np.float32), counts)))
    meta = {"encoding": "compact", "vocab_size": vocab, "id_coding": "rank", "sparse_mode": "sampled",
            "samples": n}
    stored = pq.ParquetFile(pa.BufferReader(shard_bytes(ENCODINGS["compact"].encode(rows, n, meta)))).read()
    for (_, _, _, t), e in zip(rows, ENCODINGS["compact"].decode(stored)):
        np.testing.assert_array_equal(e.targets.topk_ids, t.topk_ids)
        np.testing.assert_array_equal(e.targets.sample_counts, t.sample_counts)


def test_compact_cache_is_rank_coded_and_a_raw_one_still_loads(caches, tmp_path):
    """cache-teacher writes rank-coded compact shards; a shard with raw ids (every compact cache written
    before rank coding: no id_coding in its metadata) loads and verifies as before."""
    import shutil

    from kdpipe.cache.manifest import read_manifest, write_manifest
    from kdpipe.cache.writer import shard_entry

    shard = caches / "compact" / "shard-00000.parquet"
    stored = pq.ParquetFile(shard).read()
    assert json.loads(stored.schema.metadata[b"kdpipe"])["id_coding"] == "rank"
    new = list(open_cache(caches / "compact").iter_examples())
    old = tmp_path / "old"
    shutil.copytree(caches / "compact", old)
    m = read_manifest(old)
    for s in m["shards"]:
        table = pq.ParquetFile(old / s["file"]).read()
        meta = json.loads(table.schema.metadata[b"kdpipe"])
        meta.pop("id_coding")
        rows = [(e.id, e.input_ids, e.positions, e.targets) for e in ENCODINGS["compact"].decode(table)]
        raw = ENCODINGS["compact"].encode(rows, 8, meta)  # no id_coding: raw ids, the old layout
        data = shard_bytes(raw)
        assert b"kdpipe_id_ranks" not in pq.ParquetFile(pa.BufferReader(data)).metadata.metadata
        (old / s["file"]).write_bytes(data)
        s.update({k: v for k, v in shard_entry(s["index"], raw, data).items() if k in ("bytes", "sha256")})
    m["totals"]["bytes"] = sum(s["bytes"] for s in m["shards"])
    write_manifest(old, m)
    assert "ok" in kdpipe("cache", "verify", old).output
    for a, b in zip(new, open_cache(old).iter_examples()):
        np.testing.assert_array_equal(a.targets.topk_ids, b.targets.topk_ids)
