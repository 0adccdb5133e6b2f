"""The table `kdpipe run` ends with: a row per evaluated model (its label from the file), task metrics,
fidelity, size and training time; over `seeds:` each metric's mean (min-max) (stages/seeds.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kdpipe.run_folder import RUN_FILE, read_json
from kdpipe.stages import seeds

COLUMNS = [("exact-match/exact_match", "exact match"), ("classify/accuracy", "accuracy"),
           ("perplexity/perplexity", "perplexity"), ("fidelity/top1_agreement", "top-1 agree"),
           ("fidelity/kl", "KL(T||S)")]


def _shown(metrics: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The table's metric columns: those of `COLUMNS` any model has, then lm-eval's."""
    shown = [(k, title) for k, title in COLUMNS if any(k in m for m in metrics)]
    extra = sorted({k for m in metrics for k in m if k.startswith("lm_eval") or k.startswith("lm-eval")})
    return shown + [(k, k.split("/", 1)[-1]) for k in extra]


def final_table(labels: dict[str, str], results: dict[str, Any]) -> str:
    """A row per evaluated model: task metrics, fidelity, size and training time."""
    models = results.get("models", [])
    shown = _shown([m["metrics"] for m in models])
    rows = []
    for m in models:
        size = params(m.get("path") or m.get("source") or "")
        train_s = train_seconds(m)
        cells = [label(labels, m), f"{size / 1e6:.2f}M" if size else "—"]
        cells += [_cell(m["metrics"].get(k)) for k, _ in shown]
        cells += [f"{train_s:.0f}" if train_s is not None else "—", f"{m.get('seconds', 0):.0f}"]
        rows.append(cells)
    return _format(["model", "params"] + [t for _, t in shown] + ["train s", "eval s"], rows)


def seeds_table(summary: dict[str, Any]) -> str:
    """A row per model over the seeds: each metric's mean (min-max), the mean training and eval time."""
    models = summary["models"]
    shown = _shown([m["metrics"] for m in models])
    rows = []
    for m in models:
        size = params(next(iter(m["paths"].values()), None) or "")
        train_s = list(m["train_seconds"].values())
        cells = [m["label"], f"{size / 1e6:.2f}M" if size else "—"]
        cells += [seeds.cell(m["metrics"].get(k)) for k, _ in shown]
        cells += [f"{sum(train_s) / len(train_s):.0f}" if train_s else "—",
                  f"{sum(m['eval_seconds'].values()) / max(1, len(m['eval_seconds'])):.0f}"]
        rows.append(cells)
    return _format(["model", "params"] + [t for _, t in shown] + ["train s", "eval s"], rows,
                   "train s, eval s: means over the seeds")


def _format(header: list[str], rows: list[list[str]], note: str = "") -> str:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r))  # noqa: E731
    table = [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]
    if sum(r[-2] != "—" for r in rows) > 1:  # two training times side by side invite a ratio
        table.append("train s: each run's wall time" + (f" ({note})" if note else "") + ", the runs "
                     "measured one after the other (not alternated): a change of machine load between them "
                     "moves their ratio; bench/bench_train.py compares step times fairly")
    return "\n".join(table)


def train_seconds(m: dict[str, Any]) -> float | None:
    """A trained model's training time, from its run record."""
    return (read_json(Path(m["run"]) / RUN_FILE) or {}).get("train_seconds") if m.get("run") else None


def label(labels: dict[str, str], m: dict[str, Any]) -> str:
    """A model's name in the table: its label in the file, else its own name."""
    for key in (m.get("source"), m.get("path")):
        if key in labels:
            return labels[key]
    return m.get("name", "?")


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and abs(value) < 1000:
        return f"{value:.4f}"
    return str(value)


def params(path: str) -> int | None:
    """Parameters of a local model folder, from its safetensors headers (no load)."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    total = 0
    for file in folder.glob("*.safetensors"):
        with open(file, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        for key, info in header.items():
            if key != "__metadata__":
                n = 1
                for d in info["shape"]:
                    n *= d
                total += n
    return total or None
