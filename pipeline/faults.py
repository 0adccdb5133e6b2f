"""A test hook for the fault-injection tests: stop or kill this process at a named point of a file write.

``KDPIPE_FAULT=POINT:FILE[:N[:SIGNAL]]`` sends SIGNAL (default KILL; STOP freezes the process, lock
held) to this process the N-th time (default 1) it reaches POINT while writing a file named FILE:

- ``mid-write``: half of the file's bytes are in its temporary file, the rest not yet written;
- ``renamed``: the file was renamed into place (for a shard: before the manifest records it).

With ``KDPIPE_FAULT_ONCE=MARKER`` (a file path) the signal is sent only if MARKER does not exist yet,
and MARKER is created first: a run retried with the same environment (by Ray, by a scheduler) then
gets past the point, and MARKER's mtime is the moment of the fault.

Unset (always, outside the tests), `fault` is one dictionary lookup per file written.
"""

from __future__ import annotations

import os
import signal

_hits: dict[tuple[str, str], int] = {}


def fault(point: str, name: str) -> None:
    """Send the signal named by ``KDPIPE_FAULT`` if it names this point and file, at its N-th hit."""
    spec = os.environ.get("KDPIPE_FAULT")
    if not spec:
        return
    parts = spec.split(":")
    want_point, want_name, n, sig = parts + ["1", "KILL"][len(parts) - 2 :]
    if (want_point, want_name) != (point, name):
        return
    _hits[point, name] = _hits.get((point, name), 0) + 1
    if _hits[point, name] != int(n):
        return
    once = os.environ.get("KDPIPE_FAULT_ONCE")
    if once:
        try:
            open(once, "x").close()
        except FileExistsError:
            return
    os.kill(os.getpid(), getattr(signal, f"SIG{sig}"))
