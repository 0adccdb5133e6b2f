"""Stage one: the cached targets against a dense reference, resume, split + merge, the on-disk format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import dense_reference, kdpipe, write_jsonl

from kdpipe.cache import Targets, open_cache
from kdpipe.cache.manifest import read_manifest

K = 8


@pytest.fixture(scope="module")
def arith_cache(tmp_path_factory, tiny_model_dir) -> Path:
    folder = tmp_path_factory.mktemp("c") / "arith"
    kdpipe("cache-teacher", "--model", tiny_model_dir, "--dataset", "kdpipe:arithmetic", "--limit", 60,
           "--top-k", K, "--cache", folder, "--rows-per-shard", 25, "--batch-size", 7, "--dtype", "fp32")
    return folder


def test_cached_targets_equal_dense_log_softmax(arith_cache, tiny_model_dir):
    cache = open_cache(arith_cache)
    examples = list(cache.iter_examples())
    assert len(examples) == 60 and len({e.id for e in examples}) == 60
    outside = 0
    for e in examples[:12]:
        ref = dense_reference(tiny_model_dir, e.input_ids)[e.positions]  # [P, V]
        ref_values, ref_ids = torch.topk(ref, K, dim=-1)
        t = e.targets
        np.testing.assert_array_equal(t.topk_ids, ref_ids.numpy())
        np.testing.assert_allclose(t.topk_logprobs, ref_values.numpy().astype(np.float16), rtol=1e-3, atol=1e-3)
        labels = torch.as_tensor(e.labels, dtype=torch.long)
        np.testing.assert_allclose(t.target_logprob, ref.gather(1, labels[:, None]).squeeze(1).numpy(), atol=2e-5)
        tail = 1.0 - torch.exp(ref_values).sum(-1)
        np.testing.assert_allclose(t.tail_mass, tail.numpy(), atol=2e-6)
        outside += int((~(t.topk_ids == e.labels[:, None]).any(1)).sum())
    assert outside > 0, "the test must cover labels outside the top-k"


def test_cached_positions_are_the_completion(arith_cache, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    from kdpipe.data import arithmetic

    rows = {r["id"]: r for r in arithmetic.generate("train")}
    for e in list(open_cache(arith_cache).iter_examples())[:10]:
        assert tok.decode(e.labels) == " " + rows[e.id]["output"] + tok.eos_token
        assert tok.decode(e.input_ids[: e.positions[0] + 1]).endswith("Answer:")


def test_manifest_describes_the_cache(arith_cache, tiny_model_dir):
    m = read_manifest(arith_cache)
    assert m["complete"] and m["format_version"] == 1 and m["encoding"] == "plain"
    assert m["sparse"] == {"mode": "topk", "k": K}
    assert m["teacher"]["model"] == str(tiny_model_dir) and m["teacher"]["dtype"] == "float32"
    assert m["teacher"]["backend"] == "hf" and m["command"].startswith("kdpipe cache-teacher")
    assert [s["rows"] for s in m["shards"]] == [25, 25, 10]
    assert m["totals"]["rows"] == 60 and m["totals"]["bytes"] == sum(p.stat().st_size for p in arith_cache.glob("shard-*.parquet"))
    assert m["dataset"]["source"] == "kdpipe:arithmetic" and len(m["dataset"]["fingerprint"]) == 64
    assert len(m["tokenizer"]["vocab_hash"]) == 64
    assert m["totals"]["target_tokens"] == sum(len(e.positions) for e in open_cache(arith_cache).iter_examples())


def test_shards_are_plain_parquet(arith_cache):
    """Any Parquet reader can use a shard: the documented columns and types, the key facts in the metadata."""
    import pyarrow as pa

    table = pq.read_table(arith_cache / "shard-00000.parquet")
    schema = table.schema
    assert schema.field("id").type == pa.string()
    assert schema.field("input_ids").type == pa.list_(pa.int32())
    assert schema.field("positions").type == pa.list_(pa.int32())
    assert schema.field("topk_ids").type == pa.list_(pa.list_(pa.int32(), K))
    assert schema.field("topk_logprobs").type == pa.list_(pa.list_(pa.float16(), K))
    assert schema.field("target_logprob").type == pa.list_(pa.float32())
    assert schema.field("tail_mass").type == pa.list_(pa.float32())
    meta = json.loads(schema.metadata[b"kdpipe"])
    assert meta["k"] == K and meta["encoding"] == "plain" and meta["settings_hash"] == read_manifest(arith_cache)["settings_hash"]
    assert pq.ParquetFile(arith_cache / "shard-00000.parquet").metadata.row_group(0).column(0).compression == "ZSTD"
    frame = table.to_pandas()
    row = frame.iloc[0]
    assert len(row["topk_ids"]) == len(row["positions"]) == len(row["target_logprob"])


def test_resume_after_interruption_gives_identical_shards(tmp_path, tiny_model_dir, arith_cache, monkeypatch):
    from kdpipe.cache import writer

    args = ["cache-teacher", "--model", tiny_model_dir, "--dataset", "kdpipe:arithmetic", "--limit", 60, "--top-k", K,
            "--cache", tmp_path / "resumed", "--rows-per-shard", 25, "--batch-size", 7, "--dtype", "fp32"]
    real_write, calls = writer.write_shard, []

    def crash_on_second(folder, index, table):
        calls.append(index)
        if len(calls) == 2:
            raise RuntimeError("simulated crash")  # as if killed mid-run
        return real_write(folder, index, table)

    monkeypatch.setattr(writer, "write_shard", crash_on_second)
    with pytest.raises(RuntimeError, match="simulated crash"):
        kdpipe(*args)
    partial = read_manifest(tmp_path / "resumed")
    assert not partial["complete"] and [s["index"] for s in partial["shards"]] == [0]
    monkeypatch.setattr(writer, "write_shard", real_write)
    kdpipe(*args)
    done, reference = read_manifest(tmp_path / "resumed"), read_manifest(arith_cache)
    assert done["complete"]
    assert [s["sha256"] for s in done["shards"]] == [s["sha256"] for s in reference["shards"]]


def test_rerun_of_a_complete_cache_writes_nothing(arith_cache, tiny_model_dir):
    before = {p.name: p.stat().st_mtime_ns for p in arith_cache.glob("shard-*.parquet")}
    kdpipe("cache-teacher", "--model", tiny_model_dir, "--dataset", "kdpipe:arithmetic", "--limit", 60, "--top-k", K,
           "--cache", arith_cache, "--rows-per-shard", 25, "--batch-size", 7, "--dtype", "fp32")
    assert {p.name: p.stat().st_mtime_ns for p in arith_cache.glob("shard-*.parquet")} == before


def test_shard_split_and_merge_equals_one_run(tmp_path, tiny_model_dir, arith_cache):
    common = ["--model", tiny_model_dir, "--dataset", "kdpipe:arithmetic", "--limit", 60, "--top-k", K,
              "--rows-per-shard", 25, "--batch-size", 7, "--dtype", "fp32", "--num-shards", 2]
    for i in (0, 1):
        kdpipe("cache-teacher", *common, "--shard-index", i, "--cache", tmp_path / f"part{i}")
    assert [s["index"] for s in read_manifest(tmp_path / "part1")["shards"]] == [1]
    kdpipe("cache", "merge", tmp_path / "part0", tmp_path / "part1", "--output", tmp_path / "merged")
    merged, single = read_manifest(tmp_path / "merged"), read_manifest(arith_cache)
    assert merged["complete"] and merged["totals"] == single["totals"]
    assert [s["sha256"] for s in merged["shards"]] == [s["sha256"] for s in single["shards"]]
    assert kdpipe("cache", "verify", tmp_path / "merged").exit_code == 0
    # issue 29 item 11: a rerun of a finished merge is a no-op (exit 0, nothing rewritten), and a merge that
    # lost a shard file is completed by the same command
    files = sorted((tmp_path / "merged").iterdir())
    stamps = [f.stat().st_mtime_ns for f in files]
    again = kdpipe("cache", "merge", tmp_path / "part0", tmp_path / "part1", "--output", tmp_path / "merged")
    assert again.output.startswith("already merged (nothing to do) 2 part(s)"), again.output
    assert [f.stat().st_mtime_ns for f in sorted((tmp_path / "merged").iterdir())] == stamps
    (tmp_path / "merged" / merged["shards"][1]["file"]).unlink()
    assert kdpipe("cache", "merge", tmp_path / "part0", tmp_path / "part1", "--output",
                  tmp_path / "merged").output.startswith("merged 2 part(s)")
    assert kdpipe("cache", "verify", tmp_path / "merged").exit_code == 0


def test_merge_refuses_incomplete_or_foreign_parts(tmp_path, tiny_model_dir, arith_cache):
    common = ["--model", tiny_model_dir, "--dataset", "kdpipe:arithmetic", "--limit", 60, "--top-k", K,
              "--rows-per-shard", 25, "--dtype", "fp32", "--num-shards", 2, "--shard-index", 0]
    kdpipe("cache-teacher", *common, "--cache", tmp_path / "part0")
    result = kdpipe("cache", "merge", tmp_path / "part0", "--output", tmp_path / "m1", ok=False)
    assert result.exit_code != 0 and "lack shard(s) [1]" in result.output
    result = kdpipe("cache", "merge", tmp_path / "part0", arith_cache, "--output", tmp_path / "m2", ok=False)
    assert result.exit_code != 0 and "shard 0 is in both" in result.output
    # issue 29 item 11: the message names the setting that differs
    kdpipe("cache-teacher", *common[:7], K + 1, *common[8:], "--shard-index", 1, "--cache", tmp_path / "part1k")
    result = kdpipe("cache", "merge", tmp_path / "part0", tmp_path / "part1k", "--output", tmp_path / "m3", ok=False)
    assert result.exit_code != 0 and "is not a part of the same run as" in result.output
    assert "(different sparse: `kdpipe cache-teacher" in result.output, result.output


def test_scores_do_not_depend_on_batching(tmp_path, tiny_model_dir, arith_cache):
    kdpipe("cache-teacher", "--model", tiny_model_dir, "--dataset", "kdpipe:arithmetic", "--limit", 60, "--top-k", K,
           "--cache", tmp_path / "b1", "--rows-per-shard", 25, "--batch-size", 1, "--dtype", "fp32", "--chunk-size", 3)
    for a, b in zip(open_cache(tmp_path / "b1").iter_examples(), open_cache(arith_cache).iter_examples()):
        assert a.id == b.id
        np.testing.assert_array_equal(a.targets.topk_ids, b.targets.topk_ids)
        np.testing.assert_allclose(a.targets.target_logprob, b.targets.target_logprob, atol=1e-5)


def test_padded_teacher_vocabulary(tmp_path, padded_model_dir):
    """A teacher with more embedding rows than tokens (Qwen-style) caches ids in the model's range."""
    kdpipe("cache-teacher", "--model", padded_model_dir, "--dataset", "kdpipe:arithmetic", "--limit", 5, "--top-k", K,
           "--cache", tmp_path / "p", "--dtype", "fp32")
    m = read_manifest(tmp_path / "p")
    assert m["teacher"]["vocab_size"] == m["tokenizer"]["vocab_size"] + 64
    e = next(open_cache(tmp_path / "p").iter_examples())
    ref = dense_reference(padded_model_dir, e.input_ids)[e.positions]
    np.testing.assert_array_equal(e.targets.topk_ids, torch.topk(ref, K, dim=-1).indices.numpy())


