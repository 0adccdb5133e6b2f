"""The manifest: the contract between stage one (cache-teacher) and everything that reads a cache.

`Manifest` is typed and frozen. Stage one builds it from explicit facts (`Manifest.create`), which
computes the settings hash; `file_metadata()` gives the facts repeated in every Parquet file. It reads
and writes itself as ``manifest.json`` (`Manifest.read`, `Manifest.write`).

Byte-for-byte compatibility is the rule: `to_dict()` gives back exactly the keys, order and values that
were read (or that kdpipe always wrote for the same facts), so the JSON, the settings hash and the
shards stay what they were. Each section keeps the keys it does not know in `extra` and remembers in
`absent` which known keys a manifest lacked (caches written by older versions have fewer), so
reading and writing an older manifest changes nothing in it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdpipe.cache.ids import CODING as ID_CODING
from kdpipe.cache.sections import (
    DATASET_FACTS,
    DatasetInfo,
    Section,
    ShardEntry,
    Sharding,
    SparseMode,
    SparseSpec,
    TeacherInfo,
    TemplateInfo,
    TokenizerInfo,
    Totals,
    as_plain,
    now,
)
from kdpipe.cache.storage import Store, as_store
from kdpipe.errors import KdpipeError

FORMAT = "kdpipe-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"

_SECTION_TYPES: dict[str, type[Section]] = {
    "teacher": TeacherInfo, "tokenizer": TokenizerInfo, "template": TemplateInfo, "dataset": DatasetInfo,
    "sparse": SparseSpec, "sharding": Sharding, "totals": Totals}


@dataclass(frozen=True)
class Manifest(Section):
    """A cache's manifest (spec: cache/README.md). Built by `create`, read by `read` or `from_dict`."""

    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    kdpipe_version: str | None = None
    command: str | None = None
    created: str | None = None
    updated: str | None = None
    teacher: TeacherInfo = field(default_factory=TeacherInfo)
    tokenizer: TokenizerInfo = field(default_factory=TokenizerInfo)
    template: TemplateInfo = field(default_factory=TemplateInfo)
    dataset: DatasetInfo = field(default_factory=DatasetInfo)
    sparse: SparseSpec = field(default_factory=SparseSpec)
    encoding: str = "plain"
    sharding: Sharding = field(default_factory=Sharding)
    generated: dict[str, Any] | None = None  # data of `kdpipe generate`: its model, settings (generated_file)
    settings_hash: str = ""
    complete: bool = False
    shards: tuple[ShardEntry, ...] = ()  # in the order listed (`sorted_shards` sorts by index)
    totals: Totals = field(default_factory=Totals.empty)
    merged_from: list[dict[str, Any]] | None = None  # `kdpipe cache merge`: each part's path and command

    @classmethod
    def create(cls, *, teacher: TeacherInfo, tokenizer: TokenizerInfo, template: TemplateInfo,
               dataset: DatasetInfo, sparse: SparseSpec, encoding: str, sharding: Sharding,
               kdpipe_version: str, command: str, generated: dict[str, Any] | None = None,
               created: str | None = None) -> Manifest:
        """The header of a new cache from its facts (no shards yet), with its settings hash (which the
        provenance of generated data is not part of)."""
        stamp = created or now()
        absent = {"complete", "shards", "totals", "merged_from"} | (set() if generated else {"generated"})
        header = cls(FORMAT, FORMAT_VERSION, kdpipe_version, command, stamp, stamp, teacher, tokenizer,
                     template, dataset, sparse, encoding, sharding, generated or None,
                     absent=frozenset(absent))
        return header.replace(settings_hash=header.compute_settings_hash())

    @classmethod
    def _load(cls, name: str, value: Any) -> Any:
        if name in _SECTION_TYPES and isinstance(value, Mapping):
            return _SECTION_TYPES[name].from_dict(value)
        if name == "shards" and isinstance(value, list):
            return tuple(ShardEntry.from_dict(s) for s in value)
        return value

    @classmethod
    def read(cls, folder: str | Path | Store) -> Manifest:
        """The manifest of a cache folder (a path or a URL), checked for format, version and structure."""
        return cls.from_dict(read_manifest(folder))

    @classmethod
    def read_if_any(cls, location: str | Path | None) -> Manifest | None:
        """The manifest at `location`, or None where there is none to read: not written yet, moved or
        deleted since, or unreadable (the stage that opens it for use says why)."""
        if not location:
            return None
        try:
            return cls.read(location)
        except (KdpipeError, OSError, ValueError):
            return None

    def write(self, folder: str | Path | Store) -> None:
        write_manifest(folder, self.to_dict())

    def to_json(self) -> bytes:
        """Exactly the bytes of manifest.json."""
        return manifest_bytes(self.to_dict())

    def compute_settings_hash(self) -> str:
        """sha256 of what decides the cache's content (the same settings give the same shards)."""
        content: dict[str, Any] = {key: as_plain(getattr(self, key)) for key in
                                   ("teacher", "tokenizer", "template", "dataset", "sparse", "encoding")}
        content["teacher"] = {k: v for k, v in content["teacher"].items() if k != "backend_version"}
        content["dataset"] = {k: v for k, v in content["dataset"].items() if k not in DATASET_FACTS}
        content["rows_per_shard"] = self.sharding.rows_per_shard
        return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()

    def file_metadata(self) -> dict[str, Any]:
        """The key facts repeated in every Parquet file (identical across machines of a split run)."""
        meta = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "settings_hash": self.settings_hash,
            "teacher": self.teacher.model, "teacher_dtype": self.teacher.dtype,
            "vocab_hash": self.tokenizer.vocab_hash, "template": self.template.name,
            "dataset": self.dataset.source, "split": self.dataset.split,
            "sparse_mode": self.sparse.mode.value, "k": self.sparse.k, "encoding": self.encoding,
        }
        if self.encoding != "plain":  # the id width follows from it
            meta["vocab_size"] = self.teacher.vocab_size
            meta["id_coding"] = ID_CODING  # rank-coded ids (kdpipe.cache.ids); shards without it hold raw ids
        if self.sampled:
            meta.update(samples=self.sparse.samples, proposal_temperature=self.sparse.proposal_temperature)
        return meta

    def with_shards(self, shards: Sequence[ShardEntry], complete: bool,
                    updated: str | None = None) -> Manifest:
        """These shards (sorted by index), their totals and completeness; `updated` stamped when given."""
        listed = tuple(sorted(shards, key=lambda s: s.index))
        stamp = {"updated": updated} if updated else {}
        return self.replace(shards=listed, totals=Totals.of(listed), complete=complete, **stamp)

    # ---------------------------------------------------------------- what readers ask

    @property
    def mode(self) -> SparseMode:
        return self.sparse.mode

    @property
    def sampled(self) -> bool:
        return self.sparse.mode is SparseMode.SAMPLED

    @property
    def k(self) -> int:
        """Ids stored per position (top-k: k; sampled: N)."""
        return int(self.sparse.k)

    @property
    def samples(self) -> int | None:
        return self.sparse.samples

    @property
    def proposal_temperature(self) -> float:
        t = self.sparse.proposal_temperature
        return float(t if t is not None else 1.0)

    @property
    def vocab_size(self) -> int | None:
        """The teacher's vocabulary (LM-head rows): every stored id is below it."""
        return self.teacher.vocab_size

    @property
    def max_length(self) -> int | None:
        return self.dataset.max_length

    @property
    def heldout(self) -> bool:
        return bool(self.dataset.heldout)

    @property
    def sorted_shards(self) -> list[ShardEntry]:
        return sorted(self.shards, key=lambda s: s.index)

    @property
    def rows(self) -> int:
        """Examples in the listed shards."""
        return sum(s.rows for s in self.shards)

    def part_indices(self) -> list[int]:
        """The shard indices this folder's part holds when complete (all of them for a whole or merged
        cache)."""
        n, part = self.sharding.num_shards or 1, self.sharding.shard_index or 0
        return [i for i in range(self.sharding.total_shards) if i % n == part]


