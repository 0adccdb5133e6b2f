"""The evaluation's outputs: the metric definitions, one table (a row per metric, a column per model),
results.json, results.csv and predictions.jsonl."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

DEFINITIONS = {
    "classify/accuracy": "fraction of examples whose predicted label is the gold label; the prediction is "
                         "the label whose continuation has the highest summed log-prob after the prompt "
                         "(or, with --generate, the label parsed after 'Sentiment:' in the greedy output)",
    "classify/macro_f1": "unweighted mean over labels (present in gold or predictions) of 2TP/(2TP+FP+FN)",
    "classify/unparsed": "fraction of generated answers in which no label could be found (--generate)",
    "exact-match/exact_match": "fraction of greedy answers accepted by the checker",
    "perplexity/perplexity": "exp(mean negative log-likelihood of the template's trained tokens, EOS "
                             "included); padding never scored",
    "fidelity/kl": "mean over cached positions of KL(teacher||student) in nats over k+1 atoms (teacher "
                   "top-k ids + one tail atom: the teacher's cached tail mass vs the student's exact mass "
                   "outside those ids); a lower bound of the full-vocabulary KL, exact when the tail is "
                   "empty",
    "fidelity/top1_agreement": "fraction of positions where the student's argmax is the teacher's top-1 id",
    "fidelity/topk_recall": "mean |student top-k ∩ teacher top-k| / k, k = the cache's k",
    "fidelity/ece": "ECE (15 equal-width bins) of the student's max probability vs its argmax being the "
                    "actual next token",
    "fidelity/ece_teacher": "ECE (15 bins) of the student's max probability vs its argmax being the "
                            "teacher's top-1 id",
    "fidelity/cache_ppl": "the student's perplexity of the cached examples' actual target tokens",
}


def metric_keys(results: dict[str, Any]) -> list[str]:
    """Every metric of any model, in first-seen order."""
    keys: list[str] = []
    for m in results["models"]:
        keys += [k for k in m["metrics"] if k not in keys]
    return keys


def definitions(results: dict[str, Any]) -> dict[str, str]:
    """The definitions of the metrics that `results` holds."""
    return {k: DEFINITIONS[k] for k in metric_keys(results) if k in DEFINITIONS}


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.1f}"
    return str(value)


def format_table(results: dict[str, Any]) -> str:
    """One table: a row per metric, a column per model."""
    names = [m["name"] for m in results["models"]]
    rows = [[k] + [_fmt(m["metrics"].get(k)) for m in results["models"]] for k in metric_keys(results)]
    header = ["metric"] + names
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r))

    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def write_results(results: dict[str, Any], predictions: list[dict[str, Any]], out: Path,
                  extra: list[str] = ()) -> list[str]:
    """results.json, results.csv (a row per metric, a column per model) and predictions.jsonl into `out`."""
    from kdpipe.cache.storage import write_atomic

    out.mkdir(parents=True, exist_ok=True)
    files = [out / "results.json", out / "results.csv"]
    models = results["models"]
    with open(files[1], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["metric"] + [m["name"] for m in models])
        for key in metric_keys(results):
            values = [m["metrics"].get(key) for m in models]
            writer.writerow([key] + ["" if v is None else v for v in values])
    if predictions:
        files.append(out / "predictions.jsonl")
        with open(files[-1], "w") as f:
            for p in predictions:
                f.write(json.dumps(p, default=str) + "\n")
    results["files"] = [str(p) for p in files] + list(extra)
    text = json.dumps(results, indent=2, default=_json_default) + "\n"
    write_atomic(files[0], text.encode())  # last: marks the evaluation done
    return results["files"]


def _json_default(value: Any) -> Any:
    import numpy as np

    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


def summary(results: dict[str, Any]) -> str:
    files = results.get("files", [])
    return f"wrote {', '.join(files)}" if files else ""
