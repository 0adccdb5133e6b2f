"""What train-student and finetune share: options, the model to train, TrainingArguments, the run folder.

Training runs on `transformers.Trainer` (the subclasses are in `kdpipe.trainer`), so gradient
accumulation, mixed precision, LR schedules, checkpoints and resume, logging (`report_to`) and multi-GPU
runs (`accelerate launch` / `torchrun`, DDP) come from the ecosystem; `kdpipe.trainer.fit` trains and saves.
LoRA setup is in `kdpipe.lora`.

The run folder (`--output`) holds Trainer's ``checkpoint-N/`` folders, ``kdpipe_run.json`` (options,
command, status, log history) and, at the end, the trained model with its tokenizer: a LoRA adapter
(``AutoPeftModelForCausalLM``), or a full / merged model (``AutoModelForCausalLM``); with
``--lora --merge`` the merged model is at the top and the adapter in ``adapter/``.

No torch or transformers at import (the stage configs derive from `TrainConfig` while the command line
parses its options): they load inside the functions that use them.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import click

import kdpipe
from kdpipe.config import option, progress_disabled, to_dict
from kdpipe.errors import KdpipeError
from kdpipe.precision import resolve_dtype

RUN_FILE = "kdpipe_run.json"
LOCK_FILE = ".lock"  # held by the running train-student / finetune for its whole run


@dataclass
class TrainConfig:
    """Options shared by `kdpipe train-student` and `kdpipe finetune`."""

    model: str | None = option(None, "Model to train: hub id, local path or short name (Qwen3-0.6B).")
    revision: str | None = option(None, "Hub revision (branch, tag or commit) of the model.")
    output: str | None = option(
        None, "Run folder: checkpoints, then the trained model and its tokenizer (default runs/<name>).")
    lora: bool = option(True, "Train LoRA adapters (default) or every weight.", flag="--lora/--full")
    lora_r: int = option(16, "LoRA rank.")
    lora_alpha: float = option(32.0, "LoRA alpha (scale = alpha / r).")
    lora_dropout: float = option(0.05, "Dropout on the LoRA input.")
    lora_target_modules: list[str] = option(
        [], "Modules to adapt, comma-separated (default per architecture: every attention and MLP "
        "projection; all-linear otherwise)."
    )
    epochs: float = option(1.0, "Passes over the data (ignored when --max-steps is set).")
    max_steps: int = option(-1, "Stop after this many optimizer steps (-1: use --epochs).")
    lr: float | None = option(None, "Peak learning rate (default 2e-4 with LoRA, 2e-5 full).")
    batch_size: int = option(8, "Examples per device per micro-batch.")
    grad_accum: int = option(1, "Micro-batches per optimizer step (gradient accumulation).")
    lr_scheduler: str = option(
        "cosine", "LR schedule (transformers names: linear, cosine, constant, constant_with_warmup, ...).")
    warmup: float = option(0.03, "Warmup: a fraction of the steps (< 1) or a number of steps (>= 1).")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    max_grad_norm: float = option(1.0, "Gradient clipping norm (0: off).")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = option(
        "auto", "Mixed precision: auto (fp16 on GPUs before compute capability 8 such as T4/V100, bf16 "
        "from 8, fp32 on CPU), bf16, fp16, fp32."
    )
    gradient_checkpointing: bool = option(False, "Recompute activations in backward (less memory, slower).")
    seed: int = option(0, "Seed of the initialisation, the data order and dropout.")
    resume: bool = option(False, "Continue the run in --output from its last checkpoint (same data order).")
    merge: bool = option(
        False, "With --lora: also merge the adapter into the base model (merged model at the top, adapter in "
        "adapter/).")
    save_steps: int = option(500, "Write a checkpoint every this many optimizer steps.")
    save_total_limit: int | None = option(
        2, "Keep at most this many checkpoints (oldest removed first; empty: keep all).")
    logging_steps: int = option(10, "Log the loss every this many optimizer steps.")
    report_to: list[str] = option(
        [], "Loggers, comma-separated: tensorboard, wandb, swanlab, ... (default none).")
    run_name: str | None = option(None, "Run name shown by the loggers.")
    num_workers: int = option(0, "DataLoader worker processes.")

    def __post_init__(self) -> None:
        for name in ("lora_r", "batch_size", "grad_accum", "save_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"max_steps must be positive (or -1 to use epochs), not {self.max_steps}")
        if self.max_steps == -1 and not self.epochs > 0:
            raise ValueError(f"epochs must be positive, not {self.epochs}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be positive, not {self.lr}")
        if not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be positive, not {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), not {self.lora_dropout}")
        if self.warmup < 0 or self.weight_decay < 0 or self.max_grad_norm < 0 or self.num_workers < 0:
            raise ValueError("warmup, weight_decay, max_grad_norm and num_workers must not be negative")
        if self.merge and not self.lora:
            raise ValueError("merge needs lora (a full fine-tune is already a plain model)")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (2e-4 if self.lora else 2e-5)


# ---------------------------------------------------------------- model


def load_trainable(cfg: TrainConfig) -> Any:
    """The model to train: all weights (fp32 master weights), or the base with LoRA adapters."""
    import torch

    from kdpipe.lora import add_lora
    from kdpipe.models import load_model

    dtype = "fp32"
    if cfg.lora and resolve_precision(cfg.precision) in ("bf16", "fp16"):
        dtype = resolve_precision(cfg.precision)  # a frozen base can stay in half precision
    torch.manual_seed(cfg.seed)
    model = load_model(cfg.model, dtype, "cpu", cfg.revision)  # Trainer places it
    model.config.use_cache = False
    return add_lora(model, cfg) if cfg.lora else model


def causal_lm(model: Any) -> Any:
    """The transformers causal LM under DDP / accelerate / peft wrappers."""
    while hasattr(model, "module") and not hasattr(model, "config"):
        model = model.module
    if hasattr(model, "get_base_model"):  # peft
        model = model.get_base_model()
    return model


def resolve_precision(precision: str) -> str:
    """`--precision` as given; auto: fp16 on GPUs before compute capability 8 (T4, V100), bf16 from 8, fp32
    on CPU."""
    return resolve_dtype(precision)


def model_identity(name: str) -> str:
    """A model name as recorded: an absolute path for a local folder, else the hub id."""
    from kdpipe.models import resolve_model_name

    resolved = resolve_model_name(name)
    return str(Path(resolved).resolve()) if Path(resolved).exists() else resolved


# ---------------------------------------------------------------- TrainingArguments


def training_arguments(cfg: TrainConfig, output: Path) -> Any:
    import torch
    from transformers import TrainingArguments

    precision = resolve_precision(cfg.precision)
    if precision == "fp16" and not torch.cuda.is_available():
        raise KdpipeError("--precision fp16 needs a GPU; use bf16 or fp32 on CPU")
    if torch.cuda.device_count() > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        raise KdpipeError(
            f"{torch.cuda.device_count()} GPUs are visible but no launcher started one process per GPU: run "
            "through `accelerate launch` or `torchrun --nproc-per-node N` (DDP), or pick one GPU with "
            "CUDA_VISIBLE_DEVICES"
        )
    try:
        return TrainingArguments(
            output_dir=str(output),
            num_train_epochs=cfg.epochs,
            max_steps=cfg.max_steps,
            learning_rate=cfg.learning_rate,
            per_device_train_batch_size=cfg.batch_size,
            gradient_accumulation_steps=cfg.grad_accum,
            lr_scheduler_type=cfg.lr_scheduler,
            warmup_steps=cfg.warmup,
            weight_decay=cfg.weight_decay,
            max_grad_norm=cfg.max_grad_norm,
            bf16=precision == "bf16",
            fp16=precision == "fp16",
            **_checkpointing_args(cfg.gradient_checkpointing),
            dataloader_pin_memory=torch.cuda.is_available(),
            use_cpu=_multi_process_on_cpu(),
            seed=cfg.seed,
            data_seed=cfg.seed,
            logging_steps=cfg.logging_steps,
            logging_nan_inf_filter=False,  # a non-finite loss stops the run (KdpipeTrainer.training_step)
            save_strategy="steps",
            save_steps=cfg.save_steps,
            save_total_limit=cfg.save_total_limit,
            report_to=cfg.report_to or "none",
            run_name=cfg.run_name,
            remove_unused_columns=False,
            dataloader_num_workers=cfg.num_workers,
            disable_tqdm=progress_disabled(),
        )
    except ValueError as e:
        raise KdpipeError(f"invalid training options: {str(e).splitlines()[0]}") from None


def _multi_process_on_cpu() -> bool:
    """Launched as several processes (torchrun / accelerate launch) on a machine without CUDA.

    accelerate only sets up a CPU process group (gloo) when told the run is on CPU; without this,
    each process would silently train its own copy on the whole data.
    """
    import torch

    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def _checkpointing_args(enabled: bool) -> dict[str, Any]:
    """Activation checkpointing, under its transformers >= 5.2x name where it has one."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    key = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {key: enabled, f"{key}_kwargs": {"use_reentrant": False} if enabled else None}


