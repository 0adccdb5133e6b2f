"""`kdpipe run CONFIG`: a whole experiment from one YAML file, step by step, resumable.

Recipe: read the YAML (following `base:` inheritance), build every section's stage config with that
stage's dataclass (unknown keys are errors naming the section), resolve references between steps
(``model: "@finetune"`` = that step's output), then run the steps in order. Each step loads only
its own model and is skipped when its output is already there, complete, with the same settings:

| section          | stage                      | skipped when                                              |
|------------------|----------------------------|-----------------------------------------------------------|
| `teacher_init`   | `kdpipe init-model`        | a model and kdpipe_init.json with the same options         |
| `finetune`       | `kdpipe finetune`          | kdpipe_run.json: status complete, same options             |
| `cache`          | `kdpipe cache-teacher`     | manifest.json: complete, written by the same command       |
| `heldout_cache`  | `kdpipe cache-teacher`     | idem (the held-out data for fidelity in `evaluate`)        |
| `student_init`   | `kdpipe init-model`        | as teacher_init                                            |
| `train`          | `kdpipe train-student`     | as finetune                                                |
| `baseline`       | `kdpipe finetune`          | as finetune (the SFT-only student)                         |
| `evaluate`       | `kdpipe evaluate`          | results.json from the same command and no earlier step ran |
| `rounds`         | after `train`, per round: generate, cache-teacher, train-student (stages/rounds.py) |

A training step that crashed resumes from its last checkpoint (or starts over when it left none).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kdpipe.config import to_dict
from kdpipe.errors import KdpipeError
from kdpipe.run_folder import EXPERIMENT_FILE, RUN_FILE, read_json
from kdpipe.stages import registry
from kdpipe.stages.experiment import Plan, Step, missing_inputs, plan, select, standalone_command, step_state

# ---------------------------------------------------------------- running


def describe(p: Plan, steps: list[tuple[Step, Any]]) -> str:
    """The plan: each step, its equivalent command and what would happen now."""
    from kdpipe.plan.report import step_line

    lines = [f"experiment {p.name} ({p.path}): {len(steps)} step(s); each command shows the options that "
             "differ from their defaults (`kdpipe COMMAND --help` lists the defaults)"]
    first = [s.name for s, _ in p.steps].index(steps[0][0].name) if steps else 0
    produced = {p.outputs[s.name] for s, _ in p.steps[:first]}  # --from / --only: the earlier steps are done
    cache_length = None  # what train steps plan with: the sequences the cache step writes
    for i, (step, cfg) in enumerate(steps, 1):
        try:
            state, why = step_state(step, cfg, anything_ran=False)
        except KdpipeError as e:
            state, why = "error", e.message
        lines.append(f"{i}. {step.name:<15} [{state}] {why}".rstrip())
        lines.append(f"     {standalone_command(step, cfg)}")
        lines += [f"     missing: {what}" for what in missing_inputs(step, cfg, produced)]
        produced.add(p.outputs[step.name])
        cache_length = cfg.max_length if step.name == "cache" else cache_length  # the training data's length
        predicted = (step_line(step.stage.plan_kind, cfg, cache_length, pending=set(p.outputs.values()))
                     if step.stage.plan_kind else None)
        if predicted:
            lines.append(f"     {predicted}")
    return "\n".join(lines + p.notes)


def run(path: str | Path, start: str | None = None, only: str | None = None, dry_run: bool = False,
        echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or with `dry_run`, describe) the experiment in `path`; returns what each step did and the
    results."""
    p = plan(path)
    steps = select(p, start, only)
    if dry_run:
        echo(describe(p, steps))
        return {"plan": [s.name for s, _ in steps], "done": {}}
    write_experiment_record(p)
    done: dict[str, dict[str, Any]] = {}
    results = None
    anything_ran = False
    total = time.perf_counter()
    for i, (step, cfg) in enumerate(steps, 1):
        state, why = step_state(step, cfg, anything_ran)
        command = standalone_command(step, cfg)
        if state == "skip":
            echo(f"[{i}/{len(steps)}] {step.name}: skipped ({why})")
            done[step.name] = {"state": "skipped", "seconds": 0.0}
            results = step.stage.previous(cfg) if step.stage.tabulates else results
            continue
        echo(f"[{i}/{len(steps)}] {step.name}: {command}" + (f"\n      ({why})" if why else ""))
        start_t = time.perf_counter()
        result = _run_step(step, cfg, command, state, echo)
        results = result if step.stage.tabulates else results
        anything_ran = True
        done[step.name] = {"state": state, "seconds": round(time.perf_counter() - start_t, 1)}
        echo(f"      {step.name} done in {done[step.name]['seconds']:.1f} s")
    echo(f"experiment {p.name}: {sum(1 for d in done.values() if d['state'] != 'skipped')} step(s) run, "
         f"{sum(1 for d in done.values() if d['state'] == 'skipped')} skipped, "
         f"{time.perf_counter() - total:.1f} s")
    if results is not None:
        echo("")
        echo(final_table(p, results))
    return {"plan": [s.name for s, _ in steps], "done": done, "results": results}


