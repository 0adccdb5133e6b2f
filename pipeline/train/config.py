"""The options train-student and finetune share (`TrainConfig`), torch-free so that the CLI can build its
options (and `kdpipe --help`) without importing the training stack (`kdpipe.train.setup`).

Where an option is a `transformers.TrainingArguments` field under a shorter name, its `hf=` says which
(`kdpipe.train.setup.training_arguments` passes every such option by that name); any other field of
TrainingArguments is reachable through `training_args` rather than mirrored here. Not a subclass of
TrainingArguments: that would import transformers (and torch) for `kdpipe --help`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kdpipe.config import option


@dataclass
class TrainConfig:
    """Options shared by `kdpipe train-student` and `kdpipe finetune`."""

    model: str | None = option(None, "Model to train: hub id, local path or short name (Qwen3-0.6B).")
    revision: str | None = option(None, "Hub revision (branch, tag or commit) of the model.")
    output: str | None = option(None, "Run folder: checkpoints, then the trained model and its tokenizer "
                                      "(default runs/<name>).")
    lora: bool = option(True, "Train LoRA adapters (default) or every weight.", flag="--lora/--full")
    lora_r: int = option(16, "LoRA rank.")
    lora_alpha: float = option(32.0, "LoRA alpha (scale = alpha / r).")
    lora_dropout: float = option(0.05, "Dropout on the LoRA input.")
    lora_target_modules: list[str] = option(
        [], "Modules to adapt, comma-separated (default per architecture: every attention and MLP "
            "projection; all-linear otherwise)."
    )
    epochs: float = option(1.0, "Passes over the data (ignored when --max-steps is set).",
                           hf="num_train_epochs")
    max_steps: int = option(-1, "Stop after this many optimizer steps (-1: use --epochs).", hf="max_steps")
    lr: float | None = option(None, "Peak learning rate (default 2e-4 with LoRA, 2e-5 full).",
                              hf="learning_rate")
    batch_size: int = option(8, "Examples per device per micro-batch.", hf="per_device_train_batch_size")
    grad_accum: int = option(1, "Micro-batches per optimizer step (gradient accumulation).",
                             hf="gradient_accumulation_steps")
    lr_scheduler: str = option("cosine", "LR schedule (transformers names: linear, cosine, constant, "
                                         "constant_with_warmup, ...).", hf="lr_scheduler_type")
    warmup: float = option(0.03, "Warmup: a fraction of the steps (< 1) or a number of steps (>= 1).",
                           hf="warmup_steps")
    weight_decay: float = option(0.0, "AdamW weight decay.", hf="weight_decay")
    max_grad_norm: float = option(1.0, "Gradient clipping norm (0: off).", hf="max_grad_norm")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = option(
        "auto", "Mixed precision: auto (fp16 on GPUs before compute capability 8 such as T4/V100, bf16 from "
                "8, "
        "fp32 on CPU), bf16, fp16, fp32."
    )
    batching: Literal["packed", "grouped", "padded"] = option(
        "packed", "How examples share a micro-batch: packed (side by side in shared rows, attention kept "
                  "within each example, no padding; falls back to grouped with a note where the model "
                  "cannot), grouped (padded batches of similar lengths), padded (each batch padded to its "
                  "longest example)."
    )
    pack_length: int | None = option(None, "--batching packed: tokens per packed row (default: the batch's "
                                           "longest example).")
    gradient_checkpointing: bool = option(False, "Recompute activations in backward (less memory, slower).")
    seed: int = option(0, "Seed of the initialisation, the data order and dropout.", hf="seed")
    resume: bool = option(False, "Continue the run in --output from its last checkpoint (same data order; "
                                 "the options it was started with); a finished run is left as it is.")
    merge: bool = option(False, "With --lora: also merge the adapter into the base model (merged model at "
                                "the top, adapter in adapter/).")
    save_steps: int = option(500, "Write a checkpoint every this many optimizer steps.", hf="save_steps")
    save_total_limit: int | None = option(2, "Keep at most this many checkpoints (oldest removed first; "
                                             "empty: keep all).", hf="save_total_limit")
    logging_steps: int = option(10, "Log the loss every this many optimizer steps.", hf="logging_steps")
    report_to: list[str] = option([], "Loggers, comma-separated: tensorboard, wandb, swanlab, ... (default "
                                      "none).", hf="report_to")
    run_name: str | None = option(None, "Run name shown by the loggers.", hf="run_name")
    num_workers: int = option(0, "DataLoader worker processes.", hf="dataloader_num_workers")
    training_args: dict[str, str] = option(
        {}, "Any other transformers TrainingArguments field, name=value pairs separated by commas (e.g. "
            "optim=adamw_torch_fused,adam_beta2=0.95); values are read as YAML scalars.")

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
        if self.pack_length is not None and self.pack_length < 2:
            raise ValueError(f"pack_length must be at least 2, not {self.pack_length}")
        if self.merge and not self.lora:
            raise ValueError("merge needs lora (a full fine-tune is already a plain model)")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (2e-4 if self.lora else 2e-5)
