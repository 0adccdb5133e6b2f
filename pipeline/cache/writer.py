"""Writing shards: zstd Parquet written whole to a temp file, fsynced, then renamed into place."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq

from kdpipe.cache.format import MANIFEST, METADATA_KEY, read_manifest, shard_name, write_atomic, write_manifest
from kdpipe.errors import KdpipeError

ZSTD_LEVEL = 3
ROW_GROUP_ROWS = 256


def write_shard(folder: str | Path, index: int, table: pa.Table) -> dict[str, Any]:
    """Write `table` as shard `index`; return its manifest entry (rows, tokens, bytes, sha256)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", compression_level=ZSTD_LEVEL, row_group_size=ROW_GROUP_ROWS)
    data = sink.getvalue().to_pybytes()
    write_atomic(Path(folder) / shard_name(index), data)
    return shard_entry(index, table, data)


def shard_entry(index: int, table: pa.Table, data: bytes) -> dict[str, Any]:
    return {
        "file": shard_name(index),
        "index": index,
        "rows": table.num_rows,
        "tokens": int(pa.compute.sum(pa.compute.list_value_length(table["input_ids"])).as_py() or 0),
        "target_tokens": int(pa.compute.sum(pa.compute.list_value_length(table["positions"])).as_py() or 0),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class CacheWriter:
    """A cache folder being written: lock, resume, refuse a foreign run, write shards, keep the manifest.

    `manifest` is the new run's header (everything but shards, totals and completeness);
    `settings_hash` identifies its content; `assigned` are the shard indices this process writes.
    """

    def __init__(self, folder: str | Path, manifest: dict[str, Any], assigned: list[int], overwrite: bool = False):
        self.folder, self.assigned, self.overwrite = Path(folder), assigned, overwrite
        self.manifest = {**manifest, "complete": False, "shards": [], "totals": {}}
        self._lock: Any = None
        self.rewritten: list[str] = []  # recorded shards found missing or damaged on resume (written again)

    def __enter__(self) -> "CacheWriter":
        from filelock import FileLock, Timeout

        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(self.folder / ".lock"))
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            raise KdpipeError(f"another kdpipe process is writing to {self.folder} (its .lock is held); wait for it or use another --cache") from None
        try:
            self._prepare()
        except BaseException:
            self._lock.release()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._lock.release()

    @property
    def done(self) -> set[int]:
        return {s["index"] for s in self.manifest["shards"]}

    def pending(self) -> list[int]:
        return [i for i in self.assigned if i not in self.done]

    def write(self, index: int, table: pa.Table) -> dict[str, Any]:
        """Write shard `index` and record it in the manifest (in that order: a crash between them is adopted on resume)."""
        entry = write_shard(self.folder, index, table)
        self._record(entry)
        return entry

    def _record(self, entry: dict[str, Any]) -> None:
        shards = sorted([s for s in self.manifest["shards"] if s["index"] != entry["index"]] + [entry], key=lambda s: s["index"])
        self.manifest["shards"] = shards
        self.manifest["totals"] = totals(shards)
        self.manifest["complete"] = not self.pending()
        self.manifest["updated"] = now()
        write_manifest(self.folder, self.manifest)

    def _prepare(self) -> None:
        for tmp in self.folder.glob(".*.tmp"):
            tmp.unlink()
        path = self.folder / MANIFEST
        if self.overwrite:
            for old in [path, *self.folder.glob("shard-*.parquet")]:
                old.unlink(missing_ok=True)
        if path.exists():
            old = read_manifest(self.folder)
            self._check_same_run(old)
            self.manifest["created"] = old.get("created", self.manifest.get("created"))
            self.manifest["shards"] = [s for s in old["shards"] if self._intact(s)]
        elif any(p.name != ".lock" for p in self.folder.iterdir()):
            raise KdpipeError(f"{self.folder} is not empty and holds no kdpipe cache; choose another --cache folder")
        self._adopt_unrecorded()
        self.manifest["complete"] = not self.pending()
        self.manifest["totals"] = totals(self.manifest["shards"])
        write_manifest(self.folder, self.manifest)

    def _check_same_run(self, old: dict[str, Any]) -> None:
        new = self.manifest
        if old.get("settings_hash") == new["settings_hash"] and old.get("sharding") == new["sharding"]:
            return
        differ = [key for key in ("teacher", "tokenizer", "template", "dataset", "sparse", "encoding", "sharding") if _core(old.get(key)) != _core(new.get(key))]
        raise KdpipeError(
            f"{self.folder} holds another run (different {', '.join(differ) or 'settings'}: "
            f"it was written by `{old.get('command', '?')}`); use another --cache folder or --overwrite to replace it"
        )

    def _intact(self, shard: dict[str, Any]) -> bool:
        """A recorded shard is kept when its size and sha256 match the manifest; otherwise it is removed and written again."""
        path = self.folder / shard["file"]
        if path.is_file() and path.stat().st_size == shard["bytes"] and file_sha256(path) == shard["sha256"]:
            return True
        path.unlink(missing_ok=True)  # never adopted below: a damaged file may still parse
        self.rewritten.append(shard["file"])
        return False

    def _adopt_unrecorded(self) -> None:
        """A shard renamed into place just before a crash (so missing from the manifest) is complete: record it."""
        for index in self.pending():
            path = self.folder / shard_name(index)
            if not path.is_file():
                continue
            try:
                table = pq.read_table(path)
                meta = json.loads(table.schema.metadata[METADATA_KEY])
            except Exception:
                path.unlink()
                continue
            if meta.get("settings_hash") != self.manifest["settings_hash"]:
                path.unlink()
                continue
            data = path.read_bytes()
            self.manifest["shards"].append(shard_entry(index, table, data))


def totals(shards: list[dict[str, Any]]) -> dict[str, Any]:
    rows = sum(s["rows"] for s in shards)
    target = sum(s["target_tokens"] for s in shards)
    size = sum(s["bytes"] for s in shards)
    return {
        "shards": len(shards),
        "rows": rows,
        "tokens": sum(s["tokens"] for s in shards),
        "target_tokens": target,
        "bytes": size,
        "bytes_per_target_token": round(size / target, 2) if target else None,
    }


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _core(section: Any) -> Any:
    """A manifest section without its informational, run-dependent keys."""
    if isinstance(section, dict):
        return {k: v for k, v in section.items() if k not in ("report", "examples", "backend_version")}
    return section
