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
from kdpipe.stages import registry, rounds, seeds
from kdpipe.stages.base import Stage, command_line
from kdpipe.stages.init_model import InitModelConfig, changed  # noqa: F401  (InitModelConfig: re-exported)
from kdpipe.stages.tables import final_table, label, params, seeds_table, train_seconds


@dataclass
class Step:
    """A section of the experiment file: the stage it runs and its default output (filled in with the
    experiment's name and the step's folder name)."""

    name: str
    stage: Stage
    default_output: str = "runs/{name}/{folder}"
    seed: int | None = None  # a copy of the step for this entry of `seeds:`

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
            "seeds": "repeat the training steps once per seed, e.g. [0, 1, 2]: the table shows mean and "
                     "range (stages/seeds.py)",
            "threads": "torch CPU threads of every step (CPU results depend on it; default: one for a tiny "
                       "model, torch's own otherwise)",
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
    seeds: list[int] | None = None  # `seeds:` (stages/seeds.py)
    threads: int | None = None  # `threads:` torch CPU threads of every step
    seeds_output: str | None = None  # the evaluate section's own folder: results.json over the seeds


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
    seed, seed_list = data.get("seed"), seeds.read(data.get("seeds"), source)
    threads = data.get("threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise KdpipeError(f"{source}: 'threads' must be a positive integer (torch CPU threads), "
                          f"not {threads!r}")
    p = Plan(Path(path), name, [], {}, {}, seeds=seed_list, threads=threads)
    if seed_list is None:
        _plan_steps(p, data, STEPS, seed, None)
    else:
        shared = seeds.shared_sections(data)
        _plan_steps(p, data, [s for s in STEPS if s.name in shared], seed, None, final=False)
        for s in seed_list:
            _plan_steps(p, data, [st for st in STEPS if st.name not in shared], s, s)
    if not p.steps:
        raise KdpipeError(f"{source}: no steps; give at least one of the sections {', '.join(STEP_NAMES)}")
    return p


def _plan_steps(p: Plan, data: dict[str, Any], wanted: list[Step], seed: int | None, repeat: int | None,
                final: bool = True) -> None:
    """Add the sections of `wanted` to `p` (with `repeat`: that seed's copies, into their own folders);
    `final`: also resolve the labels and the rounds."""
    source = str(p.path)
    outputs = dict(p.outputs)  # the shared steps' (a seed's copies are named train.seed1 ...)
    spec = (rounds.read_spec(data["rounds"], seed, f"{source}: section 'rounds'")
            if data.get("rounds") is not None and final else None)
    steps: list[tuple[Step, Any]] = []
    added: list[tuple[Step, Any]] = []
    for step in wanted:
        values = data.get(step.name)
        if values is None:
            continue
        if not isinstance(values, dict):
            raise KdpipeError(f"{source}: section '{step.name}' must be a mapping of {step.name} options")
        if repeat is not None:
            seeds.check_section(values, step.name, source)
        values = dict(values)
        fields = {f.name for f in dataclasses.fields(step.cls)}
        if seed is not None and "seed" in fields and "seed" not in values:
            values["seed"] = seed
        values = {k: _resolve(v, outputs, f"{source}: section '{step.name}', key '{k}'")
                  for k, v in values.items()}
        values = {k: _beside(p.path, k, v) for k, v in values.items()}
        cfg = build_config(step.cls, values, source=f"{source}: section '{step.name}'")
        out = step.stage.set_output(cfg, step.output(p.name))
        if repeat is not None:
            p.seeds_output = out if step.stage.tabulates else p.seeds_output
            out = seeds.folder(out, repeat)
            setattr(cfg, step.stage.output_key, out)
        outputs[step.name] = out
        steps.append((step, cfg))
        if step.name == "train" and spec:  # the on-policy rounds continue the trained student
            home = p.name if repeat is None else f"{p.name}/seed{repeat}"
            added = rounds.expand(spec, p.steps + steps, Step, home, f"{source}: section 'rounds'")
            outputs.update((s.name, s.stage.output(c)) for s, c in added)
            steps += added
    if spec and not added:
        rounds.expand(spec, p.steps + steps, Step, p.name, f"{source}: section 'rounds'")  # says what lacks
    if final:
        for ref, label in _label_pairs(data.get("labels"), source):
            p.labels[_resolve(ref, outputs, f"{source}: labels")] = str(label)
        rounds.add_to_evaluate(steps, added, p.labels)
        if not p.notes:  # the first seed's (every seed plans the same steps)
            p.notes = [line for line in [rounds.steps_line(p.steps + steps)] if line]
    if repeat is not None:  # the seed's copies: their own step names (--only train.seed1)
        steps = [(dataclasses.replace(s, name=f"{s.name}.seed{repeat}", seed=repeat), c) for s, c in steps]
    p.steps += steps
    p.outputs.update((s.name, s.stage.output(c)) for s, c in steps)


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
    for key in (*INPUT_FILES, "model", "from_model", "like", "tokenizer", "cache"):
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


def _run_step(step: Step, cfg: Any, command: str, state: str, echo: Callable[[str], None],
              threads: int | None = None) -> Any:
    """Run one step with `threads` torch threads (`threads:` of the file); by default a tiny model on a CPU
    uses one thread (thread hand-offs cost more than they save)."""
    import torch

    before = torch.get_num_threads()
    model = getattr(cfg, "model", None)
    if threads:
        torch.set_num_threads(threads)
    elif isinstance(model, str) and not torch.cuda.is_available() and (params(model) or 10**9) < SMALL_MODEL:
        torch.set_num_threads(1)
    try:
        return _run_stage(step, cfg, command, state, echo)
    finally:
        torch.set_num_threads(before)


SMALL_MODEL = 20_000_000  # parameters


def _run_stage(step: Step, cfg: Any, command: str, state: str, echo: Callable[[str], None]) -> Any:
    result = step.stage.run(cfg, command, echo=lambda m: echo("      " + m), state=state)
    line = step.stage.summary(result, cfg)
    if line and not step.stage.tabulates:  # the evaluation's results end the experiment as its table
        echo("      " + line)
    return result
