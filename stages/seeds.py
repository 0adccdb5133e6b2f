"""`seeds:` of `kdpipe run`: repeat the training steps over several seeds, report mean and range.

With ``seeds: [0, 1, 2]`` the experiment's steps split in two:

- shared, run once: the caches (`cache`, `heldout_cache`) and every step they are computed from (the
  teacher's `teacher_init` and `finetune`), with the experiment's `seed`; and a `student_init` that cuts
  a model (``from_model``), which draws nothing at random;
- per seed: every other step (`student_init`, `train`, `baseline`, the `rounds`, `evaluate`, and
  `finetune` when no cache is computed from it), with `seed: S`, each into its own folder: the step's
  output with ``-seedS`` appended (``runs/demo/student-kd-seed1``; the rounds' ``runs/NAME/seedS/round-R``).

Each seed's `evaluate` writes its own results.json; the experiment's table then shows every metric's
mean and range (min-max) per model over the seeds, and the evaluate step's own folder (default
``runs/NAME/eval``) gets a results.json with the per-seed values behind each mean. A rerun skips each
finished step of each seed, as without seeds.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from kdpipe.errors import KdpipeError

SHARED_ROOTS = ("cache", "heldout_cache")  # what is computed once; with what it is computed from


def read(value: Any, source: str) -> list[int] | None:
    """The `seeds:` list, checked (None when the file has none)."""
    if value is None:
        return None
    if (not isinstance(value, list) or not value
            or any(isinstance(s, bool) or not isinstance(s, int) for s in value)):
        raise KdpipeError(f"{source}: 'seeds' must be a non-empty list of integers, e.g. seeds: [0, 1, 2], "
                          f"not {value!r}")
    if len(set(value)) != len(value):
        raise KdpipeError(f"{source}: 'seeds' lists a seed twice ({value}); each seed runs once")
    return list(value)


def shared_sections(data: dict[str, Any]) -> set[str]:
    """The sections run once: the caches and, transitively, the sections their `@step` references name."""
    shared: set[str] = set()
    todo = [name for name in SHARED_ROOTS if isinstance(data.get(name), dict)]
    todo += [name for name, v in data.items() if isinstance(v, dict) and draws_nothing(name, v)]
    while todo:
        name = todo.pop()
        if name in shared:
            continue
        shared.add(name)
        todo += [ref for ref in _references(data.get(name)) if isinstance(data.get(ref), dict)]
    return shared


def draws_nothing(section: str, values: dict[str, Any]) -> bool:
    """A section no seed changes: init-model cutting a model (``from_model``) copies its weights. It runs
    once, and no default seed is given to it (init-model refuses one with --from)."""
    return section == "student_init" and bool(values.get("from_model"))


def _references(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [r for v in value.values() for r in _references(v)]
    if isinstance(value, list):
        return [r for v in value for r in _references(v)]
    return [value[1:]] if isinstance(value, str) and value.startswith("@") else []


def check_section(values: dict[str, Any], section: str, source: str) -> None:
    """A repeated section takes its seed from `seeds:`; its own `seed:` would be silently replaced."""
    if "seed" in values:
        raise KdpipeError(f"{source}: section '{section}' sets 'seed: {values['seed']}', but it runs once "
                          "per entry of 'seeds:' with that seed; remove its 'seed' (the shared steps, the "
                          "caches and what they are computed from, take the top-level 'seed')")


def folder(output: str, seed: int) -> str:
    """A repeated step's output for `seed`: ``runs/demo/student-kd`` -> ``runs/demo/student-kd-seed1``."""
    return f"{output.rstrip('/')}-seed{seed}"


# ---------------------------------------------------------------- the summary over seeds


def summarise(per_seed: dict[int, dict[str, Any]], label: Any, train_seconds: Any) -> dict[str, Any]:
    """Mean, min, max and the per-seed values of every metric of every model (models matched by
    `label(model)`, a name without its ``-seedS``), from each seed's evaluate results;
    `train_seconds(model)` -> a run's training time."""
    models: dict[str, dict[str, Any]] = {}
    for seed, results in sorted(per_seed.items()):
        for m in results.get("models", []):
            name = label(m).removesuffix(f"-seed{seed}")
            entry = models.setdefault(name, {"label": name, "paths": {}, "metrics": {}, "train_seconds": {},
                                             "eval_seconds": {}})
            entry["paths"][seed] = m.get("path") or m.get("source")
            for key, value in m["metrics"].items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    entry["metrics"].setdefault(key, {"values": {}})["values"][seed] = value
            seconds = train_seconds(m)
            if seconds is not None:
                entry["train_seconds"][seed] = seconds
            entry["eval_seconds"][seed] = m.get("seconds", 0)
    for entry in models.values():
        for stats in [*entry["metrics"].values()]:
            values = list(stats["values"].values())
            stats.update(mean=statistics.fmean(values), min=min(values), max=max(values), n=len(values))
    return {"kind": "kdpipe run seeds", "seeds": sorted(per_seed), "models": list(models.values())}


def write(summary: dict[str, Any], output: str | Path) -> Path:
    """results.json of the summary into the evaluate step's own folder."""
    path = Path(output) / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(path)
    return path


def cell(stats: dict[str, Any] | None) -> str:
    """``mean (min-max)``: 0.7655 (0.6100-0.8300)."""
    if not stats:
        return "—"
    if stats["min"] == stats["max"]:
        return f"{stats['mean']:.4f}"
    return f"{stats['mean']:.4f} ({stats['min']:.4f}-{stats['max']:.4f})"


def describe(summary: dict[str, Any]) -> str:
    """The line above the table."""
    seeds = summary["seeds"]
    return (f"over {len(seeds)} seed(s) {', '.join(map(str, seeds))}: each cell is the mean (min-max) of "
            "the seeds' values (one value when every seed gave the same)")
