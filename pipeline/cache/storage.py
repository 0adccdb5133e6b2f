"""Where a cache lives: a local folder, or a prefix on object storage (``s3://``, ``gs://``, any fsspec URL).

One code path serves both through `pyarrow.fs`: `Store.open(url)` picks pyarrow's own filesystem for
``s3://``, ``gs://``, ``hdfs://`` and local paths, and wraps fsspec for other protocols (``az://``,
``memory://`` ...). Credentials and endpoints come from the usual environment (``AWS_ACCESS_KEY_ID``,
``AWS_ENDPOINT_URL``, ``GOOGLE_APPLICATION_CREDENTIALS`` ...).

What "atomic" means where:
- local folder: a file is written to a temp name, fsynced and renamed (`write_atomic`); the writer
  holds a `filelock` ``.lock`` file; Parquet is read memory-mapped.
- object storage: an object is written whole in one upload (a PUT, or a multipart upload completed
  only when the stream closes), so a reader never sees part of one and a crash leaves no object.
  There is no rename, fsync or lock: one writer per cache prefix (each ``--shard-index`` writes its
  own prefix; ``kdpipe cache merge`` joins them), which a ``.writer`` marker enforces after the fact
  (`Lease`: a writer stops when another one started on its prefix); the manifest is written after
  each shard, and a resume lists the shard objects and adopts those the manifest missed after
  checking them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from kdpipe.errors import KdpipeError, disk_errors, first_line
from kdpipe.faults import fault
from kdpipe.filemode import umask

_NATIVE = ("s3", "gs", "gcs", "hdfs", "viewfs")


def is_url(path: str | Path) -> bool:
    """An object-storage / fsspec URL (``scheme://...``), as opposed to a local path or ``file://`` URL."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


@dataclass(frozen=True)
class Store:
    """A cache folder or prefix: ``url`` (the location as given, a local path normalised), ``fs`` and
    ``root`` (the path inside `fs`)."""

    url: str
    fs: pafs.FileSystem
    root: str
    local: bool

    @classmethod
    def open(cls, location: str | Path) -> Store:
        text = str(location)
        if not is_url(text):
            path = str(Path(text.removeprefix("file://")))
            return cls(path, pafs.LocalFileSystem(), path, True)
        scheme = text.split("://", 1)[0].lower()
        try:
            try:
                if scheme not in _NATIVE:
                    raise NotImplementedError(scheme)
                fs, root = pafs.FileSystem.from_uri(text)
            except NotImplementedError:  # not one of pyarrow's own (or this pyarrow was built without it)
                import fsspec

                ffs, root = fsspec.core.url_to_fs(text)
                fs = pafs.PyFileSystem(pafs.FSSpecHandler(ffs))
        except ImportError as e:
            raise KdpipeError(
                f"{text}: the filesystem for '{scheme}://' is not installed ({e}); install its fsspec package"
            ) from None
        except (OSError, ValueError) as e:
            raise KdpipeError(f"cannot open {text}: {first_line(e)}") from None
        return cls(text.rstrip("/"), fs, root.rstrip("/"), False)

    def __str__(self) -> str:
        return self.url

    # ---------------------------------------------------------------- names

    def display(self, name: str) -> str:
        """How a file of the store is named in messages: a path or a URL."""
        return str(Path(self.root) / name) if self.local else f"{self.url}/{name}"

    def path(self, name: str) -> str:
        return str(Path(self.root) / name) if self.local else f"{self.root}/{name}"

    # ---------------------------------------------------------------- queries

    def is_file(self, name: str) -> bool:
        if self.local:
            return Path(self.path(name)).is_file()
        with self._errors(name):
            return self.fs.get_file_info(self.path(name)).type == pafs.FileType.File

    def size(self, name: str) -> int:
        if self.local:
            return Path(self.path(name)).stat().st_size
        with self._errors(name):
            return int(self.fs.get_file_info(self.path(name)).size)

    def names(self) -> list[str]:
        """The files directly in the folder (none when it does not exist)."""
        if self.local:
            root = Path(self.root)
            return sorted(p.name for p in root.iterdir()) if root.is_dir() else []
        with self._errors(""):
            infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True, recursive=False))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.File)

    def exists(self) -> bool:
        """The folder (or, on object storage, at least one object under the prefix) exists."""
        if self.local:
            return Path(self.root).exists()
        return bool(self.names())

    # ---------------------------------------------------------------- reading

    def read_bytes(self, name: str) -> bytes:
        if self.local:
            return Path(self.path(name)).read_bytes()
        with self._errors(name), self.fs.open_input_stream(self.path(name)) as f:
            return f.read()

    def sha256(self, name: str) -> str:
        """sha256 of a file, streamed a MiB at a time."""
        h = hashlib.sha256()
        with self._errors(name), self.fs.open_input_stream(self.path(name)) as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()

    def parquet(self, name: str) -> pq.ParquetFile:
        """A Parquet file of the store: memory-mapped when local, read through the filesystem otherwise."""
        if self.local:
            return pq.ParquetFile(self.path(name), memory_map=True)
        with self._errors(name):
            return pq.ParquetFile(self.fs.open_input_file(self.path(name)))

    # ---------------------------------------------------------------- writing

    def makedirs(self) -> None:
        if self.local:
            Path(self.root).mkdir(parents=True, exist_ok=True)
        # object storage: a prefix exists as soon as an object is under it

    def check_writable(self, option: str = "--cache") -> None:
        """Refuse, before any expensive work, a local folder that cannot be written: a path that is (or runs
        through) a regular file, or a folder (or the nearest existing parent of one to be made) not writable.
        Object storage says so on the first upload."""
        if not self.local:
            return
        target = Path(self.root)
        existing = next(p for p in [target, *target.parents] if p.exists())
        if not existing.is_dir():
            what = "is a file" if existing == target else f"runs through the file {existing}"
            raise KdpipeError(
                f"{option} {target} {what}, not a folder; give a folder path (created if missing)"
            )
        try:
            tempfile.TemporaryFile(dir=existing).close()  # the truth, also for read-only mounts and ACLs
        except OSError as e:
            where = "" if existing == target else f" (it would be made inside {existing})"
            raise KdpipeError(
                f"{option} {target} cannot be written{where}: {e.strerror}; choose a folder you can write to"
            ) from None

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write a whole file: temp + fsync + rename locally, one upload on object storage (atomic both
        ways)."""
        if self.local:
            write_atomic(Path(self.path(name)), data)
            return
        with self._errors(name), self.fs.open_output_stream(self.path(name)) as f:
            f.write(data)

    def delete(self, name: str) -> None:
        """Remove a file if it is there."""
        if self.local:
            Path(self.path(name)).unlink(missing_ok=True)
            return
        with contextlib.suppress(FileNotFoundError), self._errors(name):
            self.fs.delete_file(self.path(name))

    def copy_from(self, source: Store, name: str) -> None:
        """Put `source`'s file `name` here: a hard link between local folders when possible, else a copy."""
        if self.local and source.local:
            try:
                os.link(source.path(name), self.path(name))
            except OSError:
                shutil.copy2(source.path(name), self.path(name))
            return
        if self.local:
            self.write_bytes(name, source.read_bytes(name))
            return
        with self._errors(name):
            pafs.copy_files(
                source.path(name),
                self.path(name),
                source_filesystem=source.fs,
                destination_filesystem=self.fs,
            )

    @contextlib.contextmanager
    def writer_lock(self) -> Iterator[Lease]:
        """The right to write: a held ``.lock`` file locally; a `Lease` object on object storage."""
        if not self.local:
            lease = Lease(self)
            try:
                yield lease
            finally:
                lease.release()
            return
        from filelock import FileLock, Timeout

        lock = FileLock(self.path(".lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise KdpipeError(
                f"another kdpipe process is writing to {self.root} (its .lock is held); "
                "wait for it or use another --cache"
            ) from None
        try:
            yield Lease(None)
        finally:
            lock.release()

    @contextlib.contextmanager
    def _errors(self, name: str) -> Iterator[None]:
        """Filesystem errors (no bucket, no credentials, network) as a message naming the file."""
        try:
            yield
        except FileNotFoundError:
            raise
        except OSError as e:
            if "not found" in str(e).lower() or "does not exist" in str(e).lower():
                raise FileNotFoundError(self.display(name)) from None
            raise KdpipeError(f"{self.display(name)}: {first_line(e)}") from None


class Lease:
    """Detects a second writer on object storage, which has no lock: the last writer to start owns the prefix.

    Starting writes a ``.writer`` object holding a token of this process; `check` (before each manifest
    update) reads it back and stops this writer if another one started since. Both would write the same
    shard bytes (a shard is a function of the run's settings), so the survivor's manifest stays right.
    Locally the ``.lock`` file already excludes a second writer and `check` does nothing.
    """

    NAME = ".writer"

    def __init__(self, store: Store | None):
        self.store = store
        self.token = f"{socket.gethostname()} pid {os.getpid()} {uuid.uuid4().hex}".encode()
        if store is not None:
            store.write_bytes(self.NAME, self.token)

    def _current(self) -> bytes:
        try:
            return self.store.read_bytes(self.NAME) if self.store is not None else b""
        except FileNotFoundError:
            return b""

    def check(self) -> None:
        if self.store is None:
            return
        current = self._current()
        if current != self.token:
            raise KdpipeError(
                f"another kdpipe process started writing {self.store.url} "
                f"({current.decode(errors='replace') or 'its marker is gone'}); "
                "this one stops: one writer per prefix (give each --shard-index its own prefix)"
            )

    def release(self) -> None:
        """Remove the marker when it is still this writer's."""
        if self.store is not None and self._current() == self.token:
            self.store.delete(self.NAME)


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temp file in the same folder, fsynced, then renamed.

    A full disk is a `KdpipeError` naming the file; the `fault` calls are the fault-injection tests'
    hook (`kdpipe.faults`), inert unless ``KDPIPE_FAULT`` is set.
    """
    with disk_errors(path):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o666 & ~umask())  # mkstemp's 0600 ignores the umask; an open() would honour it
            with os.fdopen(fd, "wb") as f:
                view = memoryview(data)
                f.write(view[: len(view) // 2])
                f.flush()
                fault("mid-write", path.name)
                f.write(view[len(view) // 2 :])
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    fault("renamed", path.name)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def as_store(location: str | Path | Store) -> Store:
    return location if isinstance(location, Store) else Store.open(location)
