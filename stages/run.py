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
from kdpipe.run_folder import EXPERIMENT_FILE
from kdpipe.stages import cache_teacher, seeds
from kdpipe.stages.experiment import (
    Plan,
    Step,
    missing_inputs,
    plan,
    select,
    standalone_command,
    step_state,
    unset,
)
from kdpipe.stages.tables import final_table, label, params, seeds_table, train_seconds


def describe(p: Plan, steps: list[tuple[Step, Any]]) -> str:
    """The plan: each step, its equivalent command and what would happen now."""
    from kdpipe.plan.report import step_line

    lines = [f"experiment {p.name} ({p.path}): {len(steps)} step(s); each command shows the options that "
             "differ from their defaults (`kdpipe COMMAND --help` lists the defaults)"]
    first = [s.name for s, _ in p.steps].index(steps[0][0].name) if steps else 0
    produced = {p.outputs[s.name] for s, _ in p.steps[:first]}  # --from / --only: the earlier steps are done
    cache_length = None  # what train steps plan with: the sequences the cache step writes
    width = max([15] + [len(s.name) for s, _ in steps])  # train.seed1, round1_generate.seed0 ...
    for i, (step, cfg) in enumerate(steps, 1):
        try:
            state, why = step_state(step, cfg, anything_ran=False)
        except KdpipeError as e:
            state, why = "error", e.message
        lines.append(f"{i}. {step.name:<{width}} [{state}] {why}".rstrip())
        lines.append(f"     {standalone_command(step, cfg)}")
        lines += [f"     missing: {what}" for what in missing_inputs(step, cfg, produced)]
        produced.add(p.outputs[step.name])
        cache_length = cfg.max_length if step.name == "cache" else cache_length  # the training data's length
        plannable = step.stage.plan_kind and "model" not in unset(step, cfg)  # without a model: no plan
        predicted = (step_line(step.stage.plan_kind, cfg, cache_length, pending=set(p.outputs.values()))
                     if plannable else None)
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
    if p.threads:
        echo(f"torch threads: {p.threads} (threads: in {p.path}; results on a CPU depend on the thread "
             "count)")
    done: dict[str, dict[str, Any]] = {}
    evaluations: dict[int | None, tuple[Any, dict[str, Any]]] = {}  # seed -> (evaluate config, results)
    anything_ran = False
    total = time.perf_counter()
    for i, (step, cfg) in enumerate(steps, 1):
        state, why = step_state(step, cfg, anything_ran)
        command = standalone_command(step, cfg)
        if state == "skip":
            echo(f"[{i}/{len(steps)}] {step.name}: skipped ({why})")
            done[step.name] = {"state": "skipped", "seconds": 0.0}
            if step.stage.tabulates:
                evaluations[step.seed] = (cfg, step.stage.previous(cfg))
            continue
        echo(f"[{i}/{len(steps)}] {step.name}: {command}" + (f"\n      ({why})" if why else ""))
        start_t = time.perf_counter()
        result = _run_step(step, cfg, command, state, echo, p.threads)
        if step.stage.tabulates:
            evaluations[step.seed] = (cfg, result)
        anything_ran = True
        done[step.name] = {"state": state, "seconds": round(time.perf_counter() - start_t, 1)}
        echo(f"      {step.name} done in {done[step.name]['seconds']:.1f} s")
    echo(f"experiment {p.name}: {sum(1 for d in done.values() if d['state'] != 'skipped')} step(s) run, "
         f"{sum(1 for d in done.values() if d['state'] == 'skipped')} skipped, "
         f"{time.perf_counter() - total:.1f} s")
    evaluations = {seed: (cfg, r) for seed, (cfg, r) in evaluations.items() if r is not None}
    results = None
    if p.seeds is not None and evaluations:
        results = seed_summary(p, evaluations)
        echo("")
        echo(seeds.describe(results))
        echo(seeds_table(results))
    elif evaluations:
        results = evaluations[None][1]
        echo("")
        echo(final_table(p.labels, results))
    return {"plan": [s.name for s, _ in steps], "done": done, "results": results}


def seed_summary(p: Plan, evaluations: dict[Any, tuple[Any, dict[str, Any]]]) -> dict[str, Any]:
    """Mean and range over the seeds' evaluations, written to the evaluate section's own folder."""
    summary = seeds.summarise({seed: r for seed, (_, r) in evaluations.items()}, lambda m: label(p.labels, m),
                              train_seconds)
    summary["evaluations"] = {seed: cfg.output for seed, (cfg, _) in sorted(evaluations.items())}
    summary["config"] = str(p.path)
    summary["written_to"] = str(seeds.write(summary, p.seeds_output))
    return summary


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
    teacher = next((cfg.model for step, cfg in p.steps if step.stage is cache_teacher.STAGE), None)
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


def _run_step(step: Step, cfg: Any, command: str, state: str, echo: Callable[[str], None],
              threads: int | None = None) -> Any:
    """Run one step with `threads` torch threads (`threads:` of the file); by default a small model on a CPU
    uses one thread (`kdpipe.models.threads_for`: thread hand-offs cost more than they save)."""
    import torch

    from kdpipe.models import threads_for

    if threads:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return _run_stage(step, cfg, command, state, echo)
        finally:
            torch.set_num_threads(before)
    model = getattr(cfg, "model", None)
    with threads_for(params(model) if isinstance(model, str) else None,
                     "cuda" if torch.cuda.is_available() else "cpu"):
        return _run_stage(step, cfg, command, state, echo)


def _run_stage(step: Step, cfg: Any, command: str, state: str, echo: Callable[[str], None]) -> Any:
    result = step.stage.run(cfg, command, echo=lambda m: echo("      " + m), state=state)
    line = step.stage.summary(result, cfg)
    if line and not step.stage.tabulates:  # the evaluation's results end the experiment as its table
        echo("      " + line)
    return result
