"""What train-student and finetune share: options, LoRA setup, the Trainer, the run folder, saving and merging.

Training runs on `transformers.Trainer`, so gradient accumulation, mixed precision, LR schedules,
checkpoints and resume, logging (`report_to`) and multi-GPU runs (`accelerate launch` / `torchrun`,
DDP) come from the ecosystem. `DistillTrainer` only replaces `compute_loss`.

The run folder (`--output`) holds Trainer's ``checkpoint-N/`` folders, ``kdpipe_run.json`` (options,
command, status, log history) and, at the end, the trained model with its tokenizer: a LoRA adapter
(``AutoPeftModelForCausalLM``), or a full / merged model (``AutoModelForCausalLM``); with
``--lora --merge`` the merged model is at the top and the adapter in ``adapter/``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from kdpipe.config import progress_disabled
from kdpipe.errors import KdpipeError
from kdpipe.losses import DistillLossConfig, SparseTargets, distill_loss
from kdpipe.models import load_model, resolve_model_name
from kdpipe.precision import resolve_dtype

# The run folder's bookkeeping lives in kdpipe.run_folder; re-exported here for the stages and old callers.
from kdpipe.run_folder import (LOCK_FILE, RUN_FILE, check_output, damaged_files, last_checkpoint,  # noqa: F401
                               locked, run_lock, start_run)
from kdpipe.run_folder import now as _now
from kdpipe.run_folder import read_json as _read_run
from kdpipe.run_folder import write_json as _write_run
from kdpipe.train_config import TrainConfig  # noqa: F401  (defined torch-free, for the CLI)

# LoRA target modules per model type: every linear projection of the blocks (not the LM head).
_DECODER_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_TARGETS: dict[str, list[str]] = {
    **{t: _DECODER_PROJ for t in ("llama", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mistral", "mixtral",
                                  "gemma", "gemma2", "gemma3_text", "olmo", "olmo2", "granite", "smollm3")},
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}


# ---------------------------------------------------------------- model


def load_trainable(cfg: TrainConfig) -> Any:
    """The model to train: all weights (fp32 master weights), or the base with LoRA adapters."""
    dtype = "fp32"
    if cfg.lora and resolve_precision(cfg.precision) in ("bf16", "fp16"):
        dtype = resolve_precision(cfg.precision)  # a frozen base can stay in half precision
    torch.manual_seed(cfg.seed)
    model = load_model(cfg.model, dtype, "cpu", cfg.revision)  # Trainer places it
    model.config.use_cache = False
    if not cfg.lora:
        return model
    from peft import LoraConfig, get_peft_model

    targets = cfg.lora_target_modules or lora_targets(model)
    targets = "all-linear" if targets == ["all-linear"] else targets
    if isinstance(targets, list):  # peft ignores a listed name that matches nothing as long as another matches
        modules = dict(model.named_modules())
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in modules)]
        if missing:
            weights = {n.rsplit(".", 1)[-1] for n, m in modules.items() if getattr(m, "weight", None) is not None and m.weight.dim() == 2}
            raise KdpipeError(f"--lora-target-modules: {cfg.model} has no module named {', '.join(missing)}; "
                              f"its weight matrices: {', '.join(sorted(weights))}")
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, lora)
    except ValueError as e:
        raise KdpipeError(f"LoRA setup failed for {cfg.model}: {str(e).splitlines()[0]} (check --lora-target-modules)") from None


def lora_targets(model: Any) -> list[str] | str:
    """Default LoRA targets for the model's architecture; peft's ``all-linear`` for the others."""
    targets = LORA_TARGETS.get(getattr(model.config, "model_type", ""))
    if targets is None:
        return "all-linear"
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    present = [t for t in targets if t in names]
    return present or "all-linear"


def causal_lm(model: Any) -> Any:
    """The transformers causal LM under DDP / accelerate / peft wrappers."""
    while hasattr(model, "module") and not hasattr(model, "config"):
        model = model.module
    if hasattr(model, "get_base_model"):  # peft
        model = model.get_base_model()
    return model


def resolve_precision(precision: str) -> str:
    """`--precision` as given; auto: fp16 on GPUs before compute capability 8 (T4, V100), bf16 from 8, fp32 on CPU."""
    return resolve_dtype(precision)


# ---------------------------------------------------------------- trainer


def training_arguments(cfg: TrainConfig, output: Path) -> Any:
    from transformers import TrainingArguments

    precision = resolve_precision(cfg.precision)
    if precision == "fp16" and not torch.cuda.is_available():
        raise KdpipeError("--precision fp16 needs a GPU; use bf16 or fp32 on CPU")
    if torch.cuda.device_count() > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        raise KdpipeError(
            f"{torch.cuda.device_count()} GPUs are visible but no launcher started one process per GPU: run through "
            "`accelerate launch` or `torchrun --nproc-per-node N` (DDP), or pick one GPU with CUDA_VISIBLE_DEVICES"
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
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def _checkpointing_args(enabled: bool) -> dict[str, Any]:
    """Activation checkpointing, under its transformers >= 5.2x name where it has one."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    key = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {key: enabled, f"{key}_kwargs": {"use_reentrant": False} if enabled else None}