# ---------------------------------------------------------------- run folder


def locked(run_fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a stage's `run(cfg, ...)`: it holds its run folder's lock (``OUTPUT/.lock``) throughout."""
    @functools.wraps(run_fn)
    def run(cfg: Any, *args: Any, **kwargs: Any) -> Any:
        with run_lock(Path(cfg.output_folder())):
            return run_fn(cfg, *args, **kwargs)
    return run


@contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """The right to write run folder `out`: a second run into it fails at once (the checks before training
    write nothing, so without this two runs would both pass them and mix their outputs).

    A folder made only for the lock is removed again when the run fails before writing anything.
    """
    if int(os.environ.get("RANK", "0")) != 0 or (out.exists() and not out.is_dir()):  # a file: check_output
        yield
        return
    from filelock import FileLock, Timeout

    made = [p for p in (out, *out.parents) if not p.exists()]
    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(out / LOCK_FILE)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise KdpipeError(f"another kdpipe run is writing to {out} (its {LOCK_FILE} is held); wait for it to "
                          "finish or choose another --output") from None
    try:
        yield
    finally:
        lock.release()
        if made and [p.name for p in out.iterdir()] == [LOCK_FILE]:
            (out / LOCK_FILE).unlink()
            for folder in made:
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()


def check_output(cfg: TrainConfig, kind: str, identity: dict[str, Any]) -> str | None:
    """Check the run folder (writing nothing); returns the checkpoint to resume from, or None.

    A folder that already holds something is refused unless --resume, which needs a checkpoint and
    the same model and data; nothing that is there is ever deleted.
    """
    out = Path(cfg.output)
    if int(os.environ.get("RANK", "0")) != 0:  # multi-process run: the main process checks and records
        return last_checkpoint(out) if cfg.resume else None
    previous = _read_run(out / RUN_FILE)
    if cfg.resume:
        checkpoint = last_checkpoint(out, echo=lambda m: click.echo(m, err=True))
        # an unfinished run without a checkpoint starts over
        if checkpoint is None and (previous is None or previous.get("status") == "complete"):
            raise KdpipeError(
                f"--resume: {out} holds no checkpoint to resume from (Trainer writes checkpoint-N/ every "
                "--save-steps steps); start a new run without --resume"
            )
        if previous is not None:
            if previous.get("kind") != kind:
                raise KdpipeError(f"--resume: {out} holds a `kdpipe {previous.get('kind')}` run, "
                                  f"not a `kdpipe {kind}` run")
            before = previous.get("identity", {})
            changed = [k for k, v in identity.items() if before.get(k) != v]
            if changed:
                was = ", ".join(f"{k}={before.get(k)}" for k in changed)
                raise KdpipeError(
                    f"--resume: {out} was trained with another {', '.join(changed)} ({was}); "
                    "resume with the same model and data, or choose another --output"
                )
    else:
        checkpoint = None
        if out.exists() and (not out.is_dir() or any(p.name != LOCK_FILE for p in out.iterdir())):
            what = f"a `kdpipe {previous.get('kind')}` run" if previous else "other files"
            hint = " (pass --resume to continue it from its last checkpoint)" if last_checkpoint(out) else ""
            raise KdpipeError(f"output folder {out} already holds {what}{hint}; choose another --output "
                              "or remove it yourself")
    return checkpoint


def start_run(cfg: TrainConfig, kind: str, identity: dict[str, Any], command: str,
              checkpoint: str | None) -> Path:
    """Create the run folder and record the run as running (call after `check_output` and every other
    check)."""
    out = Path(cfg.output)
    if int(os.environ.get("RANK", "0")) != 0:
        return out
    run_file = out / RUN_FILE
    previous = _read_run(run_file)
    out.mkdir(parents=True, exist_ok=True)
    fresh = {"kind": kind, "identity": identity, "created": _now()}
    record = previous if (cfg.resume and previous) else fresh
    record.update({"kdpipe_version": kdpipe.__version__, "status": "running", "updated": _now(),
                   "config": to_dict(cfg), "command": command})
    if checkpoint:
        record.setdefault("resumed_from", []).append(Path(checkpoint).name)
    _write_run(run_file, record)
    return out


def last_checkpoint(folder: Path, echo: Callable[[str], None] | None = None) -> str | None:
    """The checkpoint-N folder with the largest N that holds Trainer's state and intact weight files (a
    complete checkpoint); `echo` is told about each newer one passed over as damaged."""
    if not folder.is_dir():
        return None
    found = []
    for path in folder.glob("checkpoint-*"):
        step = path.name.removeprefix("checkpoint-")
        if path.is_dir() and step.isdigit() and _read_run(path / "trainer_state.json") is not None:
            found.append((int(step), str(path)))  # Trainer writes trainer_state.json last: a kill mid-save leaves none or a torn one
    for _, path in sorted(found, reverse=True):
        damaged = damaged_files(Path(path))
        if not damaged:
            return path
        if echo:
            echo(f"note: {path} is damaged ({', '.join(damaged)}); passing over it to an earlier checkpoint")
    return None


def damaged_files(checkpoint: Path) -> list[str]:
    """Weight and state files of a checkpoint that are cut short: a safetensors file shorter or longer than
    its header says, a torch.save zip without its end record (a disk that filled, a copy that stopped)."""
    import zipfile

    damaged = []
    for file in sorted(checkpoint.iterdir()):
        if file.suffix == ".safetensors":
            try:
                with open(file, "rb") as f:
                    size = int.from_bytes(f.read(8), "little")
                    header = json.loads(f.read(size))
                end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
                ok = file.stat().st_size == 8 + size + end
            except (OSError, ValueError, KeyError, TypeError):
                ok = False
        elif file.suffix in (".pt", ".pth", ".bin"):
            ok = zipfile.is_zipfile(file)
        else:
            continue
        if not ok:
            damaged.append(f"{file.name} is truncated or unreadable")
    return damaged

def _read_run(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _write_run(path: Path, record: dict[str, Any]) -> None:
    from kdpipe.cache.storage import write_atomic

    write_atomic(path, (json.dumps(record, indent=2, default=str) + "\n").encode())


def _now() -> str:
    from kdpipe.cache.writer import now

    return now()


# Moved to kdpipe.lora / kdpipe.trainer; still importable from here for the modules other changes of
# issue 13 rewrite at the same time (cli's merge-lora, scoring). Remove once they import the new homes.
_MOVED = {"merge_lora": "kdpipe.lora", "lora_targets": "kdpipe.lora", "LORA_TARGETS": "kdpipe.lora",
          "student_hidden": "kdpipe.trainer", "student_distill_loss": "kdpipe.trainer"}


def __getattr__(name: str) -> Any:
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_MOVED[name]), name)
