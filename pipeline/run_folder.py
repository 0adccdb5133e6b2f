"""A run folder's bookkeeping: its file names, the run record, the lock, checkpoints, JSON reading.

`train-student` and `finetune` write into one folder (``--output``): Trainer's ``checkpoint-N/``
folders, ``kdpipe_run.json`` (options, command, status, log history) and at the end the model. `kdpipe
run` and `kdpipe evaluate` read the same files. Everything here is plain Python (no torch), so the
planner and the CLI can inspect folders without loading the training stack.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kdpipe.errors import KdpipeError, first_line

log = logging.getLogger(__name__)

RUN_FILE = "kdpipe_run.json"  # the run record of train-student / finetune
LOCK_FILE = ".lock"  # held by the running train-student / finetune for its whole run
INIT_FILE = "kdpipe_init.json"  # written by init-model: the options the model was built with
EXPERIMENT_FILE = "kdpipe_experiment.json"  # written by `kdpipe run` above its step folders, read by evaluate


def slug(text: str) -> str:
    """`text` as a folder name: runs of anything but letters, digits, `_`, `.` and `-` become one `-`."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


def read_json(path: str | Path, missing_ok: bool = True) -> dict[str, Any] | None:
    """The JSON object in `path`; a missing, torn or unreadable file is None (a record that is not there),
    or with ``missing_ok=False`` a KdpipeError naming the file."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        if missing_ok:
            return None
        raise KdpipeError(f"{path} could not be read as JSON: {first_line(e)}") from None


def write_json(path: Path, record: dict[str, Any]) -> None:
    """Write `record` to `path` atomically (a reader never sees half a record)."""
    from kdpipe.cache.storage import write_atomic

    write_atomic(path, (json.dumps(record, indent=2, default=str) + "\n").encode())


def now() -> str:
    from kdpipe.cache.writer import now as _now

    return _now()


def holds_other_files(out: Path) -> bool:
    """`out` exists and holds something besides the lock file (or is not a folder)."""
    return out.exists() and (not out.is_dir() or any(p.name != LOCK_FILE for p in out.iterdir()))


# ---------------------------------------------------------------- the lock


def locked(run_fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a stage's `run(cfg, ...)`: it holds its run folder's lock (``OUTPUT/.lock``) throughout; a
    `--resume` of a run that already finished (`Finished`, raised by `check_output`) returns its record."""
    @functools.wraps(run_fn)
    def run(cfg: Any, *args: Any, **kwargs: Any) -> Any:
        with run_lock(Path(cfg.output_folder())):
            try:
                return run_fn(cfg, *args, **kwargs)
            except Finished as done:
                return done.record
    return run


class Finished(Exception):  # noqa: N818  (not an error: the way out of a stage that has nothing to do)
    """--resume of a run whose record says complete: nothing to train, the record is the result."""

    def __init__(self, record: dict[str, Any]):
        super().__init__("finished")
        self.record = record


@contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """The right to write run folder `out`: a second run into it fails at once (the checks before training
    write nothing, so without this two runs would both pass them and mix their outputs).

    A folder made only for the lock is removed again when the run fails before writing anything.
    """
    if int(os.environ.get("RANK", "0")) != 0 or (out.exists() and not out.is_dir()):  # a file: check_output
        yield
        return
    from filelock import FileLock, Timeout

    from kdpipe.cache.storage import Store

    Store.open(str(out)).check_writable("--output")  # a read-only mount: said now, not after hours of work
    made = [p for p in (out, *out.parents) if not p.exists()]
    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(out / LOCK_FILE)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise KdpipeError(f"another kdpipe run is writing to {out} (its {LOCK_FILE} is held); wait for it to "
                          "finish or choose another --output") from None
    try:
        yield
    finally:
        lock.release()
        if made and [p.name for p in out.iterdir()] == [LOCK_FILE]:
            (out / LOCK_FILE).unlink()
            for folder in made:
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()


# ---------------------------------------------------------------- the run record


def check_output(cfg: Any, kind: str, identity: dict[str, Any]) -> str | None:
    """Check the run folder (writing nothing); returns the checkpoint to resume from, or None.

    A folder that already holds something is refused unless --resume, which needs a checkpoint and
    the same model and data; nothing that is there is ever deleted.
    """
    out = Path(cfg.output)
    previous = read_json(out / RUN_FILE)
    if int(os.environ.get("RANK", "0")) != 0:  # multi-process run: the main process checks and records
        if cfg.resume and previous is not None and previous.get("status") == "complete":
            raise Finished(previous)  # as the main process does: no process trains
        return last_checkpoint(out) if cfg.resume else None
    if cfg.resume:
        checkpoint = last_checkpoint(out, echo=log.warning)
        # an unfinished run without a checkpoint starts over; a finished one has nothing to resume
        if checkpoint is None and (previous is None or previous.get("status") == "complete"):
            raise KdpipeError(
                f"--resume: {out} holds no checkpoint to resume from (Trainer writes checkpoint-N/ every "
                "--save-steps "
                "steps); start a new run without --resume"
            )
        if previous is not None:
            if previous.get("kind") != kind:
                raise KdpipeError(f"--resume: {out} holds a `kdpipe {previous.get('kind')}` run, not a "
                                  f"`kdpipe {kind}` run")
            before = previous.get("identity", {})
            changed = [k for k, v in identity.items() if before.get(k) != v]
            if changed:
                was = ", ".join(f"{k}={before.get(k)}" for k in changed)
                raise KdpipeError(
                    f"--resume: {out} was trained with another {', '.join(changed)} ({was}); "
                    "resume with the same model and data, or choose another --output"
                )
            check_same_options(cfg, previous, out)
            if previous.get("status") == "complete":
                log.warning(f"{out} is already complete ({previous.get('global_step')} steps): --resume has "
                            "nothing to do (the model there is kept as it is)")
                raise Finished(previous)
    else:
        checkpoint = None
        if holds_other_files(out):
            what = f"a `kdpipe {previous.get('kind')}` run" if previous else "other files"
            hint = " (pass --resume to continue it from its last checkpoint)" if last_checkpoint(out) else ""
            raise KdpipeError(f"output folder {out} already holds {what}{hint}; choose another --output or "
                              "remove it yourself")
    return checkpoint


