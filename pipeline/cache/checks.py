"""The checks of a cache's pieces that `kdpipe cache verify`, merge and the check before use share: the
manifest's completeness and listing, one shard (present, this run's, its size, sha256, Parquet, rows and
example ids) and the decoded values' sanity."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np

from kdpipe.cache.format import ENCODINGS, METADATA_KEY, ids_hash, shard_name
from kdpipe.cache.manifest import MANIFEST, Manifest, as_manifest
from kdpipe.cache.sections import ShardEntry, Totals
from kdpipe.cache.storage import Store
from kdpipe.cache.values import nonfinite
from kdpipe.errors import first_line


def incomplete(store: Store, m: Manifest) -> list[str]:
    """A problem when the manifest says shards of its part are still to be written."""
    if m.complete:
        return []
    missing = len(set(m.part_indices()) - {s.index for s in m.shards})
    return [f"{store}: incomplete, {missing} shard(s) not written yet (rerun the same command to resume)"]


def check_listing(m: Manifest, where: str) -> list[str]:
    """The listed shards against the sharding and totals: each index once, in range and in its own file, with
    the rows the dataset gives it; a complete manifest lists every shard of its part; totals add up."""
    sharding, shards = m.sharding, m.shards
    total, rps, examples = sharding.total_shards, sharding.rows_per_shard, m.dataset.examples
    problems, indices, part = [], [s.index for s in shards], set(m.part_indices())
    twice = sorted(i for i, n in Counter(indices).items() if n > 1)
    if twice:
        problems.append(f"{where}: shard(s) {twice} listed twice")
    if isinstance(examples, int) and -(-examples // rps) != total:
        problems.append(
            f"{where}: {examples} examples in shards of {rps} make {-(-examples // rps)} shards, not {total}"
        )
    for s in shards:
        i = s.index
        if i not in part:
            of_part = " (of its part)" if sharding.num_shards > 1 and 0 <= i < total else ""
            problems.append(
                f"{where}: lists shard {i}, which is not one of this cache's {total} shards{of_part}"
            )
        elif s.file != shard_name(i):
            problems.append(f"{where}: shard {i} is listed as {s.file}, not {shard_name(i)}")
        elif isinstance(examples, int) and s.rows != min(rps, examples - i * rps):
            problems.append(
                f"{where}: shard {i} is listed with {s.rows} rows; of {examples} examples in "
                f"shards of {rps} it holds {min(rps, examples - i * rps)}"
            )
    missing = sorted(part - set(indices))
    if m.complete and missing:
        problems.append(
            f"{where} says the cache is complete but does not list shard(s) {missing[:10]} "
            f"({len(set(indices) & part)} of {len(part)} listed); rerun the cache-teacher command "
            "that wrote it to compute them"
        )
    listed = Totals.of(shards)
    differ = [
        k
        for k in ("shards", "rows", "tokens", "target_tokens", "bytes")
        if getattr(m.totals, k) != getattr(listed, k)
    ]
    if differ:
        claimed = ", ".join(f"{k} {getattr(m.totals, k)}" for k in differ)
        problems.append(
            f"{where}: its totals ({claimed}) differ from the listed shards' "
            f"({', '.join(f'{k} {getattr(listed, k)}' for k in differ)})"
        )
    return problems


def verify_shard(
    store: Store, shard: ShardEntry, m: Manifest, values: bool, seen: dict[str, str] | None = None
) -> list[str]:
    name, file = shard.file, store.display(shard.file)
    if not store.is_file(name):
        return [f"{file}: missing"]
    try:  # the footer alone: tells a shard of another run from a damaged one
        footer = json.loads(store.parquet(name).schema_arrow.metadata[METADATA_KEY])
    except Exception:
        footer = None
    if footer is not None and footer.get("settings_hash") != m.settings_hash:
        return [
            f"{file}: belongs to another run than {store.display(MANIFEST)} (settings hash differs): "
            "the shard or the manifest was replaced"
        ]
    size = store.size(name)
    if size != shard.bytes:
        return [f"{file}: size {size} bytes, the manifest says {shard.bytes} (truncated or replaced)"]
    if store.sha256(name) != shard.sha256:
        return [f"{file}: sha256 checksum mismatch (the file is damaged)"]
    try:
        table = store.parquet(name).read()
        meta = json.loads(table.schema.metadata[METADATA_KEY])
    except Exception as e:
        return [f"{file}: unreadable Parquet ({first_line(e, 200)})"]
    problems = []
    if meta.get("settings_hash") != m.settings_hash:
        problems.append(f"{file}: written by another run (settings hash differs from the manifest's)")
    if table.num_rows != shard.rows:
        problems.append(f"{file}: {table.num_rows} rows, the manifest says {shard.rows}")
    problems += [f"{file}: {p}" for p in _identity_problems(table, meta, shard, seen)]
    if values and not problems:
        problems += [f"{file}: {p}" for p in check_values(table, m)]
    return problems


def _identity_problems(
    table: Any, meta: dict[str, Any], shard: ShardEntry, seen: dict[str, str] | None
) -> list[str]:
    """The shard is the one it is listed as: its metadata's shard index, the hash of its example ids (both
    absent from caches written before kdpipe recorded them, which are then not checked for them), and no
    example id in two shards."""
    ids = table["id"].to_pylist()
    digest, problems = ids_hash(ids), []
    if meta.get("shard_index", shard.index) != shard.index:
        problems.append(
            f"its metadata says it is shard {meta['shard_index']}, "
            f"the manifest lists it as shard {shard.index}"
        )
    for whose, recorded in (("manifest's", shard.ids_sha256), ("metadata's", meta.get("ids_sha256"))):
        if recorded is not None and recorded != digest:
            problems.append(f"its example ids do not match the {whose} ids hash (it holds other examples)")
    if seen is not None:
        for example_id in ids:
            if example_id in seen and not problems:
                problems.append(
                    f"example id '{example_id}' is also in {seen[example_id]} (a shard copied over another)"
                )
            seen.setdefault(example_id, shard.file)
    return problems


def check_values(table: Any, manifest: Manifest | dict[str, Any]) -> list[str]:
    """Decoded values are sane: log-probs <= 0, top-k sorted, tail mass in [0, 1], ids in the vocabulary
    (sampled caches: counts summing to N, distinct ids, most often drawn first, a finite estimate)."""
    m = as_manifest(manifest)
    decode = ENCODINGS[m.encoding].decode
    vocab = m.vocab_size or np.iinfo(np.int32).max
    sampled = m.sampled
    problems = []
    for e in decode(table):
        t, where = e.targets, f"example '{e.id}'"
        if len(e.positions) != len(t.target_logprob) or (
            len(e.positions) and e.positions.max() + 1 >= len(e.input_ids)
        ):
            problems.append(f"{where}: positions do not fit input_ids")
        elif nonfinite(t, e.positions):
            problems.append(f"{where}: {nonfinite(t, e.positions)}")
        elif np.any(t.target_logprob > 1e-6):
            problems.append(f"{where}: a log-prob is positive or NaN")
        elif sampled:
            problems += [f"{where}: {p}" for p in _check_sampled(t, int(m.samples), m.proposal_temperature)][
                :1
            ]
        elif np.any(t.topk_logprobs > 0):
            problems.append(f"{where}: a log-prob is positive or NaN")
        elif np.any(np.diff(t.topk_logprobs, axis=1) > 0):
            problems.append(f"{where}: top-k log-probs are not sorted, most likely first")
        elif not np.all((t.tail_mass >= 0) & (t.tail_mass <= 1)):
            problems.append(f"{where}: tail mass outside [0, 1]")
        if not problems and np.any((t.topk_ids < 0) | (t.topk_ids >= vocab)):
            problems.append(f"{where}: token id outside the teacher's vocabulary")
        if len(problems) >= 5:
            break
    return problems


def _check_sampled(t: Any, n: int, proposal_temperature: float) -> list[str]:
    """A sampled position: counts sum to N, ids distinct, most often drawn first, p̂ = counts/N at T = 1."""
    counts = t.sample_counts.astype(np.int64)
    drawn = counts > 0
    ids = np.where(drawn, t.topk_ids, -1 - np.arange(counts.shape[1]))  # padding never collides
    problems = []
    if np.any(counts.sum(-1) != n):
        problems.append(f"sample counts do not sum to N={n}")
    elif np.any(np.diff(counts, axis=1) > 0):
        problems.append("sampled ids are not sorted, most often drawn first")
    elif np.any(np.sort(ids, axis=1)[:, 1:] == np.sort(ids, axis=1)[:, :-1]):
        problems.append("a sampled id is stored twice at one position")
    elif np.any(~np.isfinite(t.topk_logprobs[drawn])):
        problems.append("the sampled estimate is not finite")
    elif proposal_temperature == 1.0 and np.any(
        np.abs(np.exp(t.topk_logprobs[drawn]) - counts[drawn] / n) > 1e-6
    ):
        problems.append("the sampled estimate differs from counts / N")
    return problems
