"""The one exception kdpipe raises for bad input: the CLI prints its message and exits non-zero."""

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click


class KdpipeError(click.ClickException):
    """A user-facing error: one clear paragraph naming the file, row or option at fault."""

    exit_code = 2


DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@contextmanager
def disk_errors(path: str | Path) -> Iterator[None]:
    """Turn "no space left" (ENOSPC, EDQUOT, or EFBIG from a file size limit) while writing `path` into a KdpipeError."""
    try:
        yield
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        raise KdpipeError(
            f"cannot write {path}: {e.strerror} (the disk is full or a file size limit was reached). "
            "Free some space and rerun the same command: what was finished is kept"
        ) from None
