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

import dataclasses
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdpipe.config import build_config, read_yaml, to_dict
from kdpipe.errors import KdpipeError
from kdpipe.run_folder import EXPERIMENT_FILE, INIT_FILE, RUN_FILE, read_json  # noqa: F401  (re-exported)
from kdpipe.stages import registry, rounds
from kdpipe.stages.base import Stage, command_line
from kdpipe.stages.init_model import InitModelConfig, changed  # noqa: F401  (InitModelConfig: re-exported)


@dataclass
class Step:
    """A section of the experiment file: the stage it runs and its default output (filled in with the
    experiment's name and the step's folder name)."""

    name: str
    stage: Stage
    default_output: str = "runs/{name}/{folder}"

    @property
    def cls(self) -> type:
        return self.stage.config

    def output(self, experiment: str) -> str:
        return self.default_output.format(name=experiment, folder=self.name.replace("_", "-"))


STEPS = [
    Step("teacher_init", registry.INIT_MODEL),
    Step("finetune", registry.FINETUNE),
    Step("cache", registry.CACHE_TEACHER, "cache/{name}"),
    Step("heldout_cache", registry.CACHE_TEACHER, "cache/{name}-heldout"),
    Step("student_init", registry.INIT_MODEL),
    Step("train", registry.TRAIN_STUDENT),
    Step("baseline", registry.FINETUNE),
    Step("evaluate", registry.EVALUATE, "runs/{name}/eval"),
]
STEP_NAMES = [s.name for s in STEPS]
TOP_KEYS = {"name": "experiment name: default folders runs/NAME/STEP and cache/NAME[-heldout]",
            "seed": "default seed of every section that has one",
            "base": "YAML file (relative to this one) whose keys this file extends",
            "description": "free text",
            "labels": "names of the evaluated models in the final table, by reference (e.g. '@train': "
                      "student after KD)",
            "rounds": "on-policy rounds after train: {count, fraction, seed, generate: {...}, cache: {...}, "
                      "train: {...}} (README: generate)"}


@dataclass
class Plan:
    """A validated experiment: the steps to run, in order, with their resolved configs."""

    path: Path
    name: str
    steps: list[tuple[Step, Any]]  # (step, config)
    labels: dict[str, str]
    outputs: dict[str, str]
    notes: list[str] = field(default_factory=list)  # lines --dry-run adds after the steps


# ---------------------------------------------------------------- loading


