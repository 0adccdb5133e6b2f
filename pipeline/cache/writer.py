"""Writing shards: zstd Parquet written whole (temp file, fsync, rename locally; one upload on object
storage)."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq

from kdpipe.cache.format import ENCODINGS, METADATA_KEY, ids_hash, shard_name
from kdpipe.cache.ids import split_file_metadata
from kdpipe.cache.manifest import MANIFEST, DamagedManifest, Manifest, as_entry, as_manifest, write_manifest
from kdpipe.cache.sections import ShardEntry, Totals, now
from kdpipe.cache.storage import Lease, Store, as_store
from kdpipe.cache.verified import RECORD
from kdpipe.errors import KdpipeError

ROW_GROUP_ROWS = 256


def write_shard(folder: str | Path | Store, index: int, table: pa.Table) -> dict[str, Any]:
    """Write `table` as shard `index`; return its manifest entry (rows, tokens, bytes, sha256) as JSON."""
    data = shard_bytes(table)
    as_store(folder).write_bytes(shard_name(index), data)
    return shard_entry(index, table, data)


def shard_bytes(table: pa.Table) -> bytes:
    """The Parquet file of a shard: row groups of ROW_GROUP_ROWS, its encoding's write options."""
    sink = pa.BufferOutputStream()
    table, extra = split_file_metadata(table)  # hook: kdpipe.cache.ids (the rank table, stored once)
    with pq.ParquetWriter(sink, table.schema, **parquet_options(table.schema)) as w:
        w.write_table(table, row_group_size=ROW_GROUP_ROWS)
        if extra:
            w.add_key_value_metadata(extra)
    return sink.getvalue().to_pybytes()


def parquet_options(schema: pa.Schema) -> dict[str, Any]:
    """The write options of the table's encoding (named in its kdpipe metadata; plain when absent)."""
    meta = json.loads((schema.metadata or {}).get(METADATA_KEY, b"{}"))
    encoding = ENCODINGS.get(meta.get("encoding", "plain"), ENCODINGS["plain"])
    return encoding.parquet_options(schema)


def shard_entry(index: int, table: pa.Table, data: bytes) -> dict[str, Any]:
    """A shard's manifest entry as manifest.json lists it (`ShardEntry.from_dict` types it): counts, size,
    sha256, the hash of its example ids, its value statistics."""
    stats = footer(table.schema).get("stats")
    return ShardEntry(
        file=shard_name(index),
        index=index,
        rows=table.num_rows,
        tokens=int(pa.compute.sum(pa.compute.list_value_length(table["input_ids"])).as_py() or 0),
        target_tokens=int(pa.compute.sum(pa.compute.list_value_length(table["positions"])).as_py() or 0),
        bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        ids_sha256=ids_hash(table["id"].to_pylist()),
        stats=stats or None,
        absent=frozenset() if stats else frozenset({"stats"}),
    ).to_dict()


def footer(schema: pa.Schema) -> dict[str, Any]:
    """A shard's kdpipe metadata (empty when it has none)."""
    return json.loads((schema.metadata or {}).get(METADATA_KEY, b"{}"))


