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
    from kdpipe.cache.format import read_manifest
    from kdpipe.cache.tools import check_values

    table = pq.read_table(caches / "compact" / "shard-00000.parquet")
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
