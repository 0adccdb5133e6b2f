"""Bytes per target token by part, for each encoding, on two teachers; id codings compared; decode speed.

    python bench/bench_bytes.py [--demo-teacher runs/demo/teacher] [--k 32]

Teachers (one run, side by side):
  synthetic  bench_encoding.py's teacher: a tiny Qwen3 over Qwen's 151,936-id vocabulary whose LM head
             has a Zipf log-prior over a random permutation of the ids (the worst case for id coding: the
             frequent ids are scattered over the whole id range); 400 kdpipe:arithmetic examples, every
             token distilled, one shard (as bench_encoding.py writes it).
  demo       the demo's trained teacher (`kdpipe run configs/demo.yaml --only finetune`, 300 ids), the
             2,700 training examples, shards of 1,000 rows (cache-teacher's default).
The teacher scores every example once; each encoding then encodes and writes the same targets as
cache-teacher does (kdpipe.cache.format + writer.shard_bytes). Parts, from the Parquet column chunks:
  ids        topk_ids (rank-coded in `compact`/`compact16` now; "raw ids" = as written before)
  lp codes   topk_logprob_codes (compact) or topk_logprobs (plain, float16)
  target+tail  target_logprob and tail_mass
  overhead   example ids, input ids, positions, Parquet footer and metadata (incl. the rank table)
Then the id column alone under other id codings, the decode throughput of each encoding (target tokens
per second through `Cache`-style row-group decoding, one core) and a student's consumption (a
synthetic-teacher-sized student, one AdamW step at batch 8, bench_encoding.Trainee) for comparison.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_encoding import Trainee, peaked_model  # noqa: E402

from kdpipe import tiny  # noqa: E402
from kdpipe.cache.format import ENCODINGS, compact_parquet_options  # noqa: E402
from kdpipe.cache.ids import RankTable  # noqa: E402
from kdpipe.cache.writer import ROW_GROUP_ROWS, shard_bytes  # noqa: E402
from kdpipe.data.sources import load_examples  # noqa: E402
from kdpipe.data.templates import get_template  # noqa: E402
from kdpipe.data.tokenize import tokenize_examples  # noqa: E402
from kdpipe.models import load_model, load_tokenizer  # noqa: E402
from kdpipe.stages import cache_teacher  # noqa: E402
from kdpipe.teacher.hf import HFTeacher, make_batches  # noqa: E402

ENCODED = [("plain", "plain", None), ("compact, raw ids (before)", "compact", None),
           ("compact (rank ids)", "compact", "rank"), ("compact16, raw ids (before)", "compact16", None),
           ("compact16 (rank ids)", "compact16", "rank")]
PARTS = {"topk_ids": "ids", "topk_logprob_codes": "lp codes", "topk_logprobs": "lp codes",
         "target_logprob": "target+tail", "tail_mass": "target+tail"}


def score(model, tokenizer, cfg, k: int) -> list[tuple]:
    """Every example of `cfg` scored once: rows (id, input_ids, positions, fp32 targets) as cache-teacher has them."""
    examples, _ = tokenize_examples(load_examples(cfg).examples, get_template(cfg.resolved_template()), tokenizer, cfg)
    teacher = HFTeacher(model, k, cfg.chunk_size)
    targets = [None] * len(examples)
    for batch in make_batches(examples, cfg.max_batch_tokens, cfg.batch_size):
        for i, t in zip(batch, teacher.score([examples[i] for i in batch])):
            targets[i] = t
    return [(e.id, e.input_ids, e.positions, t) for e, t in zip(examples, targets)]


def shards(rows: list[tuple], per_shard: int) -> list[list[tuple]]:
    return [rows[i : i + per_shard] for i in range(0, len(rows), per_shard)]


def by_part(data: bytes) -> dict[str, int]:
    md = pq.ParquetFile(pa.BufferReader(data)).metadata
    out = dict.fromkeys(["ids", "lp codes", "target+tail", "overhead"], 0)
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        for c in range(rg.num_columns):
            col = rg.column(c)
            part = PARTS.get(col.path_in_schema.split(".")[0], "overhead")
            out[part] += col.total_compressed_size
    out["overhead"] += len(data) - sum(out.values())
    return out


def encode_all(rows: list[tuple], per_shard: int, k: int, vocab: int) -> dict[str, dict]:
    """Each encoding's shards of `rows`: bytes per target token by part, write and decode seconds."""
    targets = sum(len(r[2]) for r in rows)
    out = {}
    for label, encoding, coding in ENCODED:
        meta = {"encoding": encoding, "k": k, "sparse_mode": "topk"}
        if encoding != "plain":
            meta["vocab_size"] = vocab
        if coding:
            meta["id_coding"] = coding
        parts, files, start = dict.fromkeys(["ids", "lp codes", "target+tail", "overhead"], 0), [], time.perf_counter()
        for part in shards(rows, per_shard):
            data = shard_bytes(ENCODINGS[encoding].encode(part, k, meta))
            files.append(data)
            for name, n in by_part(data).items():
                parts[name] += n
        write_s = time.perf_counter() - start
        start, decoded = time.perf_counter(), 0
        for data in files:  # as CacheDataset reads: a row group at a time
            f = pq.ParquetFile(pa.BufferReader(data))
            for g in range(f.metadata.num_row_groups):
                decoded += sum(len(e.positions) for e in ENCODINGS[encoding].decode(f.read_row_group(g)))
        assert decoded == targets
        out[label] = {**{p: n / targets for p, n in parts.items()}, "total": sum(parts.values()) / targets,
                      "write_s": write_s, "decode_tok_s": targets / (time.perf_counter() - start)}
    return out