def read_experiment(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The YAML mapping of `path`, merged over its `base:` file (sections merged key by key)."""
    path = Path(path)
    if path.resolve() in _seen:
        raise KdpipeError(f"{path}: 'base' inheritance loops back to {path}")
    data = read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    parent = read_experiment(path.parent / str(base), (*_seen, path.resolve()))
    for key, value in data.items():
        if isinstance(value, dict) and isinstance(parent.get(key), dict):
            parent[key] = {**parent[key], **value}
        elif value is None and (key in STEP_NAMES or key == "rounds"):
            parent.pop(key, None)  # `section: null` drops an inherited step
        else:
            parent[key] = value
    return parent


def plan(path: str | Path) -> Plan:
    """Read and validate `path`; resolve defaults and references. Loads no model and no data."""
    data = read_experiment(path)
    source = str(path)
    unknown = [k for k in data if k not in STEP_NAMES and k not in TOP_KEYS]
    if unknown:
        raise KdpipeError(f"{source}: unknown section '{unknown[0]}'; sections: {', '.join(STEP_NAMES)}; "
                          f"other top-level keys: {', '.join(TOP_KEYS)}")
    name = str(data.get("name") or Path(path).stem)
    seed = data.get("seed")
    outputs: dict[str, str] = {}
    steps: list[tuple[Step, Any]] = []
    spec = (rounds.read_spec(data["rounds"], seed, f"{source}: section 'rounds'")
            if data.get("rounds") is not None else None)
    added: list[tuple[Step, Any]] = []
    for step in STEPS:
        if step.name not in data:
            continue
        values = data[step.name]
        if values is None:
            continue
        if not isinstance(values, dict):
            raise KdpipeError(f"{source}: section '{step.name}' must be a mapping of {step.name} options")
        values = dict(values)
        fields = {f.name for f in dataclasses.fields(step.cls)}
        if seed is not None and "seed" in fields and "seed" not in values:
            values["seed"] = seed
        values = {k: _resolve(v, outputs, f"{source}: section '{step.name}', key '{k}'")
                  for k, v in values.items()}
        values = {k: _beside(Path(path), k, v) for k, v in values.items()}
        cfg = build_config(step.cls, values, source=f"{source}: section '{step.name}'")
        outputs[step.name] = step.stage.set_output(cfg, step.output(name))
        steps.append((step, cfg))
        if step.name == "train" and spec:  # the on-policy rounds continue the trained student
            added = rounds.expand(spec, steps, Step, name, f"{source}: section 'rounds'")
            outputs.update((s.name, s.stage.output(c)) for s, c in added)
            steps += added
    if not steps:
        raise KdpipeError(f"{source}: no steps; give at least one of the sections {', '.join(STEP_NAMES)}")
    if spec and not added:
        rounds.expand(spec, steps, Step, name, f"{source}: section 'rounds'")  # says what is missing
    labels = {}
    for ref, label in _label_pairs(data.get("labels"), source):
        labels[_resolve(ref, outputs, f"{source}: labels")] = str(label)
    rounds.add_to_evaluate(steps, added, labels)
    notes = [line for line in [rounds.steps_line(steps)] if line]
    return Plan(Path(path), name, steps, labels, outputs, notes)


def _label_pairs(labels: Any, source: str) -> list[tuple[Any, Any]]:
    """`labels:` as a mapping, or a list of one-key mappings (``- "@train": student``, an easy YAML slip)."""
    if not labels:
        return []
    if isinstance(labels, list) and all(isinstance(item, dict) and len(item) == 1 for item in labels):
        return [pair for item in labels for pair in item.items()]
    if not isinstance(labels, dict):
        raise KdpipeError(f"{source}: 'labels' must map a model to its name in the final table, e.g.\n"
                          "labels:\n  \"@train\": student after KD\n  runs/old/student: previous student\n"
                          f"(a mapping, not {type(labels).__name__} {labels!r})")
    return list(labels.items())


INPUT_FILES = ("dataset", "train_tokenizer_on", "template", "checker")  # keys naming a file the step reads
INPUT_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".yaml", ".yml", ".py")  # data, template, checker


def _beside(config: Path, key: str, value: Any) -> Any:
    """A relative data, template or checker file of the config is found next to the config (as `base:` is).

    Model, cache and output folders stay relative to the working directory: that is where the steps write
    and where `kdpipe evaluate` and the other commands find them.
    """
    if key not in INPUT_FILES or not isinstance(value, str):
        return value
    file, sep, function = value.rpartition(":") if key == "checker" else (value, "", "")
    local = Path(file).suffix.lower() in INPUT_SUFFIXES
    if not local or Path(file).is_absolute() or file.startswith("~"):
        return value
    return os.path.normpath(config.parent / file) + sep + function


def unset(step: Step, cfg: Any) -> list[str]:
    """The options the step cannot start without that its config leaves empty."""
    return [key for key in step.stage.required if getattr(cfg, key, None) in (None, "", [])]


def missing_inputs(step: Step, cfg: Any, produced: set[str]) -> list[str]:
    """Files and folders the step reads that do not exist and that no earlier step writes (for --dry-run)."""
    missing = [f"{key} is not set (the step needs it: give '{key}:' in its section"
               + (", or a 'cache:' section before it)" if key == "cache" else ")")
               for key in unset(step, cfg)]
    for key in (*INPUT_FILES, "model", "tokenizer", "cache"):
        value = getattr(cfg, key, None)
        if key == step.stage.output_key:
            continue  # the step writes it
        for item in value if isinstance(value, list) else [value]:
            if not isinstance(item, str) or item in produced or "://" in item:
                continue
            file = item.rpartition(":")[0] if key == "checker" else item
            local = Path(file).suffix.lower() in INPUT_SUFFIXES or file.startswith(("/", ".", "~"))
            if (local or key == "cache") and not Path(file).expanduser().exists():
                missing.append(f"{key} {file} does not exist")
    return missing


def _resolve(value: Any, outputs: dict[str, str], where: str) -> Any:
    """'@step' -> that step's output folder (also inside lists)."""
    if isinstance(value, list):
        return [_resolve(v, outputs, where) for v in value]
    if isinstance(value, str) and value.startswith("@"):
        ref = value[1:]
        if ref not in STEP_NAMES and ref not in outputs:  # a round's step (@round1_train) once planned
            raise KdpipeError(f"{where}: '{value}' names no step; steps: "
                              f"{', '.join('@' + s for s in STEP_NAMES)}")
        if ref not in outputs:
            raise KdpipeError(f"{where}: '{value}' refers to a step that is not in this config or comes "
                              "later")
        return outputs[ref]
    return value


def standalone_command(step: Step, cfg: Any) -> str:
    """The `kdpipe ...` command that does what this step does (recorded in the outputs, printed by
    --dry-run): `kdpipe.stages.base.command_line`."""
    return command_line(step.stage, cfg)


def step_state(step: Step, cfg: Any, anything_ran: bool) -> tuple[str, str]:
    """('skip'|'run'|'resume'|'restart', why) for this step given what is on disk."""
    return step.stage.state(cfg, command_line(step.stage, cfg), anything_ran)


_read_json = read_json  # old name (final_table, tests)
_changed = changed


# ---------------------------------------------------------------- running


def select(p: Plan, start: str | None = None, only: str | None = None) -> list[tuple[Step, Any]]:
    names = [s.name for s, _ in p.steps]
    for flag, value in (("--from", start), ("--only", only)):
        if value is not None and value not in names:
            raise KdpipeError(f"{flag} {value}: {p.path} has no such step; its steps: {', '.join(names)}")
    if only:
        return [(s, c) for s, c in p.steps if s.name == only]
    if start:
        return p.steps[names.index(start):]
    return list(p.steps)


def describe(p: Plan, steps: list[tuple[Step, Any]]) -> str:
    """The plan: each step, its equivalent command and what would happen now."""
    from kdpipe.plan.estimate import step_line

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
                     if step.stage.plan_kind and not unset(step, cfg) else None)  # no model: nothing to plan
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
    """Run one step; a tiny model on a CPU uses one thread (thread hand-offs cost more than they save)."""
    import torch

    threads = torch.get_num_threads()
    model = getattr(cfg, "model", None)
    if isinstance(model, str) and not torch.cuda.is_available() and (_params(model) or 10**9) < SMALL_MODEL:
        torch.set_num_threads(1)
    try:
        return _run_stage(step, cfg, command, state, echo)
    finally:
        torch.set_num_threads(threads)


SMALL_MODEL = 20_000_000  # parameters


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
        train_s = (_read_json(Path(m["run"]) / RUN_FILE) or {}).get("train_seconds") if m.get("run") else None
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
