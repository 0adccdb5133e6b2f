"""Plots of an evaluation (matplotlib, optional): metrics per model, and the training curves of runs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from kdpipe.run_folder import RUN_FILE


def write_plots(results: dict[str, Any], runs: dict[str, Path], out: Path) -> tuple[list[str], str | None]:
    """metrics.png (a panel per metric, a bar per model) and training-<model>.png per run;
    (files, message)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "matplotlib is not installed: no plots written (pip install matplotlib)"
    out.mkdir(parents=True, exist_ok=True)
    files = []
    path = metrics_plot(results, out / "metrics.png", plt)
    if path:
        files.append(str(path))
    for name, run in runs.items():
        path = training_plot(Path(run), out / f"training-{_safe(name)}.png", plt, title=name)
        if path:
            files.append(str(path))
    return files, None


def metrics_plot(results: dict[str, Any], path: Path, plt: Any) -> Path | None:
    models = results["models"]
    keys = []
    for m in models:
        keys += [k for k, v in m["metrics"].items()
                 if k not in keys and isinstance(v, float) and not k.endswith("/tokens")]
    if not keys or not models:
        return None
    cols = min(4, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key in zip(axes.flat, keys):
        values = [m["metrics"].get(key) for m in models]
        heights = [v if isinstance(v, (int, float)) and math.isfinite(v) else 0.0 for v in values]
        ax.bar(range(len(models)), heights, color=[colors[i % len(colors)] for i in range(len(models))])
        ax.set_title(key, fontsize=8)
        ax.set_xticks(range(len(models)))
        ax.set_xticklabels([m["name"] for m in models], rotation=30, ha="right", fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def training_history(run: Path) -> list[dict[str, Any]]:
    """The Trainer log history of a run: kdpipe_run.json's, else the last checkpoint's trainer_state.json."""
    try:
        history = json.loads((run / RUN_FILE).read_text()).get("log_history") or []
    except (OSError, json.JSONDecodeError):
        history = []
    if not history:
        states = sorted(run.glob("checkpoint-*/trainer_state.json"),
                        key=lambda p: int(p.parent.name.split("-")[-1]))
        if states:
            history = json.loads(states[-1].read_text()).get("log_history") or []
    return history


def training_plot(run: Path, path: Path, plt: Any, title: str = "") -> Path | None:
    history = training_history(run)
    series: dict[str, tuple[list[float], list[float]]] = {}
    for entry in history:
        step = entry.get("step")
        if step is None:
            continue
        for key in ("loss", "eval_loss", "learning_rate"):
            if isinstance(entry.get(key), (int, float)):
                series.setdefault(key, ([], []))
                series[key][0].append(step)
                series[key][1].append(entry[key])
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for key in ("loss", "eval_loss"):
        if key in series:
            ax.plot(*series[key], label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if "learning_rate" in series:
        lr = ax.twinx()
        lr.plot(*series["learning_rate"], color="gray", linestyle=":", label="learning_rate")
        lr.set_ylabel("learning rate", fontsize=8)
        lr.tick_params(axis="y", labelsize=7)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title(f"training: {title or run.name}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)
