"""Statistics of a kdpipe cache with DuckDB alone (kdpipe is not imported): the shards are plain Parquet.

    python examples/cache_stats_duckdb.py cache/imdb            # a local folder
    python examples/cache_stats_duckdb.py s3://bucket/imdb      # object storage: DuckDB's httpfs extension
                                                                # (installed on first use), AWS_* credentials
    python examples/cache_stats_duckdb.py cache/imdb --json

It reads the shard list from manifest.json (only complete shards are listed there), then one SQL
query per table: rows and tokens per shard, and per distilled position the teacher's cross-entropy
on the data, how often its top-1 is the actual next token, how often the actual token is in the
top-k, and the tail mass. Positions are 0-based in the format and DuckDB lists are 1-based, so the
actual next token of position t is ``input_ids[t + 2]`` in SQL.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import duckdb

PER_SHARD = """
SELECT parse_filename(filename) AS shard, count(*) AS rows, sum(len(input_ids)) AS tokens,
       sum(len(positions)) AS target_tokens
FROM read_parquet($files, filename = true) GROUP BY shard ORDER BY shard
"""

PER_POSITION = """
WITH pos AS (
  SELECT input_ids, unnest(positions) AS t, unnest(topk_ids) AS ids, unnest(topk_logprobs) AS lps,
         unnest(target_logprob) AS target, unnest(tail_mass) AS tail
  FROM read_parquet($files))
SELECT count(*) AS positions,
       avg(-target) AS teacher_nll,
       avg(exp(lps[1])) AS mean_top1_prob,
       avg(CASE WHEN ids[1] = input_ids[t + 2] THEN 1.0 ELSE 0.0 END) AS top1_is_label,
       avg(CASE WHEN list_contains(ids, input_ids[t + 2]) THEN 1.0 ELSE 0.0 END) AS label_in_topk,
       avg(tail) AS mean_tail_mass,
       quantile_cont(tail, 0.99) AS p99_tail_mass
FROM pos
"""


def connect(cache: str) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    if "://" in cache and not cache.startswith("file://"):
        con.execute("INSTALL httpfs; LOAD httpfs; CREATE SECRET (TYPE s3, PROVIDER credential_chain)")
    return con


def cache_stats(cache: str) -> dict[str, Any]:
    """What the cache holds, computed by DuckDB from the shards its manifest lists."""
    con = connect(cache)
    cache = cache.rstrip("/")
    manifest = json.loads(con.execute("SELECT content FROM read_text($f)", {"f": f"{cache}/manifest.json"}).fetchone()[0])
    files = [f"{cache}/{s['file']}" for s in sorted(manifest["shards"], key=lambda s: s["index"])]
    shards = con.execute(PER_SHARD, {"files": files}).fetchall()
    row = con.execute(PER_POSITION, {"files": files})
    positions = dict(zip([d[0] for d in row.description], row.fetchone()))
    return {
        "teacher": manifest["teacher"]["model"],
        "k": manifest["sparse"]["k"],
        "complete": manifest["complete"],
        "shards": [dict(zip(("shard", "rows", "tokens", "target_tokens"), s)) for s in shards],
        **positions,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache", help="cache folder or s3:// URL")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args()
    stats = cache_stats(args.cache)
    if args.json:
        print(json.dumps(stats, indent=2))
        return
    for s in stats.pop("shards"):
        print(f"{s['shard']}: {s['rows']} rows, {s['tokens']} tokens, {s['target_tokens']} target tokens")
    for key, value in stats.items():
        print(f"{key:<16} {value:.4f}" if isinstance(value, float) else f"{key:<16} {value}")


if __name__ == "__main__":
    main()
