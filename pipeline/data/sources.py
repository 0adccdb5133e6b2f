"""Datasets: hub names, local JSONL/JSON/CSV/Parquet files and the built-in ``kdpipe:`` tasks.

`load_examples` returns the selected rows as `Example`s with stable ids: split, column mapping,
a deterministic held-out part (by a hash of the id, so an example never changes sides when the
dataset grows or `limit` changes), then `limit`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kdpipe.config import option
from kdpipe.data import arithmetic
from kdpipe.errors import KdpipeError, first_line

log = logging.getLogger(__name__)

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}

# Defaults for the datasets the published experiments use: the template and how its fields map to columns.
KNOWN_DATASETS: dict[str, dict[str, Any]] = {
    "imdb": {"template": "sentiment"},
    "stanfordnlp/imdb": {"template": "sentiment"},
    "stanfordnlp/sst2": {"template": "sentiment", "columns": {"text": "sentence"}},
    "sst2": {"template": "sentiment", "columns": {"text": "sentence"}},
    "yahma/alpaca-cleaned": {"template": "alpaca"},
    "tatsu-lab/alpaca": {"template": "alpaca"},
    "timdettmers/openassistant-guanaco": {"template": "guanaco"},
    "kdpipe:arithmetic": {"template": "arithmetic"},
    "kdpipe:arithmetic-long": {"template": "arithmetic"},
}


@dataclass
class DataConfig:
    """Which examples to use and how to turn them into tokens."""

    dataset: str | None = option(None, "Hub dataset name, local .jsonl/.json/.csv/.parquet file, or "
                                       "kdpipe:arithmetic.")
    split: str = option("train", "Dataset split.")
    part: Literal["all", "train", "heldout"] = option(
        "all", "Which part of the split: all, train (without the held-out part) or heldout."
    )
    heldout_fraction: float = option(0.05, "Fraction of the split held out (by a hash of each example id).")
    limit: int | None = option(None, "Use at most this many examples (after choosing the part).")
    columns: dict[str, str] = option({}, "Template field to dataset column mapping, e.g. "
                                         "text=sentence,label=y.")
    id_column: str | None = option(None, "Column with a stable example id (default: 'id' if present, else "
                                         "the row index).")
    template: str = option("auto", "alpaca, sentiment, sentiment-think, guanaco, chat, text, arithmetic, a "
                                   "template .yaml file, or auto.")
    label_names: list[str] = option(["negative", "positive"],
                                    "Names for integer labels (sentiment templates).")
    max_length: int = option(2048, "Longest tokenized example.")
    truncation: Literal["error", "skip", "truncate", "truncate-prompt"] = option(
        "truncate", "Over-long examples: error, skip, truncate (cut the end) or truncate-prompt (cut the "
                    "prompt's start)."
    )
    distill_prompt: bool = option(False, "Distill every token, not only the completion.")
    seed: int = option(0, "Seed of the held-out split and of everything random.")

    def __post_init__(self) -> None:
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in [0, 1), not {self.heldout_fraction}")
        if self.part != "all" and self.heldout_fraction == 0.0:
            raise ValueError(f"part={self.part} needs heldout_fraction > 0")
        if self.limit is not None and self.limit <= 0:
            raise ValueError(f"limit must be positive, not {self.limit}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2, not {self.max_length}")

    def resolved_template(self) -> str:
        if self.template != "auto":
            return self.template
        from kdpipe.data.generated import generated_template  # a file of `kdpipe generate` knows its template

        return (KNOWN_DATASETS.get(self.dataset or "", {}).get("template") or generated_template(self.dataset)
                or "alpaca")

    def resolved_columns(self) -> dict[str, str]:
        return {**KNOWN_DATASETS.get(self.dataset or "", {}).get("columns", {}), **self.columns}


@dataclass
class Example:
    """One dataset row: a stable id and its fields (template field names, after column mapping)."""

    id: str
    fields: dict[str, Any]


@dataclass
class Selection:
    """The chosen examples and what identifies them."""

    examples: list[Example]
    source: str
    columns: list[str]
    fingerprint: str = field(default="")
    file: dict[str, str] | None = None  # a local file's absolute path and sha256 (where the data came from)


def load_examples(cfg: DataConfig) -> Selection:
    """Load, map columns, select the part, apply `limit`; a clear error for any bad input."""
    if not cfg.dataset:
        raise KdpipeError("no dataset given: pass --dataset (a hub name, a local file or kdpipe:arithmetic)")
    rows, columns = _read_rows(cfg.dataset, cfg.split)
    if not rows:
        raise KdpipeError(f"dataset {cfg.dataset} (split {cfg.split}) is empty")
    mapping = cfg.resolved_columns()
    for name, column in mapping.items():
        if column not in columns:
            raise KdpipeError(
                f"dataset {cfg.dataset} has no column '{column}' (mapped to field '{name}'); "
                f"columns: {', '.join(columns)}"
            )
    id_column = cfg.id_column or ("id" if "id" in columns else None)
    if cfg.id_column and cfg.id_column not in columns:
        raise KdpipeError(f"dataset {cfg.dataset} has no id column '{cfg.id_column}'; "
                          f"columns: {', '.join(columns)}")
    examples, seen = [], set()
    for index, row in enumerate(rows):
        fields = dict(row)
        for name, column in mapping.items():
            fields[name] = row[column]
        example_id = str(row[id_column]) if id_column else f"{cfg.split}-{index}"
        if example_id in seen:
            raise KdpipeError(f"dataset {cfg.dataset}: example id '{example_id}' (row {index}) appears twice")
        seen.add(example_id)
        examples.append(Example(example_id, fields))
    examples = _drop_empty_generations(cfg, examples)
    if cfg.part != "all":
        want_heldout = cfg.part == "heldout"
        examples = [e for e in examples if is_heldout(e.id, cfg.heldout_fraction, cfg.seed) == want_heldout]
    if cfg.limit is not None:
        examples = examples[: cfg.limit]
    if not examples:
        raise KdpipeError(f"no examples left in {cfg.dataset} after choosing part={cfg.part}, "
                          f"limit={cfg.limit}")
    return Selection(examples, cfg.dataset, columns, fingerprint(examples), source_file(cfg.dataset))


def source_file(source: str) -> dict[str, str] | None:
    """{"path", "sha256"} of a local dataset file, None for the hub and the built-in datasets."""
    path = Path(source)
    if source.startswith("kdpipe:") or not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"path": str(path.resolve()), "sha256": h.hexdigest()}


def is_heldout(example_id: str, fraction: float, seed: int) -> bool:
    """Deterministic membership of the held-out part, from a hash of (seed, id)."""
    digest = hashlib.sha256(f"{seed}:{example_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def fingerprint(examples: Sequence[Example]) -> str:
    """sha256 over the selected examples' ids and fields: same data, same fingerprint."""
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.id, e.fields], sort_keys=True, default=str).encode())
    return h.hexdigest()