def _trainer_classes() -> tuple[type, type]:
    """`KdpipeTrainer` (our sampler) and `DistillTrainer` (+ the sparse distillation loss), built lazily."""
    global _CLASSES
    if _CLASSES is not None:
        return _CLASSES
    from transformers import Trainer

    class KdpipeTrainer(Trainer):
        """Trainer whose training order comes from `sampler` (a pure function of seed and epoch)."""

        def __init__(self, *args: Any, sampler: Any = None, **kwargs: Any):
            self._kdpipe_sampler = sampler
            super().__init__(*args, **kwargs)

        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            return self._kdpipe_sampler if self._kdpipe_sampler is not None else super()._get_train_sampler(train_dataset)

        def training_step(self, *args: Any, **kwargs: Any) -> Any:
            loss = super().training_step(*args, **kwargs)
            if not torch.isfinite(loss):  # one sync per step, as Trainer's own NaN filter costs (turned off)
                raise Diverged(f"the loss became {float(loss)} at step {self.state.global_step + 1}")
            return loss

        def _save_checkpoint(self, model: Any, trial: Any) -> None:
            with write_errors(Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"):
                super()._save_checkpoint(model, trial)

    class DistillTrainer(KdpipeTrainer):
        """Trainer with `kdpipe.losses.distill_loss` on the batches of `DistillCollator`.

        The model's own forward runs (so DDP and peft hooks fire) with ``logits_to_keep=1``; a forward
        hook on the decoder body captures its last hidden state, and the LM head is applied only to the
        target positions, a chunk at a time inside `distill_loss`: full logits never exist. The loss
        is summed over positions and divided by Trainer's `num_items_in_batch` (all target positions of
        the accumulated batch, over all processes), so gradient accumulation and DDP are exact.
        """

        def __init__(self, *args: Any, loss_config: DistillLossConfig, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.loss_config = loss_config
            self.model_accepts_loss_kwargs = True  # count num_items_in_batch from our flattened labels
            self._loss_shifts_labels = False  # labels [N] are already the next tokens
            self.loss_is_scaled_for_ga = True

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            loss = student_distill_loss(model, inputs, self.loss_config, num_items_in_batch)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # DDP averages gradients; the count was global
            return (loss, None) if return_outputs else loss

    _CLASSES = (KdpipeTrainer, DistillTrainer)
    return _CLASSES


_CLASSES: tuple[type, type] | None = None


def make_trainer(distill: DistillLossConfig | None = None, **kwargs: Any) -> Any:
    """A `KdpipeTrainer` (cross-entropy, the model's own loss) or, with `distill`, a `DistillTrainer`."""
    plain, kd = _trainer_classes()
    return kd(loss_config=distill, **kwargs) if distill is not None else plain(**kwargs)


def student_hidden(model: Any, inputs: dict[str, Any]) -> Any:
    """The student's last hidden states [B, L, D] (after the final norm), through the model's forward."""
    import inspect

    lm = causal_lm(model)
    body = lm.base_model
    captured: dict[str, Any] = {}

    def hook(_module: Any, _args: Any, output: Any) -> None:
        captured["hidden"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    kwargs: dict[str, Any] = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], "use_cache": False}
    if "logits_to_keep" in inspect.signature(lm.forward).parameters:
        kwargs["logits_to_keep"] = 1
    handle = body.register_forward_hook(hook)
    try:
        model(**kwargs)
    finally:
        handle.remove()
    return captured["hidden"]


def student_distill_loss(model: Any, inputs: dict[str, Any], cfg: DistillLossConfig, num_items: Any = None) -> torch.Tensor:
    """`distill_loss` of the student on a `DistillCollator` batch (hidden states at the targets, LM head)."""
    hidden = student_hidden(model, inputs)
    selected = hidden[inputs["target_rows"], inputs["target_cols"]]
    targets = SparseTargets(inputs["topk_ids"], inputs["topk_logprobs"], inputs["tail_mass"], inputs["labels"])
    _gather_fsdp_root(model)
    head = causal_lm(model).get_output_embeddings()
    return distill_loss(selected, head, targets, cfg, num_items=num_items)


def _gather_fsdp_root(model: Any) -> None:
    """Under FSDP2 (`fully_shard`), gather the root module's own parameters (embeddings, final norm, LM head).

    The loss applies the LM head after the model's forward; when the root reshards after forward
    (accelerate's FSDP2 default), the head's weight is then a sharded DTensor. `unshard()` makes
    it whole again until FSDP's post-backward reshards it (FSDP2's own default for the root).
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return
    for module in (model, causal_lm(model)):
        if isinstance(module, FSDPModule):
            module.unshard()
            return


def fit(trainer: Any, cfg: TrainConfig, out: Path, tokenizer: Any, checkpoint: str | None) -> dict[str, Any]:
    """Train (resuming from `checkpoint`), then save the model and tokenizer into `out`; returns the run record."""
    start = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=checkpoint)
        params = trainer.model.named_parameters()
        bad = [n for n, p in params if p.requires_grad and not torch.isfinite(p).all()]
        if bad:
            raise Diverged(f"{len(bad)} trained weight tensor(s) hold nan or inf after step "
                           f"{trainer.state.global_step} ({bad[0]}{', ...' if len(bad) > 1 else ''})")
    except Diverged as e:
        message = (f"training diverged: {e}. Nothing was saved as the model and {out} is marked failed, not "
                   f"complete. Lower --lr (now {cfg.learning_rate:g}), keep --max-grad-norm on, or check the "
                   "data, then train again into a new --output")
        if trainer.is_world_process_zero():
            record = _read_run(out / RUN_FILE) or {}
            _write_run(out / RUN_FILE, {**record, "status": "failed", "error": message, "updated": _now()})
        raise KdpipeError(message) from None
    with write_errors(out):
        return _save(trainer, cfg, out, tokenizer, result, start)


def _save(trainer: Any, cfg: TrainConfig, out: Path, tokenizer: Any, result: Any, start: float) -> dict[str, Any]:
    """Save the model (adapter, full or merged) and its tokenizer into `out`; mark the run complete."""
    trainer.save_model(str(out))  # adapter (peft) or full model, with the tokenizer (processing_class)
    what = "LoRA adapter" if cfg.lora else "full model"
    if trainer.is_world_process_zero():
        if cfg.lora and cfg.merge:
            adapter = out / "adapter"
            adapter.mkdir(exist_ok=True)
            for name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md"):
                if (out / name).exists():
                    shutil.move(str(out / name), adapter / name)
            tokenizer.save_pretrained(adapter)
            merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
            merged.save_pretrained(out)
            tokenizer.save_pretrained(out)
            what = "merged model (adapter in adapter/)"
        record = _read_run(out / RUN_FILE) or {}
        record.update({"status": "complete", "updated": _now(), "saved": what,
                       "global_step": trainer.state.global_step, "train_loss": result.training_loss,
                       "train_seconds": round(time.perf_counter() - start, 2),
                       "log_history": trainer.state.log_history})
        _write_run(out / RUN_FILE, record)
        return record
    return {}


class Diverged(Exception):
    """The loss or the trained weights became non-finite (nan or inf): the run stops, nothing is saved."""


@contextmanager
def write_errors(target: Path) -> Iterator[None]:
    """A failed write of a checkpoint or of the trained model -> a KdpipeError naming it (torch.save reports
    a full disk as a bare RuntimeError from its zip writer)."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        reason = getattr(e, "strerror", None) or (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise KdpipeError(
            f"could not write {target} ({reason}); is the disk full? Free some space and rerun with --resume: "
            "training continues from the last complete checkpoint"
        ) from None