class CacheWriter:
    """A cache folder (a path or an object-storage URL, see `kdpipe.cache.storage`) being written:
    lock, resume, refuse a foreign run, write shards, keep the manifest.

    `manifest` is the new run's header (everything but shards, totals and completeness; a `Manifest`
    or its JSON object); its `settings_hash` identifies its content; `assigned` are the shard indices this
    process writes;
    `shard_ids` the `ids_hash` of each shard's examples, which a file found on resume must match.
    """

    def __init__(
        self,
        folder: str | Path,
        manifest: Manifest | Mapping[str, Any],
        assigned: list[int],
        overwrite: bool = False,
        shard_ids: dict[int, str] | None = None,
    ):
        self.store, self.assigned, self.overwrite = as_store(folder), assigned, overwrite
        self.folder = self.store.url
        self.manifest = as_manifest(manifest).replace(complete=False, shards=(), totals=Totals.empty())
        self.shard_ids = shard_ids or {}
        self._held = contextlib.ExitStack()
        self.rewritten: list[str] = []  # recorded shards found missing or damaged on resume (written again)
        self.refused: list[str] = []  # unrecorded shard files not adopted, and why (computed again)
        self.rebuilt: str | None = None  # why the manifest was rebuilt from the shards' own metadata

    def __enter__(self) -> CacheWriter:
        self.store.makedirs()
        self._lease = self._held.enter_context(self.store.writer_lock())
        try:
            self._prepare()
        except BaseException:
            self._held.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._held.close()

    @property
    def done(self) -> set[int]:
        return {s.index for s in self.manifest.shards}

    def pending(self) -> list[int]:
        return [i for i in self.assigned if i not in self.done]

    def write(self, index: int, table: pa.Table) -> dict[str, Any]:
        """Write shard `index` and record it in the manifest (in that order: a crash between them is adopted
        on resume); returns its entry as manifest.json lists it."""
        entry = write_shard(self.store, index, table)
        self._record(entry)
        return entry

    def resume_notes(self) -> list[str]:
        """What the resume found and repaired, a line each (none for a fresh cache)."""
        notes = []
        if self.rebuilt:
            notes.append(f"note: {self.rebuilt}: rebuilt from the shards' own metadata "
                         f"({len(self.manifest.shards)} verified and kept, the rest computed again)")
        if self.rewritten:
            notes.append(f"note: {', '.join(self.rewritten)} missing or damaged (size or sha256 differs from "
                         "the manifest): written again")
        if self.refused:
            notes.append(f"note: not adopted, computed again: {', '.join(self.refused)}")
        return notes

    def _record(self, entry: ShardEntry | Mapping[str, Any]) -> None:
        entry = as_entry(entry)
        shards = [s for s in self.manifest.shards if s.index != entry.index] + [entry]
        self.manifest = self.manifest.with_shards(shards, complete=False, updated=now())
        self.manifest = self.manifest.replace(complete=not self.pending())
        self._lease.check()
        write_manifest(self.store, self.manifest)

    def _prepare(self) -> None:
        store = self.store
        names = store.names()
        for tmp in [n for n in names if n.startswith(".") and n.endswith(".tmp")]:
            store.delete(tmp)
        if self.overwrite:
            for old in [
                n
                for n in names
                if n in (MANIFEST, RECORD) or (n.startswith("shard-") and n.endswith(".parquet"))
            ]:
                store.delete(old)
            names = store.names()
        try:
            old = Manifest.read(store) if MANIFEST in names else None
        except DamagedManifest as e:
            if any(n not in (MANIFEST, ".lock", Lease.NAME, RECORD) and not _is_shard(n) for n in names):
                raise
            self.rebuilt, old = e.message.split("; ")[0], None  # only shards beside it: adopted once checked
        if old is not None:
            self._check_same_run(old)
            created = old.created if "created" not in old.absent else self.manifest.created
            kept = tuple(s for s in old.shards if self._intact(s, names))
            self.manifest = self.manifest.replace(created=created, shards=kept)
        elif not self.rebuilt and any(n not in (".lock", Lease.NAME, RECORD) for n in names):
            raise KdpipeError(
                f"{self.folder} is not empty and holds no kdpipe cache; choose another --cache folder"
            )
        self._adopt_unrecorded(set(store.names()))  # listed again: damaged shards were just removed
        if self.rewritten or self.refused or self.rebuilt:  # repaired: the verification record goes with it
            store.delete(RECORD)
        self.manifest = self.manifest.with_shards(self.manifest.shards, complete=not self.pending())
        write_manifest(store, self.manifest)

    def _check_same_run(self, old: Manifest) -> None:
        new = self.manifest
        same = old.settings_hash == new.settings_hash
        if same and old.sharding.to_dict() == new.sharding.to_dict():
            return
        if same and old.sharding.num_shards > 1:
            raise KdpipeError(
                f"{self.folder} holds part {old.sharding.shard_index} of {old.sharding.num_shards} of this "
                "run: each --shard-index writes its own folder (e.g. .../part-0, .../part-1), then "
                "`kdpipe cache merge PARTS... --output FOLDER` joins them"
            )
        before, after = old.to_dict(), new.to_dict()
        differ = differing_settings(old, new)
        raise KdpipeError(
            f"{self.folder} holds another run (different {', '.join(differ) or 'settings'}: "
            f"it was written by `{old.command or '?'}`){_changed_file(before, after)}; use another --cache "
            "folder or --overwrite to replace it"
        )

    def _intact(self, shard: ShardEntry, names: list[str]) -> bool:
        """A recorded shard is kept when its size and sha256 match the manifest (and its entry is this run's
        shard: its own file name, this shard's example ids); otherwise it is removed and written again."""
        name, expected = shard.file, self.shard_ids.get(shard.index)
        if name != shard_name(shard.index):  # an edited entry: the file may be another shard's, keep it
            self.rewritten.append(shard_name(shard.index))
            return False
        recorded = expected if "ids_sha256" in shard.absent else shard.ids_sha256
        if expected is not None and recorded != expected:
            pass  # recorded for other examples: written again
        elif (
            name in names and self.store.size(name) == shard.bytes and self.store.sha256(name) == shard.sha256
        ):
            return True
        self.store.delete(name)  # never adopted below: a damaged file may still parse
        self.rewritten.append(name)
        return False

    def _adopt_unrecorded(self, names: set[str]) -> None:
        """A shard put in place just before a crash (so missing from the manifest) is complete: record it.
        So is every shard beside a damaged manifest, which is rebuilt from them.

        Locally a shard file only appears by rename, on object storage only as a whole upload; it is still
        read back and checked before it is adopted: readable Parquet of this run, the shard it claims to be
        (its metadata's shard index, its example ids), finite values. Otherwise it is removed.
        """
        from kdpipe.cache.values import check_decoded

        for index in self.pending():
            name = shard_name(index)
            if name not in names:
                continue
            data = self.store.read_bytes(name)
            try:
                table = pq.ParquetFile(pa.BufferReader(data)).read()  # with the file metadata (id ranks)
                meta = json.loads(table.schema.metadata[METADATA_KEY])
                check_decoded(ENCODINGS[self.manifest.encoding].decode(table), name)
            except Exception as e:
                self._refuse(
                    name, "holding non-finite values" if isinstance(e, KdpipeError) else "unreadable"
                )
                continue
            if meta.get("settings_hash") != self.manifest.settings_hash:
                if self.rebuilt:  # no manifest says whose it is: refuse rather than delete another run's work
                    raise KdpipeError(
                        f"{self.store.display(name)} belongs to another run (settings hash "
                        f"differs) and {MANIFEST} is damaged; use another --cache folder or "
                        "--overwrite to replace it"
                    )
                self._refuse(name, "of another run")
                continue
            claimed, expected = meta.get("shard_index", index), self.shard_ids.get(index)
            if claimed != index or (expected is not None and ids_hash(table["id"].to_pylist()) != expected):
                why = f"its metadata says shard {claimed}" if claimed != index else "it holds other examples"
                self._refuse(name, f"not shard {index}: {why}")
                continue
            adopted = (*self.manifest.shards, as_entry(shard_entry(index, table, data)))
            self.manifest = self.manifest.replace(shards=adopted)
        self.manifest = self.manifest.replace(shards=tuple(self.manifest.sorted_shards))

    def _refuse(self, name: str, why: str) -> None:
        self.store.delete(name)
        self.refused.append(f"{name} ({why})")