def id_codings(rows: list[tuple], per_shard: int, k: int, vocab: int) -> dict[str, float]:
    """The topk_ids column alone (bytes per target token incl. any table) under other id codings."""
    dtype = np.uint16 if vocab <= 1 << 16 else np.uint32
    data_counts = np.bincount(np.concatenate([r[1] for r in rows]).astype(np.int64), minlength=vocab)
    data_rank = np.empty(vocab, np.int64)
    data_rank[np.lexsort((np.arange(vocab), -data_counts))] = np.arange(vocab)
    out: dict[str, float] = {}
    targets = sum(len(r[2]) for r in rows)

    def column(values: np.ndarray, offsets: np.ndarray, options=None) -> int:
        inner = pa.FixedSizeListArray.from_arrays(pa.array(values.ravel().astype(dtype)), k)
        table = pa.table({"topk_ids": pa.ListArray.from_arrays(pa.array(offsets), inner)})
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, row_group_size=ROW_GROUP_ROWS, **(options or compact_parquet_options(table.schema)))
        return sink.getvalue().size

    def add(name: str, n: int) -> None:
        out[name] = out.get(name, 0.0) + n / targets

    for part in shards(rows, per_shard):
        ids = np.concatenate([r[3].topk_ids for r in part]).astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum([len(r[2]) for r in part])]).astype(np.int32)
        add("raw ids (compact before)", column(ids, offsets))
        add("ranks by the dataset's own token frequency (no table)", column(data_rank[ids], offsets))
        counts = np.bincount(ids.ravel(), minlength=vocab)
        exact = np.lexsort((np.arange(vocab), -counts))
        rank = np.empty(vocab, np.int64)
        rank[exact] = np.arange(vocab)
        head = exact[: int((counts > 0).sum())].astype("<u4")
        perm_table = len(base64.b64encode(pa.compress(head.view(np.uint8).reshape(-1, 4).T.tobytes(), codec="zstd",
                                                      asbytes=True)))
        add("ranks by the shard's exact id frequency (+ permutation table)", column(rank[ids], offsets) + perm_table)
        table = RankTable.of(ids, vocab)
        add("ranks by frequency class, log2 (+ class table: kdpipe)", column(table.encode(ids), offsets)
            + len(table.to_metadata()))
        add("  the same, zstd 19", column(table.encode(ids), offsets, {**compact_parquet_options(pa.schema([])),
                                                                          "compression_level": 19})
            + len(table.to_metadata()))
        prev = np.vstack([np.full((1, k), -1), ids[:-1]])
        out.setdefault("_in_prev", 0.0)
        out["_in_prev"] += float((ids[:, :, None] == prev[:, None, :]).any(-1).sum()) / ids.size * len(ids) / targets
    return out


def student_tokens_per_s(cache_path: str, vocab: int, tok, root: Path, steps: int = 4) -> float:
    """Target tokens a student of the synthetic teacher's size consumes per second (median AdamW step)."""
    student = peaked_model(root / "student", tok, vocab, 1, 0.0, 1.0, 64, 2)
    trainee = Trainee(lambda: student, cache_path, 8, 1e-2, 0)
    for step in range(steps + 1):
        trainee.step(step)
    per_step = np.mean([len(trainee.data[int(i)].positions) for i in trainee.order[: 8 * steps]]) * 8
    return per_step / float(np.median(trainee.times[1:]))


