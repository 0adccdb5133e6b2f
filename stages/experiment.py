"""`kdpipe run`'s experiment file: its sections as steps (each a stage with its config), `base:`
inheritance, references between steps (``model: "@finetune"``), on-policy rounds expanded into steps,
and what each step would do now. Running the steps is `kdpipe.stages.run`."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdpipe.config import build_config, read_yaml
from kdpipe.errors import KdpipeError
from kdpipe.stages import cache_teacher, evaluate, finetune, init_model, rounds, seeds, train_student
from kdpipe.stages.base import Stage, command_line


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
    Step("teacher_init", init_model.STAGE),
    Step("finetune", finetune.STAGE),
    Step("cache", cache_teacher.STAGE, "cache/{name}"),
    Step("heldout_cache", cache_teacher.STAGE, "cache/{name}-heldout"),
    Step("student_init", init_model.STAGE),
    Step("train", train_student.STAGE),
    Step("baseline", finetune.STAGE),
    Step("evaluate", evaluate.STAGE, "runs/{name}/eval"),
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
        seeded = "seed" in fields and not seeds.draws_nothing(step.name, values)
        if seed is not None and seeded and "seed" not in values:
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
