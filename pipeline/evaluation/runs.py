"""What run folders say to `kdpipe evaluate`: the latest finished run, the experiment it belongs to,
the data it trained on (evaluated on its held-out part) and its teacher (from its cache's manifest)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from kdpipe import run_folder
from kdpipe.errors import KdpipeError
from kdpipe.run_folder import EXPERIMENT_FILE, RUN_FILE

FINISHED = ("complete", "done")


def read_json(path: Path, quiet: bool = False) -> dict[str, Any]:
    """A JSON file as a dict; with `quiet`, {} for a missing or unreadable one (kdpipe.run_folder's
    reader)."""
    return run_folder.read_json(path, missing_ok=quiet) or {}


def latest_run(root: str | Path = "runs") -> tuple[Path, dict[str, Any]]:
    """The newest run folder under `root` whose kdpipe_run.json says it finished."""
    found = []
    for file in Path(root).rglob(RUN_FILE):  # runs/NAME and `kdpipe run`'s runs/NAME/STEP
        record = read_json(file, quiet=True)
        if record and record.get("status") in FINISHED:
            found.append((str(record.get("updated", "")), file.stat().st_mtime, file.parent, record))
    if not found:
        raise KdpipeError(f"no --model given and no finished run under {root}/ (a folder with {RUN_FILE}, "
                          "at any depth); "
                          "pass --model, or run `kdpipe train-student` first")
    _, _, folder, record = max(found, key=lambda f: (f[0], f[1]))
    return folder, record


def experiment_of(folder: Path) -> dict[str, Any] | None:
    """The `kdpipe run` experiment that `folder` is a run of (its kdpipe_experiment.json above), or None."""
    run = str(folder.resolve())
    for parent in folder.resolve().parents:
        record = read_json(parent / EXPERIMENT_FILE, quiet=True)
        if run in record.get("runs", []):
            return record
        if parent == Path.cwd():
            return None
    return None


def settings_from_experiment(cfg: Any, settings: dict[str, Any]) -> None:
    """The experiment's own `evaluate:` options, but for models and output folder (the latest run's)."""
    defaults = type(cfg)()
    for name, value in settings.items():
        unset = hasattr(cfg, name) and getattr(cfg, name) == getattr(defaults, name)
        if unset and name not in ("model", "output"):
            setattr(cfg, name, value)


def run_caches(record: dict[str, Any]) -> list[str]:
    """The caches a run trained on: one, or several pooled (train-student --cache A --cache B)."""
    cache = (record.get("config") or {}).get("cache")
    return [] if not cache else [cache] if isinstance(cache, str) else list(cache)


def run_teacher(record: dict[str, Any]) -> str | None:
    """The teacher of a train-student run: the model its (first) cache was written with."""
    from kdpipe.cache.manifest import Manifest

    manifest = Manifest.read_if_any((run_caches(record) or [None])[0])
    return manifest.teacher.model if manifest else None


def data_from_run(cfg: Any, record: dict[str, Any], echo: Callable[[str], None]) -> None:
    """No --dataset: evaluate on the run's data, its held-out part (or the test split of
    kdpipe:arithmetic)."""
    from kdpipe.cache.manifest import Manifest

    run_cfg = record.get("config") or {}
    data = dict(run_cfg)
    if record.get("kind") == "train-student" and run_cfg.get("cache"):
        manifest = Manifest.read_if_any(run_caches(record)[0])
        data = {}
        if manifest:
            data = {**manifest.dataset.to_dict(), "template": manifest.template.name,
                    "label_names": manifest.template.label_names}
        data["dataset"] = data.get("source")
    if not data.get("dataset"):
        return
    cfg.dataset = data["dataset"]
    if cfg.template == "auto" and data.get("template"):
        cfg.template = data["template"]
    if data.get("label_names"):
        cfg.label_names = list(data["label_names"])
    if not cfg.columns and data.get("columns"):
        cfg.columns = dict(data["columns"])
    if data.get("part") == "train" and data.get("heldout_fraction"):
        cfg.split, cfg.part = data.get("split", cfg.split), "heldout"
        cfg.heldout_fraction, cfg.seed = float(data["heldout_fraction"]), int(data.get("seed", cfg.seed))
    elif cfg.dataset == "kdpipe:arithmetic":
        cfg.split, cfg.part = "test", "all"
    else:
        cfg.split = data.get("split", cfg.split)
        echo(f"note: the run trained on all of {cfg.dataset} ({cfg.split}); evaluating on that same data")
    echo(f"data: {cfg.dataset} split={cfg.split} part={cfg.part} template={cfg.resolved_template()}")
