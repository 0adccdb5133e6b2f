"""The check train-student and evaluate make before they use a cache: fast by default, full on demand.

Always: the manifest (format, structure, listing, totals, completeness) and every listed shard's
presence and size. ``full`` also hashes every shard (sha256 against the manifest) and reads it back
(readable Parquet, this run's, its rows and example ids): what `kdpipe cache verify` does, less the
value checks. ``fast`` does the full check of a shard only when the shard changed since it last
passed one: a verification record, ``.kdpipe-verified.json`` in the cache folder, keeps each passed
shard's size, modification time, change time, inode and the manifest's sha256 of it; a shard whose
file still shows all of them is not hashed again.

What fast trades: a shard rewritten, replaced, truncated, copied over or touched gets a new mtime or
ctime or inode and is hashed again; a change that keeps them all (bytes flipped in place by the disk
or by a tool that restores both times, which needs root for ctime) is not seen until ``--verify full``
or `kdpipe cache verify`.

Where: local folders only. On object storage pyarrow's file info gives size and modification time
but no ETag, and a job may only read the bucket, so there every shard is always hashed (as before).
The record is written atomically (temp file, fsync, rename); a read-only folder just gets no record
(each run then hashes again). Anything listing cache files must ignore it (`RECORD`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from kdpipe.cache.checks import check_listing, incomplete, verify_shard
from kdpipe.cache.manifest import MANIFEST, Manifest
from kdpipe.cache.reader import Cache, open_cache
from kdpipe.cache.sections import ShardEntry
from kdpipe.cache.storage import Store
from kdpipe.errors import KdpipeError

RECORD = ".kdpipe-verified.json"
VERSION = 1
Mode = Literal["fast", "full"]


def check_for_use(store: Store, m: Manifest, mode: Mode = "fast") -> list[str]:
    """Problems that stop a cache from being used (empty: usable); updates the verification record."""
    if mode not in ("fast", "full"):
        raise ValueError(f"verify must be fast or full, not {mode!r}")
    problems = incomplete(store, m) + check_listing(m, store.display(MANIFEST))
    old = read_record(store) if store.local else {}
    passed: dict[str, dict[str, Any]] = {}
    seen: dict[str, str] = {}
    for shard in m.shards:
        name = shard.file
        stamp = _stamp(store, name, shard, m)
        if stamp is None:  # missing: the full check names it
            problems += verify_shard(store, shard, m, False, seen)
            continue
        if stamp["bytes"] != shard.bytes:
            problems.append(
                f"{store.display(name)}: size {stamp['bytes']} bytes, the manifest says "
                f"{shard.bytes} (truncated or replaced)"
            )
            continue
        if mode == "fast" and old.get(name) == stamp:
            passed[name] = stamp
            continue
        found = verify_shard(store, shard, m, False, seen)
        problems += found
        if not found:
            passed[name] = stamp
    if store.local and passed != old:
        write_record(store, passed)
    return problems


def open_checked(path: str | Path, verify_mode: Mode = "fast") -> Cache:
    """Open a cache that passes verification (manifest, sizes; checksums, schema, counts of the shards
    changed since they last passed: see above; all of them with ``full``) and holds at least
    one example."""
    cache = open_cache(path)  # refuses a missing manifest or a newer format version
    if len(cache) == 0:  # first: a manifest listing no shard says nothing else worth checking
        raise KdpipeError(f"cache {path} holds no examples")
    problems = check_for_use(cache.store, cache.manifest, verify_mode)
    if problems:
        raise KdpipeError(
            f"cache {path} failed verification: {'; '.join(problems)}. See `kdpipe cache verify {path}`"
        )
    return cache


def _stamp(store: Store, name: str, shard: ShardEntry, m: Manifest) -> dict[str, Any] | None:
    """What the record keeps of a shard: its file's size, mtime, ctime, inode, and what the manifest says
    of it."""
    if store.local:
        try:
            st = os.stat(store.path(name))
        except FileNotFoundError:
            return None
        return {
            "bytes": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns,
            "inode": st.st_ino,
            "sha256": shard.sha256,
            "settings_hash": m.settings_hash,
        }
    if not store.is_file(name):
        return None
    return {"bytes": store.size(name)}  # object storage: never skipped (no record)


def read_record(store: Store) -> dict[str, dict[str, Any]]:
    """The shards last verified (empty when there is no usable record: everything is then checked)."""
    path = Path(store.path(RECORD))
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}
    if (
        not isinstance(data, dict)
        or data.get("version") != VERSION
        or not isinstance(data.get("shards"), dict)
    ):
        return {}
    return data["shards"]


def write_record(store: Store, shards: dict[str, dict[str, Any]]) -> None:
    """Replace the record atomically; a folder that cannot be written keeps none (no error: it is a cache)."""
    text = json.dumps(
        {
            "version": VERSION,
            "note": "kdpipe: shards that passed a full check (size, mtime, ctime, "
            "inode); delete this file to hash every shard again",
            "shards": shards,
        },
        indent=1,
    )
    try:
        store.write_bytes(RECORD, (text + "\n").encode())
    except Exception:  # read-only folder, full disk: verification still happened, only not remembered
        pass
