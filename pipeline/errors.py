"""The one exception kdpipe raises for bad input: the CLI prints its message and exits non-zero.

`KdpipeError` is a plain exception, so library modules do not depend on the CLI package; `kdpipe.cli`
turns it into click's "Error: MESSAGE" and exit code `KdpipeError.exit_code`.
"""

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class KdpipeError(Exception):
    """A user-facing error: one clear paragraph naming the file, row or option at fault."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (at most `limit` characters), or its type's name when it
    has none: what a KdpipeError quotes of an error from a library."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__


DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@contextmanager
def disk_errors(path: str | Path) -> Iterator[None]:
    """Turn "no space left" (ENOSPC, EDQUOT, or EFBIG from a file size limit) while writing `path` into a
    KdpipeError."""
    try:
        yield
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        raise KdpipeError(
            f"cannot write {path}: {e.strerror} (the disk is full or a file size limit was reached). "
            "Free some space and rerun the same command: what was finished is kept"
        ) from None