def test_default_cache_folder_and_summary(workdir, tiny_model_dir):
    data = write_jsonl(workdir / "my-data.jsonl", [{"instruction": f"Say {i}", "output": f"{i} {i}"} for i in range(5)])
    result = kdpipe("cache-teacher", "--model", tiny_model_dir, "--dataset", data, "--top-k", 4)
    assert (workdir / "cache" / "my-data" / "manifest.json").is_file()
    assert "5 examples" in result.output and "bytes per target token" in result.output


def test_info_and_verify(arith_cache):
    out = kdpipe("cache", "info", arith_cache).output
    assert "plain" in out and "topk" in out and "bytes_per_target_token" in out
    summary = json.loads(kdpipe("cache", "info", arith_cache, "--json").output)
    assert summary["examples"] == 60 and summary["k"] == K
    assert "ok" in kdpipe("cache", "verify", arith_cache).output


def test_tail_mass_keeps_relative_precision_when_tiny():
    """Peaked distributions: the tail is ~1e-12, far below fp32's 1 - sum(top-k) resolution."""
    from kdpipe.teacher.hf import sparse_targets

    torch.manual_seed(0)
    logits = torch.randn(16, 1000) * 2
    logits[:, :4] += 40.0
    labels = torch.randint(0, 1000, (16,))
    ids, logprobs, target, tail = sparse_targets(logits.clone(), labels, 4)
    ref = torch.log_softmax(logits.double(), -1)
    ref_top, ref_ids = torch.topk(ref, 4, -1)
    ref_tail = torch.exp(ref.scatter(1, ref_ids, float("-inf"))).sum(-1)
    assert torch.equal(ids, ref_ids)
    assert (ref_tail < 1e-10).all()
    torch.testing.assert_close(tail.double(), ref_tail, rtol=1e-5, atol=0)
    torch.testing.assert_close(logprobs.double(), ref_top, rtol=0, atol=1e-5)
    torch.testing.assert_close(target.double(), ref.gather(1, labels[:, None]).squeeze(1), rtol=0, atol=1e-4)