def _read_rows(source: str, split: str) -> tuple[list[dict[str, Any]], list[str]]:
    if source.startswith("kdpipe:"):
        if source not in arithmetic.BUILTIN:
            raise KdpipeError(f"unknown built-in dataset {source}; the built-in ones are "
                              f"{', '.join(arithmetic.BUILTIN)}")
        try:
            rows = arithmetic.BUILTIN[source](split)
        except ValueError as e:
            raise KdpipeError(str(e)) from None
        return rows, list(rows[0])
    path = Path(source)
    if path.suffix.lower() in LOCAL_FORMATS or path.exists():
        return _read_local(path)
    return _read_hub(source, split)


def _read_local(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    import datasets

    fmt = LOCAL_FORMATS.get(path.suffix.lower())
    if path.is_dir():
        raise KdpipeError(f"dataset {path} is a directory; --dataset takes one "
                          f"{'/'.join(LOCAL_FORMATS)} file (or a hub dataset name or kdpipe:arithmetic)")
    if not path.is_file():
        raise KdpipeError(f"dataset file {path} does not exist")
    if path.stat().st_size == 0:
        raise KdpipeError(f"dataset file {path} is empty (0 bytes); it needs at least one example")
    if fmt is None:
        raise KdpipeError(f"dataset file {path}: unsupported type; use one of {', '.join(LOCAL_FORMATS)}")
    if fmt == "json":
        _check_json_lines(path)
    try:
        ds = datasets.load_dataset(fmt, data_files=str(path), split="train")
    except Exception as e:  # datasets raises many types; the file is the user's, so say which
        raise KdpipeError(f"dataset file {path} could not be read as {fmt}: {first_line(e)}") from None
    return ds.to_list(), list(ds.column_names)


def _check_json_lines(path: Path) -> None:
    """Name the first malformed line of a JSONL file (datasets' own message does not)."""
    with open(path, "rb") as f:
        head = f.read(1).lstrip()
    if head == b"[":  # a JSON array, not JSON lines
        return
    objects = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise KdpipeError(f"dataset file {path}, line {number}: not UTF-8 "
                                  f"({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise KdpipeError(f"dataset file {path}, line {number}: malformed JSON ({e.msg})") from None
            if not isinstance(value, dict):
                raise KdpipeError(f"dataset file {path}, line {number}: expected a JSON object, "
                                  f"got {type(value).__name__}")
            objects += 1
    if not objects:
        raise KdpipeError(f"dataset file {path} holds no example (only blank lines); "
                          "it needs at least one JSON object")


def _read_hub(name: str, split: str) -> tuple[list[dict[str, Any]], list[str]]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except ValueError as e:
        if "split" in str(e).lower():
            raise KdpipeError(f"dataset {name} has no split '{split}': {first_line(e)}") from None
        raise KdpipeError(f"dataset {name} could not be loaded: {first_line(e)}") from None
    except Exception as e:
        offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (offline mode is on: HF_DATASETS_OFFLINE/HF_HUB_OFFLINE)" if offline else ""
        raise KdpipeError(
            f"dataset {name} could not be loaded from the hub{hint}: {first_line(e)}. "
            "Check the name, your network, or pass a local .jsonl/.csv/.parquet file"
        ) from None
    return ds.to_list(), list(ds.column_names)


def _drop_empty_generations(cfg: DataConfig, examples: list[Example]) -> list[Example]:
    """A file of `kdpipe generate` may hold completions that stopped at once (a barely trained student):
    no template can train on an empty output, so those rows are left out, and the console says how many."""
    from kdpipe.data.generated import generated_template

    name = generated_template(cfg.dataset)
    if name is None:
        return examples
    from kdpipe.data.templates import get_template

    field = get_template(name, cfg.label_names).output_field()
    kept = [e for e in examples if str(e.fields.get(field) or "").strip()]
    if len(kept) < len(examples):
        log.warning(f"note: {len(examples) - len(kept)} of the {len(examples)} generated rows of "
                    f"{cfg.dataset} have an empty '{field}' (the model stopped at once); they are left out")
    return kept