def print_table(name: str, rows: dict[str, dict]) -> None:
    print(f"\n{name}\n{'encoding':<30}{'ids':>8}{'lp codes':>10}{'tgt+tail':>10}{'overhead':>10}{'total':>8}"
          f"{'write s':>9}{'decode tok/s':>14}")
    for label, r in rows.items():
        print(f"{label:<30}{r['ids']:>8.1f}{r['lp codes']:>10.1f}{r['target+tail']:>10.1f}{r['overhead']:>10.1f}"
              f"{r['total']:>8.1f}{r['write_s']:>9.2f}{r['decode_tok_s']:>14,.0f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--examples", type=int, default=400)
    p.add_argument("--demo-teacher", default="runs/demo/teacher")
    a = p.parse_args()
    torch.manual_seed(0)
    results, codings = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg = cache_teacher.CacheTeacherConfig(model=str(root / "teacher"), dataset="kdpipe:arithmetic", part="train",
                                               limit=a.examples, distill_prompt=True, dtype="fp32")
        texts = [f"{e.fields['instruction']} {e.fields['output']}" for e in load_examples(cfg).examples]
        tok = tiny.train_tokenizer(texts + ["Write as a sum of two positive numbers. Answer:"] * 10, 512)
        model = peaked_model(root / "teacher", tok, a.vocab, 0, 1.0, 6.0, 64, 2)
        start = time.perf_counter()
        rows = score(model, load_tokenizer(cfg.model), cfg, a.k)
        name = f"synthetic teacher ({a.vocab:,} ids, Zipf over a random id permutation), {len(rows)} examples, " \
               f"{sum(len(r[2]) for r in rows):,} target tokens, 1 shard, k={a.k}"
        print(f"[synthetic scored in {time.perf_counter() - start:.1f} s]", file=sys.stderr)
        results[name] = encode_all(rows, len(rows), a.k, a.vocab)
        codings[name] = id_codings(rows, len(rows), a.k, a.vocab)
        shard = root / "synthetic"  # a cache for the student's consumption
        shard.mkdir()
        meta = {"encoding": "compact", "k": a.k, "vocab_size": a.vocab, "id_coding": "rank", "sparse_mode": "topk"}
        (shard / "shard-00000.parquet").write_bytes(data := shard_bytes(ENCODINGS["compact"].encode(rows, a.k, meta)))
        (shard / "manifest.json").write_text(json.dumps(_manifest(rows, a.k, data)))
        consume = student_tokens_per_s(str(shard), a.vocab, tok, root)
        if Path(a.demo_teacher).exists():
            demo_cfg = cache_teacher.CacheTeacherConfig(model=a.demo_teacher, dataset="kdpipe:arithmetic",
                                                        split="train", dtype="fp32", batch_size=64)
            demo = load_model(a.demo_teacher, "fp32", "cpu")
            start = time.perf_counter()
            rows = score(demo, load_tokenizer(a.demo_teacher), demo_cfg, a.k)
            print(f"[demo scored in {time.perf_counter() - start:.1f} s]", file=sys.stderr)
            vocab = demo.config.vocab_size
            name = f"demo's trained teacher ({vocab} ids), {len(rows):,} examples, " \
                   f"{sum(len(r[2]) for r in rows):,} target tokens, shards of 1,000, k={a.k}"
            results[name] = encode_all(rows, 1000, a.k, vocab)
            codings[name] = id_codings(rows, 1000, a.k, vocab)
        else:
            print(f"(no demo teacher at {a.demo_teacher}: build it with `kdpipe run configs/demo.yaml --only "
                  "teacher_init` and `--only finetune`)")
    print(f"bytes per target token by part (k = {a.k})")
    for name, rows_ in results.items():
        print_table(name, rows_)
    print("\nthe id column alone under other id codings (bytes per target token, tables included):")
    for name, c in codings.items():
        print(f"  {name.split(',')[0]}")
        for label, v in c.items():
            if not label.startswith("_"):
                print(f"    {label:<66}{v:>7.1f}")
        print(f"    {'(ids also in the previous position top-k: what delta coding could use)':<66}"
              f"{c['_in_prev'] * 100:>6.1f}%")
    print(f"\na student of the synthetic teacher's size (2 x 64, 151,936-id head, batch 8, AdamW) consumes "
          f"{consume:,.0f} target tokens/s on this machine")


def _manifest(rows: list[tuple], k: int, data: bytes) -> dict:
    """A minimal manifest over one shard (what `Cache` reads; the bench does not verify it)."""
    import hashlib

    from kdpipe.cache.manifest import FORMAT, FORMAT_VERSION

    entry = {"file": "shard-00000.parquet", "index": 0, "rows": len(rows), "tokens": sum(len(r[1]) for r in rows),
             "target_tokens": sum(len(r[2]) for r in rows), "bytes": len(data),
             "sha256": hashlib.sha256(data).hexdigest()}
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "settings_hash": "bench", "complete": True,
            "encoding": "compact", "totals": {}, "sharding": {"total_shards": 1, "rows_per_shard": len(rows)},
            "shards": [entry], "teacher": {}, "tokenizer": {}, "template": {}, "dataset": {},
            "sparse": {"mode": "topk", "k": k}}


if __name__ == "__main__":
    main()