def test_a_changed_data_file_is_named_as_the_reason_a_cache_is_refused(tmp_path, tiny_model_dir):
    """Issue 29 item 11: rerunning cache-teacher after the data file was edited refused with "different dataset"
    only; the message now says the file changed, with both checksums and the row counts."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": f"row {i} of the data"} for i in range(6)])
    args = ("cache-teacher", "--model", tiny_model_dir, "--dataset", data, "--template", "text", "--top-k", "4",
            "--cache", tmp_path / "c", "--device", "cpu")
    kdpipe(*args)
    with data.open("a") as f:
        f.write(json.dumps({"text": "one more row"}) + "\n")
    out = kdpipe(*args, ok=False)
    assert out.exit_code != 0
    assert f"the data file {data} changed since the cache was written (sha256 " in out.output, out.output
    assert "6 examples then, 7 now); use another --cache folder or --overwrite" in out.output, out.output


def test_a_teacher_that_does_not_say_the_completions_is_named(tmp_path, tiny_model_dir):
    """The real-teacher bench found a chat teacher giving its one-word labels a mean probability of 0.0016:
    distilling it teaches its answer format, not the labels. cache-teacher now says so, with the figure, which
    equals the mean of exp(target_logprob) read back from the cache (a random tiny teacher says almost
    nothing of the arithmetic answers). A teacher that does say them gets no note."""
    folder = tmp_path / "c"
    out = kdpipe("cache-teacher", "--model", tiny_model_dir, "--dataset", "kdpipe:arithmetic", "--limit", 12,
                 "--top-k", 4, "--cache", folder, "--dtype", "fp32").output
    probs = np.concatenate([np.exp(e.targets.target_logprob.astype(np.float64))
                            for e in open_cache(folder).iter_examples()])
    assert f"note: over the {len(probs):,} cached positions the teacher gives the actual next token a mean " \
           f"probability of {probs.mean():.4f} (under 0.1): it does not say these completions" in out, out

    from kdpipe.cache.values import TeacherConfidence

    confident = TeacherConfidence(sampled=False)
    confident.add([Targets(np.array([[0, 1]], np.int32), np.log(np.array([[0.6, 0.3]])).astype(np.float16),
                           np.log(np.array([0.6])), np.array([0.1]))])
    assert confident.notes() == []
    one_hot = TeacherConfidence(sampled=False)
    one_hot.add([Targets(np.array([[0, 1]], np.int32), np.log(np.array([[0.999, 0.0005]])).astype(np.float16),
                         np.log(np.array([0.999])), np.array([0.0005]))])
    assert one_hot.notes()[0].startswith("note: over the 1 cached positions the teacher is near one-hot")
    scoring = TeacherConfidence(sampled=False, heldout=True)  # a held-out cache is not trained from
    scoring.add([Targets(np.array([[0, 1]], np.int32), np.log(np.array([[0.999, 0.0005]])).astype(np.float16),
                         np.log(np.array([0.999])), np.array([0.0005]))])
    assert scoring.notes() == []
