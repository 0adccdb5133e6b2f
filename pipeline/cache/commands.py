"""What `kdpipe cache info | verify | merge` do: what a cache holds, whether it is intact, joining the
parts of a split run. The checks themselves are `kdpipe.cache.checks`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdpipe.cache.checks import check_listing, check_settings, incomplete, verify_shard
from kdpipe.cache.manifest import MANIFEST, Manifest, write_manifest
from kdpipe.cache.sections import ShardEntry, Totals, now
from kdpipe.cache.storage import Store
from kdpipe.cache.verified import RECORD
from kdpipe.cache.writer import differing_settings
from kdpipe.errors import KdpipeError


def info(path: str | Path) -> dict[str, Any]:
    """A summary of a cache: teacher, data, sparse mode, encoding, sizes, completeness."""
    m = Manifest.read(path)
    t = Totals.of(m.shards)  # what is listed, not what the manifest's totals claim
    problems = check_listing(m, str(path)) + check_settings(Store.open(path), m)
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
        "dataset": f"{m.dataset.source} [{_selection(m.dataset)}]",
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


def _selection(data: Any) -> str:
    """Which examples of the source a cache holds, as `cache info` says it: a held-out cache says so first (a
    local file's only split is called train by the loader, which is not what it is)."""
    if data.part == "heldout":
        return f"held out: part heldout of split {data.split}"
    if data.heldout:
        return "held out (--heldout)" + ("" if data.part == "all" else f", part {data.part}")
    return f"{data.split}, part {data.part}"


def verify(path: str | Path, values: bool = True) -> list[str]:
    """Every problem found (empty when the cache is intact): checksums, schema, counts, value sanity."""
    store = Store.open(path)
    m = Manifest.read(store)
    problems = incomplete(store, m) + check_listing(m, store.display(MANIFEST))
    problems += check_settings(store, m)
    seen: dict[str, str] = {}  # example id -> the shard holding it
    for shard in m.shards:
        problems += verify_shard(store, shard, m, values, seen)
    # a complete, intact cache lists every shard of its part: a file it does not list is a stray. In an
    # unfinished one the rerun adopts a shard its killed run did not record ("incomplete" asks for the
    # rerun); where a listed shard is already wrong (a replaced manifest), that problem explains the rest
    listed = {s.file for s in m.shards}
    strays = [n for n in store.names() if n.startswith("shard-") and n.endswith(".parquet")
              and n not in listed] if m.complete and not problems else []
    problems += [f"{store.display(n)}: a shard file the manifest does not list (a stray copy, or left by "
                 "another run: delete it)" for n in strays]
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
    out.check_writable("--output")  # before the parts' shards are read and hashed
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
        p for i, (store, s) in sorted(shards.items()) for p in verify_shard(store, s, owner[i], values=False)
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
