"""`kdpipe cache info | verify | merge`: what a cache holds, whether it is intact, joining split runs."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe.cache.format import ENCODINGS, METADATA_KEY, ids_hash, shard_name
from kdpipe.cache.manifest import MANIFEST, Manifest, ShardEntry, Totals, as_manifest, now, write_manifest
from kdpipe.cache.storage import Store
from kdpipe.cache.values import nonfinite
from kdpipe.cache.verified import RECORD
from kdpipe.cache.writer import differing_settings
from kdpipe.errors import KdpipeError


def info(path: str | Path) -> dict[str, Any]:
    """A summary of a cache: teacher, data, sparse mode, encoding, sizes, completeness."""
    m = Manifest.read(path)
    t = Totals.of(m.shards)  # what is listed, not what the manifest's totals claim
    problems = check_listing(m, str(path))
    # over-long examples cut or skipped (see kdpipe.data.tokenize); none is the norm
    cut = "; ".join(f"{n} {what}" for what, n in sorted((m.dataset.report or {}).items()) if n)
    return {
        "path": str(path),
        "complete": m.complete and not problems,
        **({"problems": f"{'; '.join(problems)}; run `kdpipe cache verify {path}`"} if problems else {}),
        "teacher": m.teacher.model,
        "teacher_dtype": m.teacher.dtype,
        "backend": m.teacher.backend,
        "tokenizer": m.tokenizer.name,
        "dataset": f"{m.dataset.source} [{m.dataset.split}, part {m.dataset.part}]",
        "template": m.template.name,
        "sparse_mode": m.mode.value,
        **({"samples": m.samples, "proposal_temperature": m.sparse.proposal_temperature}
           if m.sampled else {"k": m.k}),
        "encoding": m.encoding,
        "shards": f"{t.shards} of {m.sharding.total_shards}",
        "examples": t.rows,
        "tokens": t.tokens,
        "target_tokens": t.target_tokens,
        "mean_target_tokens_per_example": round(t.target_tokens / t.rows, 1) if t.rows else 0,
        "bytes": t.bytes,
        "bytes_per_target_token": t.bytes_per_target_token,
        "examples_cut_or_skipped": cut or f"none (every example fit max_length={m.max_length})",
        "kdpipe_version": m.kdpipe_version,
        "command": m.command,
    }


def verify(path: str | Path, values: bool = True) -> list[str]:
    """Every problem found (empty when the cache is intact): checksums, schema, counts, value sanity."""
    store = Store.open(path)
    m = Manifest.read(store)
    problems = []
    if not m.complete:
        missing = len(set(m.part_indices()) - {s.index for s in m.shards})
        problems.append(
            f"{store}: incomplete, {missing} shard(s) not written yet (rerun the same command to resume)"
        )
    problems += check_listing(m, store.display(MANIFEST))
    seen: dict[str, str] = {}  # example id -> the shard holding it
    for shard in m.shards:
        problems += _verify_shard(store, shard, m, values, seen)
    listed = {s.file for s in m.shards}
    strays = [n for n in store.names() if n.startswith("shard-") and n.endswith(".parquet")
              and n not in listed]
    problems += [f"{store.display(n)}: a shard file the manifest does not list (from a run killed before "
                 "it recorded the shard: rerun the cache-teacher command to adopt it; or a stray copy: "
                 "delete it)" for n in strays]
    return problems


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


def _verify_shard(
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
        return [f"{file}: unreadable Parquet ({str(e).splitlines()[0][:200]})"]
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


def open_checked(path: str | Path, verify_mode: str = "fast") -> Any:
    """Open a cache that passes verification (manifest, sizes; checksums, schema, counts of the shards
    changed since they last passed: `kdpipe.cache.verified`; all of them with ``full``) and holds at least
    one example."""
    from kdpipe.cache.reader import open_cache
    from kdpipe.cache.verified import check_for_use

    cache = open_cache(path)  # refuses a missing manifest or a newer format version
    if len(cache) == 0:  # first: a manifest listing no shard says nothing else worth checking
        raise KdpipeError(f"cache {path} holds no examples")
    problems = check_for_use(cache.store, cache.manifest, verify_mode)
    if problems:
        raise KdpipeError(
            f"cache {path} failed verification: {'; '.join(problems)}. See `kdpipe cache verify {path}`"
        )
    return cache


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


def merge(parts: list[str | Path], output: str | Path) -> tuple[Manifest, bool]:
    """Join the caches of a `--num-shards/--shard-index` split into one folder (hard links where possible);
    returns the merged manifest and whether anything was written (False: a finished merge of the same
    parts was already there, so a rerun is a no-op).

    Every part's shards are verified first (size, sha256, the shard they are); nothing is linked from a
    damaged part. A merge that was killed leaves shard files and perhaps a temp manifest but no manifest
    (written last): a rerun keeps the shards already in place that match, links the rest and writes it.
    Parts and output may be local folders or object-storage URLs (objects are copied there).
    """
    out = Store.open(output)
    stores = [Store.open(p) for p in parts]
    manifests = [Manifest.read(s) for s in stores]
    first = manifests[0]
    for path, m in zip(parts, manifests):
        other_rows = m.sharding.rows_per_shard != first.sharding.rows_per_shard
        if m.settings_hash != first.settings_hash or other_rows:
            differ = (differing_settings(first, m, sharding=False) or ["rows_per_shard"] * other_rows
                      or ["settings"])
            raise KdpipeError(
                f"{path} is not a part of the same run as {parts[0]} (different {', '.join(differ)}: "
                f"`{m.command or '?'}` against `{first.command or '?'}`); cannot merge"
            )
    done = _earlier_merge(out, manifests)
    if done is not None and all(out.is_file(s.file) and out.size(s.file) == s.bytes for s in done.shards):
        return done, False
    shards: dict[int, tuple[Store, ShardEntry]] = {}
    for store, m in zip(stores, manifests):
        for s in m.shards:
            if s.index in shards:
                raise KdpipeError(f"shard {s.index} is in both {shards[s.index][0]} and {store}")
            shards[s.index] = (store, s)
    total = first.sharding.total_shards
    missing = sorted(set(range(total)) - set(shards))
    if missing:
        raise KdpipeError(
            f"the parts lack shard(s) {missing[:10]} of {total}: finish those parts first (rerun them)"
        )
    owner = {s.index: m for m in manifests for s in m.shards}
    problems = [
        p for i, (store, s) in sorted(shards.items()) for p in _verify_shard(store, s, owner[i], values=False)
    ]
    if problems:
        raise KdpipeError(
            f"cannot merge, a part is damaged: {'; '.join(problems[:5])}. Rerun that part's "
            "cache-teacher command (it rewrites damaged shards), then merge again; "
            "nothing was merged"
        )
    entries = [s for _, (_, s) in sorted(shards.items())]
    _check_merge_output(out, repair=done is not None)
    out.makedirs()
    with out.writer_lock():
        for name in [n for n in out.names() if n.startswith(".") and n.endswith(".tmp")]:
            out.delete(name)  # a temp file of a killed merge
        for _, (store, s) in sorted(shards.items()):
            if out.is_file(s.file) and out.size(s.file) == s.bytes and out.sha256(s.file) == s.sha256:
                continue  # put in place by a merge that was killed
            out.delete(s.file)
            out.copy_from(store, s.file)
        merged = first.with_shards(entries, complete=True, updated=now())
        merged = merged.replace(
            sharding=first.sharding.replace(num_shards=1, shard_index=0),
            merged_from=[{"path": str(p), "command": m.command} for p, m in zip(parts, manifests)],
            dataset=first.dataset.replace(examples=merged.totals.rows),
        )
        write_manifest(out, merged)  # last, atomically: a folder with a manifest is a finished merge
    return merged, True


def _earlier_merge(out: Store, manifests: list[Manifest]) -> Manifest | None:
    """The output's manifest when it is an earlier merge of exactly these parts' shards (a rerun is then a
    no-op, or puts back the shard files it lost); None when there is no manifest yet."""
    if not out.exists() or not out.is_file(MANIFEST):
        return None
    old = Manifest.read(out)
    wanted = sorted((s.index, s.sha256) for m in manifests for s in m.shards)
    if old.complete and sorted((s.index, s.sha256) for s in old.shards) == wanted:
        return old
    sources = ", ".join(str(f.get("path")) for f in (old.merged_from or []) if isinstance(f, dict))
    raise KdpipeError(f"{out} already holds a cache{f' merged from {sources}' if sources else ''}, not these "
                      "parts' shards; merge into a new folder")


def _check_merge_output(out: Store, repair: bool = False) -> None:
    """The output is new, or what a killed merge left: shard and temp files, no manifest (written last), or
    (`repair`) an earlier merge of the same shards that lost some of its files."""
    kept = (".lock", ".writer", RECORD) + ((MANIFEST,) if repair else ())
    names = [n for n in out.names() if n not in kept]
    strays = [
        n
        for n in names
        if not (n.startswith("shard-") and n.endswith(".parquet"))
        and not (n.startswith(".") and n.endswith(".tmp"))
    ]
    if strays:
        raise KdpipeError(f"{out} is not empty; merge into a new folder")