# Options that may differ on --resume: the output (spelled another way), those the identity checks (model,
# cache, data: compared by content) and bookkeeping that does not change what is trained.
RESUMABLE_CHANGES = {"resume", "output", "model", "cache", "dataset", "verify", "logging_steps", "save_steps",
                     "save_total_limit", "report_to", "run_name", "num_workers"}


def check_same_options(cfg: Any, previous: dict[str, Any], out: Path) -> None:
    """--resume continues the recorded run: an option that changes what is trained (--lr, --max-steps, ...)
    is refused, not written into the record over the options the checkpoints were trained with."""
    from kdpipe.config import to_dict

    before, now_ = previous.get("config") or {}, to_dict(cfg)
    changed = [k for k in now_ if k in before and k not in RESUMABLE_CHANGES and before[k] != now_[k]]
    if changed:
        was = ", ".join(f"--{k.replace('_', '-')} {before[k]} (now {now_[k]})" for k in changed)
        raise KdpipeError(
            f"--resume: {out} was trained with {was}; resume with the recorded options, or train with the "
            "new ones into another --output"
        )


def start_run(cfg: Any, kind: str, identity: dict[str, Any], command: str, checkpoint: str | None,
              used: dict[str, Any] | None = None) -> Path:
    """Create the run folder and record the run as running (call after `check_output` and every other
    check). `used`: what the run settled on where it differs from an option as asked (``batching``: the
    fallback when packing cannot apply), recorded beside the options, which stay as given so that
    ``--resume`` compares like with like."""
    import kdpipe
    from kdpipe.config import to_dict

    out = Path(cfg.output)
    if int(os.environ.get("RANK", "0")) != 0:
        return out
    run_file = out / RUN_FILE
    previous = read_json(run_file)
    out.mkdir(parents=True, exist_ok=True)
    record = previous if (cfg.resume and previous) else {"kind": kind, "identity": identity, "created": now()}
    record.update({"kdpipe_version": kdpipe.__version__, "status": "running", "updated": now(),
                   "config": to_dict(cfg), "command": command, "used": used or {}})
    if checkpoint:
        record.setdefault("resumed_from", []).append(Path(checkpoint).name)
    write_json(run_file, record)
    return out


# ---------------------------------------------------------------- checkpoints


def last_checkpoint(folder: Path, echo: Callable[[str], None] | None = None) -> str | None:
    """The checkpoint-N folder with the largest N that holds Trainer's state and intact weight files (a
    complete checkpoint); `echo` is told about each newer one passed over as damaged."""
    if not folder.is_dir():
        return None
    found = []
    for path in folder.glob("checkpoint-*"):
        step = path.name.removeprefix("checkpoint-")
        if path.is_dir() and step.isdigit() and read_json(path / "trainer_state.json") is not None:
            # Trainer writes trainer_state.json last: a kill mid-save leaves none or a torn one
            found.append((int(step), str(path)))
    for _, path in sorted(found, reverse=True):
        damaged = damaged_files(Path(path))
        if not damaged:
            return path
        if echo:
            echo(f"note: {path} is damaged ({', '.join(damaged)}); passing over it to an earlier checkpoint")
    return None


def damaged_files(checkpoint: Path) -> list[str]:
    """Weight and state files of a checkpoint that are cut short: a safetensors file shorter or longer than
    its header says, a torch.save zip without its end record (a disk that filled, a copy that stopped)."""
    import zipfile

    damaged = []
    for file in sorted(checkpoint.iterdir()):
        if file.suffix == ".safetensors":
            try:
                with open(file, "rb") as f:
                    size = int.from_bytes(f.read(8), "little")
                    header = json.loads(f.read(size))
                end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
                ok = file.stat().st_size == 8 + size + end
            except (OSError, ValueError, KeyError, TypeError):
                ok = False
        elif file.suffix in (".pt", ".pth", ".bin"):
            ok = zipfile.is_zipfile(file)
        else:
            continue
        if not ok:
            damaged.append(f"{file.name} is truncated or unreadable")
    return damaged
