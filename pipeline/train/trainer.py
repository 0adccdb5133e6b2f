"""The `transformers.Trainer` subclasses of train-student and finetune, `fit`, and the student's loss.

    finetune run()       ->  KdpipeTrainer (the model's own cross-entropy)  ->  fit
    train-student run()  ->  DistillTrainer  ->  fit
                             DistillTrainer.compute_loss  ->  student_distill_loss  ->  losses.distill_loss

Trainer brings gradient accumulation, mixed precision, schedules, checkpoints and resume, logging and
multi-GPU runs; these subclasses only fix the data order (`sampler`), stop on a non-finite loss, name
a failed checkpoint write, and (DistillTrainer) replace `compute_loss`. `fit` trains, then saves the
model and marks the run record complete (or failed). This module imports transformers, so the stages
import it inside `run` and the command line stays fast.
"""

from __future__ import annotations

import inspect
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer

from kdpipe.cache.storage import honour_umask
from kdpipe.errors import KdpipeError
from kdpipe.losses import DistillLossConfig, SparseTargets, distill_loss
from kdpipe.run_folder import RUN_FILE, now, read_json, write_json
from kdpipe.train.config import TrainConfig
from kdpipe.train.setup import causal_lm


class KdpipeTrainer(Trainer):
    """Trainer whose training order comes from `sampler` (a pure function of seed and epoch)."""

    def __init__(self, *args: Any, sampler: Any = None, **kwargs: Any):
        self._kdpipe_sampler = sampler
        super().__init__(*args, **kwargs)

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        if self._kdpipe_sampler is not None:
            return self._kdpipe_sampler
        return super()._get_train_sampler(train_dataset)

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


def make_trainer(distill: DistillLossConfig | None = None, **kwargs: Any) -> KdpipeTrainer:
    """A `KdpipeTrainer` (cross-entropy, the model's own loss) or, with `distill`, a `DistillTrainer`."""
    return DistillTrainer(loss_config=distill, **kwargs) if distill is not None else KdpipeTrainer(**kwargs)


# ---------------------------------------------------------------- train, then save


def fit(trainer: Any, cfg: TrainConfig, out: Path, tokenizer: Any, checkpoint: str | None) -> dict[str, Any]:
    """Train (resuming from `checkpoint`), then save the model and tokenizer into `out`; returns the run
    record."""
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
            record = read_json(out / RUN_FILE) or {}
            write_json(out / RUN_FILE, {**record, "status": "failed", "error": message, "updated": now()})
        raise KdpipeError(message) from None
    with write_errors(out):
        return _save(trainer, cfg, out, tokenizer, result, start)


def _save(trainer: Any, cfg: TrainConfig, out: Path, tokenizer: Any, result: Any,
          start: float) -> dict[str, Any]:
    """Save the model (adapter, full or merged) and its tokenizer into `out`; mark the run complete."""
    trainer.save_model(str(out))  # adapter (peft) or full model, with the tokenizer (processing_class)
    what = "LoRA adapter" if cfg.lora else "full model"
    if trainer.is_world_process_zero():
        if cfg.lora and cfg.merge:
            adapter = out / "adapter"
            adapter.mkdir(exist_ok=True)
            moved = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md")
            for name in moved:
                if (out / name).exists():
                    shutil.move(str(out / name), adapter / name)
            tokenizer.save_pretrained(adapter)
            merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
            merged.save_pretrained(out)
            tokenizer.save_pretrained(out)
            what = "merged model (adapter in adapter/)"
        record = read_json(out / RUN_FILE) or {}
        record.update({"status": "complete", "updated": now(), "saved": what,
                       "global_step": trainer.state.global_step, "train_loss": result.training_loss,
                       "train_seconds": round(time.perf_counter() - start, 2),
                       "log_history": trainer.state.log_history})
        write_json(out / RUN_FILE, record)
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
        honour_umask(target)  # weights are written 0600 by transformers; the rest of a run honours the umask
    except (OSError, RuntimeError) as e:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        reason = getattr(e, "strerror", None) or first_line
        raise KdpipeError(
            f"could not write {target} ({reason}); is the disk full? Free some space and rerun with "
            "--resume: training continues from the last complete checkpoint"
        ) from None


# ---------------------------------------------------------------- the student's loss on a batch


def student_hidden(model: Any, inputs: dict[str, Any]) -> Any:
    """The student's last hidden states [B, L, D] (after the final norm), through the model's forward."""
    lm = causal_lm(model)
    body = lm.base_model
    captured: dict[str, Any] = {}

    def hook(_module: Any, _args: Any, output: Any) -> None:
        captured["hidden"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    kwargs: dict[str, Any] = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
                              "use_cache": False}
    if "logits_to_keep" in inspect.signature(lm.forward).parameters:
        kwargs["logits_to_keep"] = 1
    handle = body.register_forward_hook(hook)
    try:
        model(**kwargs)
    finally:
        handle.remove()
    return captured["hidden"]


def student_distill_loss(model: Any, inputs: dict[str, Any], cfg: DistillLossConfig,
                         num_items: Any = None) -> torch.Tensor:
    """`distill_loss` of the student on a `DistillCollator` batch (hidden states at the targets, LM head)."""
    hidden = student_hidden(model, inputs)
    selected = hidden[inputs["target_rows"], inputs["target_cols"]]
    targets = SparseTargets(inputs["topk_ids"], inputs["topk_logprobs"], inputs["tail_mass"],
                            inputs["labels"])
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
