"""The list of stages: the CLI generates one command per entry, `kdpipe run` plans its steps over them.

Each entry's runner imports its recipe module (``kdpipe.stages.cache_teacher`` ...) only when the stage
runs; configs come from the torch-free `kdpipe.stages.configs`. To add a stage, define its torch-free
config and a `Stage` in a module that imports no torch at module level, and `register` it (or list it
in `STAGES` below).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdpipe.config import to_dict
from kdpipe.errors import KdpipeError
from kdpipe.run_folder import RUN_FILE, holds_other_files, last_checkpoint, read_json
from kdpipe.stages.base import Echo, Stage
from kdpipe.stages.configs import (
    CacheTeacherConfig,
    EvaluateConfig,
    FinetuneConfig,
    GenerateConfig,
    TrainStudentConfig,
)
from kdpipe.stages.init_model import STAGE as INIT_MODEL
from kdpipe.stages.init_model import changed

if TYPE_CHECKING:
    from kdpipe.cache.manifest import Manifest

# ---------------------------------------------------------------- cache-teacher


def cache_manifest(location: str) -> Manifest | None:
    """The manifest of a cache folder or URL, None when there is none (yet) or it is unreadable."""
    from kdpipe.cache.manifest import Manifest

    try:
        return Manifest.read(location)
    except (KdpipeError, OSError):
        return None


def _cache_state(cfg: CacheTeacherConfig, command: str, anything_ran: bool) -> tuple[str, str]:
    manifest = cache_manifest(cfg.cache)
    if manifest is None:
        return "run", ""
    if manifest.command == command and manifest.complete:
        return "skip", f"{cfg.cache} is complete with the same settings"
    if manifest.command == command:
        return "resume", (f"{cfg.cache} is partly written; cache-teacher continues after its last "
                          "complete shard")
    return "run", (f"{cfg.cache} holds another cache; cache-teacher decides (same settings resume, others "
                   "are "
                   "refused unless overwrite)")


def _cache_run(cfg: CacheTeacherConfig, command: str, echo: Echo, state: str) -> Any:
    from kdpipe.stages import cache_teacher

    return cache_teacher.run(cfg, command)


def _cache_summary(manifest: dict[str, Any], cfg: CacheTeacherConfig) -> str:
    from kdpipe.stages import cache_teacher

    return f"cached {cache_teacher.summary(manifest)} -> {cfg.cache_folder()}"


CACHE_TEACHER = Stage(
    name="cache-teacher", config=CacheTeacherConfig, runner=_cache_run, output_key="cache",
    state=_cache_state, summary=_cache_summary, plan_kind="cache", required=("model", "dataset"),
    help="""Run the teacher once over a dataset and cache each target token's top-k distribution.

    \b
    Example:
      kdpipe cache-teacher --model Qwen3-4B --dataset imdb --top-k 32 --cache cache/imdb
    Rerunning the same command resumes after the last complete shard.
    """)

# ---------------------------------------------------------------- generate


def _generate_state(cfg: GenerateConfig, command: str, anything_ran: bool) -> tuple[str, str]:
    """From the output's sidecar: complete with the same command: skip; partly written: resume."""
    from kdpipe.data.generated import sidecar_path

    record = read_json(sidecar_path(cfg.output)) if cfg.output else None
    if record is None:
        return "run", ""
    if record.get("complete") and record.get("command") == command:
        return "skip", f"{cfg.output} is complete with the same settings"
    if not record.get("complete"):
        return "resume", f"{cfg.output} is partly written; generate continues after its last complete row"
    return "run", (f"{cfg.output} was written by another command; generate decides (same settings: nothing "
                   "to do)")


def _generate_run(cfg: GenerateConfig, command: str, echo: Echo, state: str) -> Any:
    from kdpipe.stages import generate

    return generate.run(cfg, command)


def _generate_summary(record: dict[str, Any], cfg: GenerateConfig) -> str:
    from kdpipe.stages import generate

    return generate.summary(record, cfg.output)


GENERATE = Stage(
    name="generate", config=GenerateConfig, runner=_generate_run, summary=_generate_summary,
    state=_generate_state, required=("model", "dataset"),
    help="""Write a model's completions of the template's prompts as a dataset (sequence-level or on-policy
    KD data).

    \b
    Example:
      kdpipe generate --model runs/demo/teacher --dataset kdpipe:arithmetic --output data/teacher-gen.jsonl
    Rerunning the same command continues after the last complete row.
    """)

# ---------------------------------------------------------------- finetune, train-student


def _same_model(record: dict[str, Any], model: str | None) -> bool:
    from kdpipe.train.setup import model_identity

    recorded = record.get("identity", {}).get("model")
    try:
        return recorded == model_identity(model or "")
    except Exception:
        return recorded == model


