"""The manifest's sections (teacher, tokenizer, template, dataset, sparse targets, sharding, shards, totals):
typed, frozen, and read and written back byte for byte (see `kdpipe.cache.manifest`, which puts them
together)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from enum import Enum
from typing import Any, TypeVar

from kdpipe.errors import KdpipeError

S = TypeVar("S", bound="Section")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class SparseMode(str, Enum):
    """What a cache stores per position. A str: ``SparseMode.TOPK == "topk"``, as written in the JSON."""

    TOPK = "topk"  # the k most likely ids with their log-probs and the tail mass
    SAMPLED = "sampled"  # N draws from the teacher: distinct ids, counts (an unbiased estimate)


@dataclass(frozen=True)
class Section:
    """A manifest section: typed known keys, `extra` for unknown ones, `absent` for known keys not written."""

    extra: Mapping[str, Any] = field(default_factory=dict, kw_only=True, repr=False)
    absent: frozenset[str] = field(default=frozenset(), kw_only=True, repr=False)

    @classmethod
    def known(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if f.name not in ("extra", "absent"))

    @classmethod
    def from_dict(cls: type[S], data: Mapping[str, Any]) -> S:
        names = cls.known()
        values = {n: cls._load(n, data[n]) for n in names if n in data}
        return cls(**values, extra={k: v for k, v in data.items() if k not in names},
                   absent=frozenset(n for n in names if n not in data))

    @classmethod
    def _load(cls, name: str, value: Any) -> Any:
        """A JSON value -> the field's type (sections override it for their nested fields)."""
        return value

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: known keys in kdpipe's order (those it had), then the unknown ones."""
        out = {n: as_plain(getattr(self, n)) for n in self.known() if n not in self.absent}
        out.update(self.extra)
        return out

    def __getitem__(self, key: str) -> Any:
        """A key as manifest.json has it (plain JSON), for scripts and tests that read that shape (and
        hooks that receive a shard entry); kdpipe's own code uses the typed attributes."""
        return self.to_dict()[key]

    def replace(self: S, **changes: Any) -> S:
        """A copy with `changes` (a key given is written, even if the original lacked it)."""
        return dataclasses.replace(self, absent=self.absent - changes.keys(), **changes)


def as_plain(value: Any) -> Any:
    """A field value -> its JSON form (sections and enums nested anywhere)."""
    if isinstance(value, Section):
        return value.to_dict()
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, tuple):
        return [as_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class TeacherInfo(Section):
    model: str | None = None  # the resolved hub id or path
    revision: str | None = None
    commit: str | None = None
    dtype: str | None = None  # "float32", "bfloat16", ...
    vocab_size: int | None = None  # rows of the teacher's LM head (ids stored are below it)
    backend: str | None = None  # "hf" or "vllm"
    backend_version: str | None = None  # informational: not part of the settings hash


@dataclass(frozen=True)
class TokenizerInfo(Section):
    name: str | None = None
    vocab_hash: str | None = None  # what a student's tokenizer must match
    vocab_size: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None


@dataclass(frozen=True)
class TemplateInfo(Section):
    name: str | None = None
    add_eos: bool | None = None
    distill_prompt: bool | None = None
    label_names: list[str] | None = None


# Dataset keys that are facts about the data read, not settings: outside the settings hash.
DATASET_FACTS = ("examples", "report", "heldout", "file")


@dataclass(frozen=True)
class DatasetInfo(Section):
    source: str | None = None
    split: str | None = None
    part: str | None = None
    heldout_fraction: float | None = None
    seed: int | None = None
    limit: int | None = None
    columns: dict[str, str] | None = None
    fingerprint: str | None = None
    max_length: int | None = None
    truncation: str | None = None
    examples: int | None = None  # examples cached (after skips)
    report: dict[str, int] | None = None  # examples cut or skipped, by what happened to them
    heldout: bool | None = None  # held out from training (absent before kdpipe recorded it)
    file: dict[str, str] | None = None  # a local file's path and sha256


@dataclass(frozen=True)
class SparseSpec(Section):
    """Top-k caches keep the version-1 keys (mode, k) only, so their settings hash is unchanged."""

    mode: SparseMode = SparseMode.TOPK
    k: int = 0  # ids stored per position: k (top-k) or N (sampled: at most N distinct ids)
    samples: int | None = None  # sampled: draws N per position
    proposal_temperature: float | None = None  # sampled: T of the proposal p^(1/T)
    seed: int | None = None  # sampled: the draws' seed

    @classmethod
    def topk(cls, k: int) -> SparseSpec:
        return cls(SparseMode.TOPK, k, absent=frozenset({"samples", "proposal_temperature", "seed"}))

    @classmethod
    def sampled(cls, samples: int, proposal_temperature: float, seed: int) -> SparseSpec:
        return cls(SparseMode.SAMPLED, samples, samples, proposal_temperature, seed)

    @classmethod
    def _load(cls, name: str, value: Any) -> Any:
        if name != "mode":
            return value
        try:
            return SparseMode(value)
        except ValueError:
            known = ", ".join(m.value for m in SparseMode)
            raise KdpipeError(f"unknown sparse mode '{value}' in a cache manifest (known: {known}); "
                              "upgrade kdpipe to read it") from None


@dataclass(frozen=True)
class Sharding(Section):
    rows_per_shard: int = 0
    total_shards: int = 0  # shards of the whole cache
    num_shards: int = 1  # machines the work was split across ...
    shard_index: int = 0  # ... and the part this folder holds


@dataclass(frozen=True)
class ShardEntry(Section):
    file: str = ""
    index: int = 0
    rows: int = 0
    tokens: int = 0
    target_tokens: int = 0
    bytes: int = 0
    sha256: str = ""
    ids_sha256: str | None = None  # absent from caches written before kdpipe recorded it
    stats: dict[str, Any] | None = None  # value statistics at write time (likewise)


@dataclass(frozen=True)
class Totals(Section):
    shards: int | None = None
    rows: int | None = None
    tokens: int | None = None
    target_tokens: int | None = None
    bytes: int | None = None
    bytes_per_target_token: float | None = None

    @classmethod
    def empty(cls) -> Totals:
        """``{}``: what a manifest holds before its first shard is counted."""
        return cls(absent=frozenset(cls.known()))

    @classmethod
    def of(cls, shards: Iterable[ShardEntry]) -> Totals:
        shards = list(shards)
        target = sum(s.target_tokens for s in shards)
        size = sum(s.bytes for s in shards)
        return cls(len(shards), sum(s.rows for s in shards), sum(s.tokens for s in shards), target, size,
                   round(size / target, 2) if target else None)
