"""The stage interface: each stage of kdpipe is one `Stage` object, and the CLI's stage commands and
`kdpipe run`'s planner are both built from the list of them (`kdpipe.stages.registry.STAGES`), so the
boundary of a stage is drawn once.

A stage is one module of `kdpipe.stages` holding its config class (torch-free: its fields are the YAML
keys and the CLI options), its recipe (`run`, which imports torch and the data path only when it runs)
and its `STAGE`: the output folder (a field of the config), the skip/resume `state` given what is on
disk, and a one-line `summary` of what it did.

This module imports neither torch nor the recipes, so `kdpipe --help` stays fast.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Echo = Callable[[str], None]

# --verify of train-student and evaluate (the check is kdpipe.cache.verified.check_for_use)
VERIFY_HELP = ("Cache check before use: fast (manifest and sizes; sha256 only of shards changed since they "
               "last passed, see .kdpipe-verified.json) or full (sha256 of every shard).")


def log_note(message: str) -> None:
    """The echo of a stage run as a library (no echo given): kdpipe's logger, which the command line shows
    on stderr (`kdpipe.cli`)."""
    logging.getLogger("kdpipe.stages").info(message)
# `state(cfg, command, anything_ran)` -> ("skip" | "run" | "resume" | "restart", why)
StateFn = Callable[[Any, str, bool], tuple[str, str]]
# `runner(cfg, command, echo, state)` -> the stage's result (a manifest, a run record, results, ...); state is
# what `kdpipe run` planned ("run", "resume", "restart"), None from the CLI (the options as given)
RunFn = Callable[[Any, str, Echo, "str | None"], Any]


def always_run(cfg: Any, command: str, anything_ran: bool) -> tuple[str, str]:
    """The state of a stage that keeps nothing to skip by."""
    return "run", ""


@dataclass(frozen=True)
class Stage:
    """One stage: what the CLI command and a `kdpipe run` step are generated from.

    name: the command (``train-student``). config: its config dataclass. runner: does the work (it
    imports the recipe module inside, so building the CLI loads no torch). help: the command's
    ``--help`` text. output_key: the config field naming the output folder (``cache`` for
    cache-teacher). state: skip/resume given what is on disk. summary: one line about a result.
    report: what the command prints at the end (default: the summary). trains: writes a run record
    (kdpipe_run.json), as train-student and finetune do. repeatable: list options given once per
    value (``--model A --model B``). plan_kind: what `kdpipe.plan.report.step_line` predicts (or None).
    tabulates: its result is the evaluation table `kdpipe run` ends with. previous: the result a
    skipped step left behind (for that table). short_options: one-letter aliases (``output: -o``).
    required: options without which the stage cannot start (`kdpipe run --dry-run` names them).
    """

    name: str
    config: type
    runner: RunFn
    help: str
    output_key: str = "output"
    state: StateFn = always_run
    summary: Callable[[Any, Any], str] = lambda result, cfg: ""
    report: Callable[[Any, Any], str] | None = None
    trains: bool = False
    repeatable: tuple[str, ...] = ()
    plan_kind: str | None = None
    tabulates: bool = False
    previous: Callable[[Any], Any] = lambda cfg: None
    short_options: dict[str, str] = field(default_factory=dict)  # field -> "-o"
    required: tuple[str, ...] = ()

    def run(self, cfg: Any, command: str | None = None, echo: Echo = print, state: str | None = None) -> Any:
        """Run the stage on `cfg`; `command` is recorded in its outputs (default: rebuilt from `cfg`)."""
        return self.runner(cfg, command if command is not None else command_line(self, cfg), echo, state)

    def output(self, cfg: Any) -> Any:
        """The configured output folder (None until a default is filled in)."""
        return getattr(cfg, self.output_key)

    def set_output(self, cfg: Any, folder: str) -> str:
        """Fill in `folder` unless the config names one; return the output folder."""
        if not getattr(cfg, self.output_key):
            setattr(cfg, self.output_key, folder)
        return getattr(cfg, self.output_key)

    def final_report(self, result: Any, cfg: Any) -> str:
        return (self.report or self.summary)(result, cfg)


def flag_spelling(f: dataclasses.Field) -> tuple[str, str]:
    """The (on, off) spellings of a boolean config field: its ``flag`` metadata or ``--name/--no-name``."""
    name = f.name.replace("_", "-")
    on, _, off = (f.metadata.get("flag") or f"--{name}/--no-{name}").partition("/")
    return on, off


def command_line(stage: Stage, cfg: Any) -> str:
    """The `kdpipe ...` command that runs `stage` with `cfg`: every option that differs from its default,
    spelled as the CLI parses it (so the recorded command replays). The one rebuilder: the CLI records
    it in each stage's outputs, `kdpipe run` records it, prints it with --dry-run and compares it to
    decide what to skip."""
    defaults = stage.config()
    words = ["kdpipe", stage.name]
    for f in dataclasses.fields(cfg):
        value, default = getattr(cfg, f.name), getattr(defaults, f.name)
        if value == default:
            continue
        flag = f"--{f.name.replace('_', '-')}"
        if isinstance(value, bool):
            on, off = flag_spelling(f)
            words.append(on if value else off)
        elif isinstance(value, list):
            if f.name in stage.repeatable:
                for v in value:
                    words += [flag, str(v)]
            else:
                words += [flag, ",".join(map(str, value))]
        elif isinstance(value, dict):
            words += [flag, ",".join(f"{k}={v}" for k, v in value.items())]
        elif value is not None:
            words += [flag, str(value)]
    return shlex.join(words)