def write_experiment_record(p: Plan) -> None:
    """kdpipe_experiment.json in the folder above the step folders (runs/NAME): the experiment's runs, teacher
    and evaluate settings, so that `kdpipe evaluate` without options evaluates its latest run as it does."""
    runs = [str(Path(cfg.output).resolve()) for step, cfg in p.steps if step.stage.trains]
    if not runs:
        return
    others = [str(Path(step.stage.output(cfg)).resolve()) for step, cfg in p.steps
              if not step.stage.trains and step.stage.output_key == "output"]  # model and evaluation folders
    folders = runs + others
    home = Path(os.path.commonpath(folders))
    while str(home) in folders:  # never inside a step's own folder (a training step wants it empty)
        home = home.parent
    teacher = next((cfg.model for step, cfg in p.steps if step.stage is registry.CACHE_TEACHER), None)
    evaluate = next((to_dict(cfg) for step, cfg in p.steps if step.stage.tabulates), None)
    if evaluate:
        for key in ("cache", "dataset", "template"):
            value = evaluate.get(key)
            if value and "://" not in value and (key == "cache" or Path(value).is_file()):
                evaluate[key] = str(Path(value).resolve())
    if teacher and (teacher in p.outputs.values() or Path(teacher).exists()):
        teacher = str(Path(teacher).resolve())  # a folder, not a hub id
    record = {"kind": "kdpipe run", "config": str(p.path.resolve()), "name": p.name, "runs": runs,
              "teacher": teacher, "evaluate": evaluate}
    home.mkdir(parents=True, exist_ok=True)
    (home / EXPERIMENT_FILE).write_text(json.dumps(record, indent=2) + "\n")


def _run_step(step: Step, cfg: Any, command: str, state: str, echo: Callable[[str], None]) -> Any:
    """Run one step; a small model on a CPU uses one thread (`kdpipe.models.threads_for`)."""
    import torch

    from kdpipe.models import threads_for

    model = getattr(cfg, "model", None)
    params = _params(model) if isinstance(model, str) else None
    with threads_for(params, "cuda" if torch.cuda.is_available() else "cpu"):
        return _run_stage(step, cfg, command, state, echo)


def _run_stage(step: Step, cfg: Any, command: str, state: str, echo: Callable[[str], None]) -> Any:
    result = step.stage.run(cfg, command, echo=lambda m: echo("      " + m), state=state)
    line = step.stage.summary(result, cfg)
    if line and not step.stage.tabulates:  # the evaluation's results end the experiment as its table
        echo("      " + line)
    return result


# ---------------------------------------------------------------- the final table


def final_table(p: Plan, results: dict[str, Any]) -> str:
    """A row per evaluated model: task metrics, fidelity, size and training time."""
    columns = [("exact-match/exact_match", "exact match"), ("classify/accuracy", "accuracy"),
               ("perplexity/perplexity", "perplexity"), ("fidelity/top1_agreement", "top-1 agree"),
               ("fidelity/kl", "KL(T||S)")]
    models = results.get("models", [])
    shown = [(k, title) for k, title in columns if any(k in m["metrics"] for m in models)]
    extra = sorted({k for m in models for k in m["metrics"]
                    if k.startswith("lm_eval") or k.startswith("lm-eval")})
    shown += [(k, k.split("/", 1)[-1]) for k in extra]
    header = ["model", "params"] + [t for _, t in shown] + ["train s", "eval s"]
    rows = []
    for m in models:
        label = _label(p, m)
        size = _params(m.get("path") or m.get("source") or "")
        train_s = (read_json(Path(m["run"]) / RUN_FILE) or {}).get("train_seconds") if m.get("run") else None
        cells = [label, f"{size / 1e6:.2f}M" if size else "—"]
        cells += [_cell(m["metrics"].get(k)) for k, _ in shown]
        cells += [f"{train_s:.0f}" if train_s is not None else "—", f"{m.get('seconds', 0):.0f}"]
        rows.append(cells)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r))  # noqa: E731
    table = [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]
    if sum(r[-2] != "—" for r in rows) > 1:  # two training times side by side invite a ratio
        table.append("train s: each run's wall time, the runs measured one after the other (not "
                     "alternated): a change of machine load between them moves their ratio; "
                     "bench/bench_train.py compares step times fairly")
    return "\n".join(table)


def _label(p: Plan, m: dict[str, Any]) -> str:
    for key in (m.get("source"), m.get("path")):
        if key in p.labels:
            return p.labels[key]
    return m.get("name", "?")


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and abs(value) < 1000:
        return f"{value:.4f}"
    return str(value)


def _params(path: str) -> int | None:
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