def run_state(kind: str, cfg: Any, command: str, anything_ran: bool) -> tuple[str, str]:
    """A training stage's state from its run record: skip when complete with the same settings, resume
    from the last checkpoint, or restart one interrupted before its first checkpoint."""
    out = Path(cfg.output)
    record = read_json(out / RUN_FILE)
    if record is None:
        if holds_other_files(out):
            raise KdpipeError(f"{out} already holds files that are not a kdpipe run; remove it or choose "
                              "another output")
        return "run", ""
    ignore = {"model", "output", "resume"}
    before = {k: v for k, v in (record.get("config") or {}).items() if k not in ignore}
    now = {k: v for k, v in to_dict(cfg).items() if k not in ignore}
    same = record.get("kind") == kind and before == now and _same_model(record, cfg.model)
    if not same:
        raise KdpipeError(
            f"{out} holds a `kdpipe {record.get('kind')}` run with other settings "
            f"({changed(before, now) or 'model'}); "
            "remove it or choose another output"
        )
    cached = record.get("identity", {}).get("cache")
    manifests = [cache_manifest(c) for c in (cfg.caches() if hasattr(cfg, "caches") else [])]
    hashes = [m.settings_hash for m in manifests if m]
    if cached and len(hashes) == len(manifests) and (hashes[0] if len(hashes) == 1 else hashes) != cached:
        raise KdpipeError(f"{out} was trained on another cache than {cfg.cache} (settings differ); "
                          "remove it to train again on this cache")
    if record.get("status") == "complete":
        return "skip", f"{out} is complete with the same settings"
    if last_checkpoint(out):
        return "resume", f"{out} was interrupted; resuming from {Path(last_checkpoint(out)).name}"
    return "restart", f"{out} was interrupted before its first checkpoint; starting it over"


def _training_runner(module: str) -> Any:
    def runner(cfg: Any, command: str, echo: Echo, state: str) -> Any:
        import importlib

        if state == "restart":  # interrupted before its first checkpoint: nothing to keep
            shutil.rmtree(cfg.output)
        if state is not None:  # planned by `kdpipe run` (the CLI passes None: --resume as the user gave it)
            cfg = dataclasses.replace(cfg, resume=state == "resume")
        return importlib.import_module(module).run(cfg, command)
    return runner


def _training_summary(record: dict[str, Any], cfg: Any) -> str:
    from kdpipe.stages import train_student

    return train_student.summary(record, cfg.output) if record else ""


FINETUNE = Stage(
    name="finetune", config=FinetuneConfig, runner=_training_runner("kdpipe.stages.finetune"),
    state=lambda cfg, command, ran: run_state("finetune", cfg, command, ran), summary=_training_summary,
    trains=True, plan_kind="finetune", required=("model", "dataset"),
    help="""Supervised fine-tuning (cross-entropy only, LoRA or full): a teacher before caching, or the SFT
    baseline.

    \b
    Example:
      kdpipe finetune --model Qwen3-4B --dataset imdb --lora --merge --output runs/imdb-teacher
    """)

TRAIN_STUDENT = Stage(
    name="train-student", config=TrainStudentConfig, runner=_training_runner("kdpipe.stages.train_student"),
    state=lambda cfg, command, ran: run_state("train-student", cfg, command, ran), summary=_training_summary,
    trains=True, plan_kind="train", repeatable=("cache",), required=("cache", "model"),
    help="""Train a student (LoRA or full) against a teacher cache with a sparse distillation loss.

    \b
    Example:
      kdpipe train-student --cache cache/imdb --model Qwen3-0.6B --output runs/imdb-0.6b \\
          --loss fkl --alpha 0.5
    Multi-GPU: accelerate launch -m kdpipe.cli train-student ...
           (or torchrun --nproc-per-node N -m kdpipe.cli ...)
    """)

# ---------------------------------------------------------------- evaluate


def _evaluate_state(cfg: EvaluateConfig, command: str, anything_ran: bool) -> tuple[str, str]:
    results = read_json(Path(cfg.output) / "results.json")
    if results is not None and results.get("command") == command and not anything_ran:
        return "skip", f"{cfg.output}/results.json is from the same command"
    return "run", ""


def _evaluate_run(cfg: EvaluateConfig, command: str, echo: Echo, state: str) -> Any:
    from kdpipe.stages import evaluate

    return evaluate.run(cfg, command, echo=echo)


def _evaluate_summary(results: dict[str, Any], cfg: EvaluateConfig) -> str:
    from kdpipe.stages import evaluate

    return evaluate.summary(results)


def _evaluate_report(results: dict[str, Any], cfg: EvaluateConfig) -> str:
    from kdpipe.stages import evaluate

    return evaluate.format_table(results) + "\n" + evaluate.summary(results)


EVALUATE = Stage(
    name="evaluate", config=EvaluateConfig, runner=_evaluate_run, state=_evaluate_state,
    summary=_evaluate_summary, report=_evaluate_report, repeatable=("model",), tabulates=True,
    previous=lambda cfg: read_json(Path(cfg.output) / "results.json"),
    help="""Evaluate models side by side: task metrics, fidelity to the teacher, lm-eval benchmarks.

    \b
    Examples:
      kdpipe evaluate                                   # latest finished run: student, base, teacher
      kdpipe evaluate --model runs/demo-student --model runs/demo/teacher \\
          --dataset kdpipe:arithmetic --split test
      kdpipe evaluate --model runs/imdb-0.6b --dataset imdb --split test --limit 500 \\
          --cache cache/imdb-heldout
    Writes results.json, results.csv, predictions.jsonl and metrics.png to --output
    (default RUN/eval or eval).
    """)

# ---------------------------------------------------------------- the list

STAGES: list[Stage] = [INIT_MODEL, CACHE_TEACHER, GENERATE, FINETUNE, TRAIN_STUDENT, EVALUATE]


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