def merge_lora(adapter: str | Path, output: str | Path) -> Path:
    """Merge a LoRA adapter folder into its base model (peft `merge_and_unload`); save it with its tokenizer."""
    adapter, output = Path(adapter), Path(output)
    config_file = adapter / "adapter_config.json"
    if not config_file.is_file():
        raise KdpipeError(f"{adapter} is not a LoRA adapter folder (no adapter_config.json)")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise KdpipeError(f"output folder {output} is not empty; choose another --output")
    from peft import AutoPeftModelForCausalLM

    from kdpipe.models import load_tokenizer

    base = json.loads(config_file.read_text()).get("base_model_name_or_path")
    try:
        model = AutoPeftModelForCausalLM.from_pretrained(str(adapter), dtype="auto")
    except Exception as e:
        reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise KdpipeError(f"could not load the adapter {adapter} on its base model {base}: {reason}") from None
    has_tokenizer = any((adapter / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = load_tokenizer(str(adapter) if has_tokenizer else base)
    merged = model.merge_and_unload()
    output.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(output)
    tokenizer.save_pretrained(output)
    return output


def model_identity(name: str) -> str:
    """A model name as recorded: an absolute path for a local folder, else the hub id."""
    resolved = resolve_model_name(name)
    return str(Path(resolved).resolve()) if Path(resolved).exists() else resolved
