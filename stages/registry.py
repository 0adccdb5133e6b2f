"""The list of stages: the CLI generates one command per entry, `kdpipe run` plans its steps over them.

Each stage lives in one module of `kdpipe.stages`: its torch-free config, its recipe (`run`) and its
`STAGE`, the `Stage` that names them for the command line and for `kdpipe run`. To add a stage, write such
a module (no torch at module level: `kdpipe --help` builds every command's options) and `register` its
`STAGE` (or list it in `STAGES` below).
"""

from __future__ import annotations

from kdpipe.stages import cache_teacher, evaluate, finetune, generate, init_model, train_student
from kdpipe.stages.base import Stage

STAGES: list[Stage] = [init_model.STAGE, cache_teacher.STAGE, generate.STAGE, finetune.STAGE,
                       train_student.STAGE, evaluate.STAGE]


def register(stage: Stage) -> Stage:
    """Add a stage (its CLI command and its use in `kdpipe run` step tables); returns it."""
    if any(s.name == stage.name for s in STAGES):
        raise ValueError(f"a stage named {stage.name!r} is already registered")
    STAGES.append(stage)
    return stage


def get(name: str) -> Stage:
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise KeyError(name)