def as_manifest(manifest: Manifest | Mapping[str, Any]) -> Manifest:
    """A Manifest, from itself or from its JSON object (callers that still hold the dict)."""
    return manifest if isinstance(manifest, Manifest) else Manifest.from_dict(manifest)


def as_entry(shard: ShardEntry | Mapping[str, Any]) -> ShardEntry:
    return shard if isinstance(shard, ShardEntry) else ShardEntry.from_dict(shard)


# ---------------------------------------------------------------- the JSON file


class DamagedManifest(KdpipeError):
    """manifest.json is no readable kdpipe manifest (torn, edited, overwritten); the shards may be intact."""


def read_manifest(folder: str | Path | Store) -> dict[str, Any]:
    """The manifest of a cache folder (a path or a URL) as its JSON object, checked for format and version."""
    store = as_store(folder)
    path = store.display(MANIFEST)
    try:
        text = store.read_bytes(MANIFEST) if store.is_file(MANIFEST) else None
    except FileNotFoundError:
        text = None
    if text is None:
        raise KdpipeError(f"{folder} is not a kdpipe cache: {MANIFEST} is missing")
    repair = "rerunning the cache-teacher command that wrote it rebuilds it from the shards' own metadata"
    try:
        manifest = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DamagedManifest(f"{path} is damaged (not valid JSON: {e}); {repair}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DamagedManifest(f"{path} is not a kdpipe cache manifest; if it was one, {repair}")
    version = manifest.get("format_version")
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise KdpipeError(
            f"{path} has cache format version {version}, newer than this kdpipe understands "
            f"({FORMAT_VERSION}); upgrade kdpipe to read it"
        )
    damage = _structure_problem(manifest)
    if damage:
        raise DamagedManifest(f"{path} is damaged ({damage}); {repair}")
    return manifest


# What the code relies on in a manifest, and the types.
_SECTIONS = {"settings_hash": str, "complete": bool, "encoding": str, "totals": dict, "sharding": dict,
             "shards": list, "teacher": dict, "tokenizer": dict, "template": dict, "dataset": dict,
             "sparse": dict}
_SHARD_KEYS = {"file": str, "index": int, "rows": int, "tokens": int, "target_tokens": int, "bytes": int,
               "sha256": str}


def _structure_problem(manifest: dict[str, Any]) -> str | None:
    """Why a manifest that parses is still not one kdpipe can use (None when it is)."""
    if not isinstance(manifest.get("format_version"), int):
        return "no integer format_version"
    for key, kind in _SECTIONS.items():
        if not isinstance(manifest.get(key), kind):
            return f"'{key}' is {'missing' if key not in manifest else 'not a ' + kind.__name__}"
    for key in ("total_shards", "rows_per_shard"):
        if not isinstance(manifest["sharding"].get(key), int):
            return f"sharding.{key} is missing"
    for i, shard in enumerate(manifest["shards"]):
        if not isinstance(shard, dict) or any(not isinstance(shard.get(k), t)
                                              for k, t in _SHARD_KEYS.items()):
            return f"shard entry {i} lacks one of {', '.join(_SHARD_KEYS)}"
    return None


def manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode()


def write_manifest(folder: str | Path | Store, manifest: Manifest | Mapping[str, Any]) -> None:
    """Write the manifest whole (atomic locally and on object storage): a reader never sees half of one."""
    data = manifest.to_dict() if isinstance(manifest, Manifest) else manifest
    as_store(folder).write_bytes(MANIFEST, manifest_bytes(data))