def _is_shard(name: str) -> bool:
    shard = name.startswith("shard-") and name.endswith(".parquet")
    return shard or (name.startswith(".") and name.endswith(".tmp"))  # a shard or the temp file of one


def totals(shards: Sequence[ShardEntry | Mapping[str, Any]]) -> dict[str, Any]:
    """The totals section of these shard entries, as JSON (see `Totals.of`)."""
    return Totals.of(as_entry(s) for s in shards).to_dict()


def differing_settings(a: Manifest, b: Manifest, sharding: bool = True) -> list[str]:
    """The manifest sections in which two runs' settings differ (teacher, tokenizer, template, dataset,
    sparse, encoding, and with `sharding` the split), informational keys aside."""
    before, after = a.to_dict(), b.to_dict()
    sections = ("teacher", "tokenizer", "template", "dataset", "sparse", "encoding") + (
        ("sharding",) if sharding else ())
    return [key for key in sections if _core(before.get(key)) != _core(after.get(key))]


def _changed_file(before: dict[str, Any], after: dict[str, Any]) -> str:
    """", and why": the same local data file whose bytes changed since the cache was written."""
    was, now = (m.get("dataset") or {} for m in (before, after))
    old_file, new_file = was.get("file") or {}, now.get("file") or {}
    if not old_file or old_file.get("path") != new_file.get("path") or old_file.get("sha256") == new_file.get(
            "sha256"):
        return ""
    rows = f", {was.get('examples')} examples then, {now.get('examples')} now" if was.get("examples") else ""
    return (f": the data file {new_file['path']} changed since the cache was written (sha256 "
            f"{str(old_file.get('sha256'))[:12]}... then, {str(new_file.get('sha256'))[:12]}... now{rows})")


def _core(section: Any) -> Any:
    """A manifest section without its informational, run-dependent keys."""
    if isinstance(section, dict):
        return {k: v for k, v in section.items() if k not in ("report", "examples", "backend_version")}
    return section
