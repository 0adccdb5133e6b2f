"""The file `kdpipe generate` writes: JSON lines, appended a batch at a time, and a sidecar of settings.

``data/NAME.jsonl`` holds one row per completion; ``data/NAME.jsonl.kdpipe-generate.json`` (the
sidecar) holds the settings (model, data, sampling), their hash, and, once complete, the row count and
the file's sha256. A batch's rows go to the file in one write, flushed and fsynced; a kill can at
worst leave a last line cut short, which the next run drops (its row is generated again, the same).
A rerun with the same settings therefore continues after the last complete row; with other settings
it is refused, naming what differs.

`provenance` is what a cache of a generated file records in its manifest (see cache-teacher).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from kdpipe.errors import KdpipeError, disk_errors
from kdpipe.faults import fault

SUFFIX = ".kdpipe-generate.json"


def sidecar_path(output: str | Path) -> Path:
    return Path(str(output) + SUFFIX)


def check_not_an_input(output: str | Path, inputs: dict[str, str | None]) -> None:
    """Refuse an output (or its sidecar) that is, or resolves to, one of `inputs` ({option: path}): a symlink,
    a hard link, ``./a/../x`` or the same name; whatever the flags (``--overwrite`` would empty the input)."""
    for written in (Path(output), sidecar_path(output)):
        for option, source in inputs.items():
            if not source or not Path(source).exists():
                continue
            same = written.resolve() == Path(source).resolve() or (
                written.exists() and os.path.samefile(written, source))
            if same:
                raise KdpipeError(f"--output {output} would write over the input {option} {source} (the same "
                                  "file); write the completions to another file")


def settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


class GeneratedFile:
    """An output file being written: what is done, appending batches, the final sidecar."""

    def __init__(self, path: str | Path, settings: dict[str, Any], overwrite: bool, planned: list[str]):
        self.path, self.side = Path(path), sidecar_path(path)
        self.settings, self.hash = settings, settings_hash(settings)
        self.done: list[str] = []
        if self.path.exists() or self.side.exists():
            if overwrite:
                self.path.unlink(missing_ok=True)
                self.side.unlink(missing_ok=True)
            else:
                self._adopt(planned)
        self.complete = len(self.done) == len(planned) and self._read_side().get("complete", False)
        if self.complete:
            edited = edited_since(self.path, self._read_side())
            if edited:
                raise KdpipeError(f"--output {edited}; pass --overwrite to generate it again, or choose "
                                  "another --output")
        if not self.complete:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._write_side({"complete": False})

    def _adopt(self, planned: list[str]) -> None:
        """Keep what a previous run with the same settings wrote (drop a cut-off last line)."""
        if not self.side.exists():
            raise KdpipeError(f"--output {self.path} already exists and was not written by kdpipe generate "
                              f"(no {self.side.name} beside it); choose another --output or pass --overwrite")
        before = self._read_side()
        if before.get("settings_hash") != self.hash:
            changed = _changes(before.get("settings") or {}, self.settings)
            raise KdpipeError(f"--output {self.path} was generated with other settings "
                              f"({'; '.join(changed)}); rerun with the same settings to continue it, "
                              "choose another --output, or pass --overwrite to start again")
        if not self.path.exists():
            return
        keep, ids = 0, []
        with open(self.path, "rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    break  # the last line of a killed write
                try:
                    ids.append(str(json.loads(line)["id"]))
                except (ValueError, KeyError, TypeError):
                    raise KdpipeError(f"--output {self.path}, line {len(ids) + 1}: not a row kdpipe generate "
                                      "wrote (edited?); pass --overwrite to generate it again") from None
                keep += len(line)
        if ids != planned[: len(ids)]:
            raise KdpipeError(f"--output {self.path} holds other rows than these settings give (edited?); "
                              "pass --overwrite to generate it again")
        if keep != self.path.stat().st_size:
            with open(self.path, "r+b") as f:
                f.truncate(keep)
        self.done = ids

    def append(self, rows: list[dict[str, Any]]) -> None:
        """One batch's rows in one write, on disk before returning."""
        data = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows).encode()
        with disk_errors(self.path), open(self.path, "ab") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            fault("mid-write", self.path.name)  # the fault-injection tests' hook (kdpipe.faults): inert
            f.write(data[len(data) // 2 :])
            f.flush()
            os.fsync(f.fileno())
        self.done += [r["id"] for r in rows]

    def finish(self, facts: dict[str, Any]) -> dict[str, Any]:
        """Mark the file complete, with its row count and sha256."""
        record = {"complete": True, "rows": len(self.done), "sha256": file_sha256(self.path), **facts}
        self._write_side(record)
        return self._read_side()

    def _read_side(self) -> dict[str, Any]:
        if not self.side.exists():
            return {}
        try:
            return json.loads(self.side.read_text())
        except ValueError:
            raise KdpipeError(f"{self.side} is not valid JSON (damaged?); pass --overwrite to generate "
                              f"{self.path} again") from None

    def _write_side(self, record: dict[str, Any]) -> None:
        from kdpipe.cache.storage import write_atomic

        body = {"format": "kdpipe-generate", "version": 1, "output": self.path.name,
                "settings": self.settings, "settings_hash": self.hash, **record}
        write_atomic(self.side, (json.dumps(body, indent=2, default=str) + "\n").encode())


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def provenance(dataset: str | None) -> dict[str, Any] | None:
    """Where a generated dataset's text came from (its sidecar), for a cache's manifest; None otherwise.

    `matches` says whether the file is still the one the sidecar describes (same sha256).
    """
    record = _sidecar_of(dataset)
    if record is None:
        return None
    settings = record.get("settings") or {}
    return {"model": settings.get("model"), "backend": settings.get("backend"),
            "sampling": settings.get("sampling"), "settings": settings,
            "settings_hash": record.get("settings_hash"),
            "complete": record.get("complete"), "rows": record.get("rows"),
            "matches": record.get("sha256") == file_sha256(Path(dataset))}


def edited_since(path: Path, record: dict[str, Any]) -> str | None:
    """How a finished file differs from its sidecar's record ("PATH was changed after ..."), None when it
    is the file kdpipe generate finished (or not finished yet)."""
    now = file_sha256(path) if record.get("complete") and record.get("sha256") else None
    if now in (None, record.get("sha256")):
        return None
    with open(path, "rb") as f:
        lines = sum(1 for _ in f)
    return (f"{path} was changed after kdpipe generate finished it (sha256 {now[:12]}..., "
            f"recorded {record['sha256'][:12]}...; {lines} lines, {record.get('rows')} rows recorded in "
            f"{sidecar_path(path).name})")


def check_unedited(dataset: str | None) -> None:
    """Refuse a generated file edited after it was finished: its cache would record a provenance (model,
    sampling) that no longer describes its text."""
    record = _sidecar_of(dataset)
    edited = edited_since(Path(dataset), record) if record else None  # type: ignore[arg-type]
    if edited:
        raise KdpipeError(
            f"--dataset {edited}, so the generation settings beside it no longer describe its text. Generate "
            "it again (kdpipe generate ... --overwrite), or, if the edit is on purpose, remove "
            f"{sidecar_path(dataset).name} to cache it as a plain dataset"  # type: ignore[arg-type]
        )


def generated_template(dataset: str | None) -> str | None:
    """The template a generated file was written for (its prompts and output field), None otherwise."""
    return ((_sidecar_of(dataset) or {}).get("settings") or {}).get("template")


def _sidecar_of(dataset: str | None) -> dict[str, Any] | None:
    """The sidecar beside a local dataset file, None when there is none (or it does not parse)."""
    if not dataset or dataset.startswith("kdpipe:") or not Path(dataset).is_file():
        return None
    side = sidecar_path(dataset)
    if not side.is_file():
        return None
    try:
        return json.loads(side.read_text())
    except ValueError:
        return None


def _changes(before: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    """'key: old -> new' for every setting that differs (nested keys dotted)."""
    out = []
    for key in sorted(set(before) | set(now)):
        a, b = before.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changes(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out or ["the settings hash differs"]
