"""What train-student and finetune share: options, the model to train, TrainingArguments, the run folder.

Training runs on `transformers.Trainer` (the subclasses are in `kdpipe.train.trainer`), so gradient
accumulation, mixed precision, LR schedules, checkpoints and resume, logging (`report_to`) and multi-GPU
runs (`accelerate launch` / `torchrun`, DDP) come from the ecosystem; `kdpipe.train.trainer.fit` trains and
saves.
LoRA setup is in `kdpipe.train.lora`.

The run folder (`--output`) holds Trainer's ``checkpoint-N/`` folders, ``kdpipe_run.json`` (options,
command, status, log history) and, at the end, the trained model with its tokenizer: a LoRA adapter
(``AutoPeftModelForCausalLM``), or a full / merged model (``AutoModelForCausalLM``); with
``--lora --merge`` the merged model is at the top and the adapter in ``adapter/``.

No torch or transformers at import (the stage configs derive from `TrainConfig` while the command line
parses its options): they load inside the functions that use them.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from pathlib import Path
from typing import Any

import yaml

from kdpipe.config import progress_disabled
from kdpipe.errors import KdpipeError, first_line
from kdpipe.precision import resolve_dtype
from kdpipe.train.config import TrainConfig

# ---------------------------------------------------------------- model


def load_trainable(cfg: TrainConfig) -> Any:
    """The model to train: all weights (fp32 master weights), or the base with LoRA adapters."""
    import torch

    from kdpipe.models import load_model
    from kdpipe.train.lora import add_lora

    dtype = "fp32"
    if cfg.lora and resolve_precision(cfg.precision) in ("bf16", "fp16"):
        dtype = resolve_precision(cfg.precision)  # a frozen base can stay in half precision
    torch.manual_seed(cfg.seed)
    model = load_model(cfg.model, dtype, "cpu", cfg.revision)  # Trainer places it
    model.config.use_cache = False
    return add_lora(model, cfg) if cfg.lora else model


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


# Set by kdpipe itself (the run folder, precision, the data path it builds); not for --training-args.
OWNED = ("output_dir", "bf16", "fp16", "use_cpu", "data_seed", "remove_unused_columns", "save_strategy",
         "logging_nan_inf_filter", "dataloader_pin_memory", "disable_tqdm", "gradient_checkpointing",
         "gradient_checkpointing_kwargs", "activation_checkpointing", "activation_checkpointing_kwargs")


def mirrored(cfg_class: type = TrainConfig) -> dict[str, str]:
    """kdpipe option -> the TrainingArguments field it is passed as (the options declared with `hf=`)."""
    return {f.name: f.metadata["hf"] for f in dataclasses.fields(cfg_class) if f.metadata.get("hf")}


def training_arguments(cfg: TrainConfig, output: Path) -> Any:
    """The TrainingArguments of a run: the mirrored options by their transformers names, kdpipe's own
    settings, then `cfg.training_args` (checked against the fields TrainingArguments has)."""
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
    kwargs = {hf: getattr(cfg, name) for name, hf in mirrored(type(cfg)).items()}
    kwargs.update(
        learning_rate=cfg.learning_rate,  # the default depends on --lora
        report_to=cfg.report_to or "none",
        output_dir=str(output),
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        **_checkpointing_args(cfg.gradient_checkpointing),
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=_multi_process_on_cpu(),
        data_seed=cfg.seed,
        logging_nan_inf_filter=False,  # a non-finite loss stops the run (KdpipeTrainer.training_step)
        save_strategy="steps",
        remove_unused_columns=False,
        disable_tqdm=progress_disabled(),
    )
    kwargs.update(extra_training_args(cfg, {f.name: f for f in dataclasses.fields(TrainingArguments)}))
    try:
        return TrainingArguments(**kwargs)
    except (ValueError, TypeError) as e:
        raise KdpipeError(f"invalid training options: {first_line(e)}") from None


def extra_training_args(cfg: TrainConfig, fields: dict[str, dataclasses.Field]) -> dict[str, Any]:
    """`--training-args name=value,...`: each name a TrainingArguments field that kdpipe neither mirrors nor
    sets itself; each value read as a YAML scalar (true, adamw_torch_fused), as a number where the
    field is one (YAML reads 1e-6 as text)."""
    by_hf = {hf: name for name, hf in mirrored(type(cfg)).items()}
    extra = {}
    for key, text in cfg.training_args.items():
        where = f"--training-args {key}"
        if key in by_hf:
            raise KdpipeError(f"{where}: set it with --{by_hf[key].replace('_', '-')} "
                              f"('{by_hf[key]}:' in a config file)")
        if key in OWNED:
            raise KdpipeError(f"{where}: kdpipe sets {key} itself (see --precision, "
                              "--gradient-checkpointing, --output, --seed)")
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise KdpipeError(f"{where}: transformers.TrainingArguments has no field {key!r}{hint}")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        default, declared = fields[key].default, fields[key].type
        number = next((t for t in (declared, type(default)) if t in (int, float)), None)
        if number and not isinstance(value, bool):
            try:
                value = number(value)
            except (TypeError, ValueError):
                raise KdpipeError(f"{where}: {text!r} is not {'an integer' if number is int else 'a number'} "
                                  f"(default {default})") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise KdpipeError(f"{where}: must be a finite number, not {text!r}")
        extra[key] = value
    return extra


def _multi_process_on_cpu() -> bool:
    """Launched as several processes (torchrun / accelerate launch) on a machine without CUDA.

    accelerate only sets up a CPU process group (gloo) when told the run is on CPU; without this,
    each process would silently train its own copy on the whole data.
    """
    import torch

    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def _checkpointing_args(enabled: bool) -> dict[str, Any]:
    """Activation checkpointing, under its transformers >= 5.2x name where it has one."""
    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    key = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {key: enabled, f"{key}_kwargs": {"use_reentrant": False} if enabled else None}
