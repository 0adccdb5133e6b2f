"""The mode of the files kdpipe writes: every output honours the process's umask.

Plain Python (no pyarrow, no torch) so that the CLI's lightest commands can import it. Libraries that write
through a private temp file (transformers' save_pretrained, tempfile.mkstemp) leave 0600 files behind;
`honour_umask` gives them the mode an ordinary open() would have.
"""

from __future__ import annotations

import os
from pathlib import Path


def umask() -> int:
    """The process's umask (read by setting it and putting it back: os has no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(folder: Path) -> None:
    """Give the files a library wrote 0600 into `folder` (transformers' save_pretrained writes its weights
    through a temp file, so they end up private) the mode the umask gives every other output."""
    mode = 0o666 & ~umask()
    for path in [folder] if folder.is_file() else folder.rglob("*") if folder.is_dir() else []:
        if path.is_file() and not path.is_symlink() and (path.stat().st_mode & 0o777) == 0o600 != mode:
            path.chmod(mode)
