"""The `transformers.Trainer` subclasses of train-student and finetune, `fit`, and the student's loss.

    finetune run()       ->  DistillTrainer (alpha = 0: cross-entropy on the fused head path)  ->  fit
    train-student run()  ->  DistillTrainer  ->  fit
                             DistillTrainer.compute_loss  ->  student_distill_loss  ->  losses.distill_loss

Trainer brings gradient accumulation, mixed precision, schedules, checkpoints and resume, logging and
multi-GPU runs; these subclasses only fix the data order (`sampler`), stop on a non-finite loss, name
a failed checkpoint write, and (DistillTrainer) replace `compute_loss`. `fit` trains, then saves the
model and marks the run record complete (or failed). This module imports transformers, so the stages
import it inside `run` and the command line stays fast.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer
from transformers.trainer_utils import TrainOutput

from kdpipe.errors import KdpipeError, first_line
from kdpipe.filemode import honour_umask
from kdpipe.losses import DistillLossConfig, SparseTargets, distill_loss
from kdpipe.losses.distill import loss_terms
from kdpipe.models import causal_lm, last_hidden_states, output_head
from kdpipe.run_folder import RUN_FILE, now, read_json, write_json
from kdpipe.train.config import TrainConfig
from kdpipe.train.packing import model_inputs, real_tokens

log = logging.getLogger(__name__)


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
            raise Diverged(f"the loss became {float(loss)} at step {self.state.global_step + 1}",
                           self.state.global_step)  # the weights of that step gave it
        return loss

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        check_finite(self.model, self.state.global_step)  # never a checkpoint that --resume would pick up
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
        self._terms: dict[str, float] = {}  # sums since the last log (this process's batches)
        self._since = time.perf_counter()

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        # the loss's parts cost one more pass of the LM head: only on the batches of a step that is logged
        logged = model.training and (self.state.global_step + 1) % self.args.logging_steps == 0
        if model.training:
            if not self._terms:  # the first batch since the last log: tokens/s counts from here
                self._since = time.perf_counter()
            self._count("tokens", real_tokens(inputs))
            self._count("positions", float(inputs["labels"].numel()))
        loss = student_distill_loss(model, inputs, self.loss_config, num_items_in_batch,
                                    self._terms if logged else None)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients; the count was global
        return (loss, None) if return_outputs else loss

    def _count(self, name: str, value: float) -> None:
        self._terms[name] = self._terms.get(name, 0.0) + value

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Trainer's log, plus kdpipe's own figures on the steps since the last one (what --report-to
        sends to tensorboard / wandb and run.json's log_history keeps): the loss's parts per target
        position on the logged step (`loss_terms`: kd/divergence, the --loss; kd/fkl, kd/rkl; kd/ce;
        kd/tail_mass) and input and target tokens per second (this process)."""
        if "loss" in logs and self._terms:
            terms, self._terms = self._terms, {}
            seconds = time.perf_counter() - self._since
            tokens, positions, n = (terms.pop(k, 0.0) for k in ("tokens", "positions", "diag_positions"))
            logs.update({f"kd/{k}": v / n for k, v in terms.items() if n})
            logs["kd/tokens_per_second"] = tokens / seconds
            logs["kd/target_tokens_per_second"] = positions / seconds
        super().log(logs, *args, **kwargs)


def make_trainer(distill: DistillLossConfig | None = None, **kwargs: Any) -> KdpipeTrainer:
    """A `KdpipeTrainer` (cross-entropy, the model's own loss) or, with `distill`, a `DistillTrainer`."""
    return DistillTrainer(loss_config=distill, **kwargs) if distill is not None else KdpipeTrainer(**kwargs)


# ---------------------------------------------------------------- train, then save


def fit(trainer: Any, cfg: TrainConfig, out: Path, tokenizer: Any, checkpoint: str | None) -> dict[str, Any]:
    """Train (resuming from `checkpoint`), then save the model and tokenizer into `out`; returns the run
    record."""
    start = time.perf_counter()
    if checkpoint and finished_state(checkpoint) is not None:
        # killed after the last step's checkpoint, before the record said complete: Trainer would train one
        # step more from it, so its weights are saved as they are
        if trainer.is_world_process_zero():
            log.info(f"note: {checkpoint} is the last step's checkpoint; saving its weights as the model "
                     "without training further")
        trainer._load_from_checkpoint(checkpoint)
        trainer.state = finished_state(checkpoint)
        result = TrainOutput(trainer.state.global_step, logged_mean_loss(trainer.state), {})
        return _save_or_fail(trainer, cfg, out, tokenizer, result, start)
    try:
        result = trainer.train(resume_from_checkpoint=checkpoint)
        check_finite(trainer.model, trainer.state.global_step)
    except Diverged as e:
        aside = _set_aside(out, e.bad_from) if trainer.is_world_process_zero() else []
        message = (f"training diverged: {e}. Nothing was saved as the model and {out} is marked failed, not "
                   f"complete{_aside_note(aside)}. Lower --lr (now {cfg.learning_rate:g}), keep "
                   "--max-grad-norm on, or check the data, then train again into a new --output")
        _mark_failed(trainer, out, message)
        raise KdpipeError(message) from None
    except KdpipeError as e:  # bad data met mid-run (a cache row group with NaN ...): stopped, resumable
        message = (f"{e.message.rstrip('.')}. {out} is marked failed, not complete; its checkpoints are "
                   "kept: once the cause is fixed, rerun the same command with --resume to continue from the "
                   "last one")
        _mark_failed(trainer, out, message)
        raise KdpipeError(message) from None
    return _save_or_fail(trainer, cfg, out, tokenizer, result, start)


def _save_or_fail(trainer: Any, cfg: TrainConfig, out: Path, tokenizer: Any, result: Any,
                  start: float) -> dict[str, Any]:
    """`_save`; a failed write (a full disk) marks the run failed and says what --resume will do: the
    weights trained since the last checkpoint leave with the process."""
    resume = (FROM_CHECKPOINT if any(out.glob("checkpoint-*")) else
              f"there is no checkpoint (--save-steps {cfg.save_steps}), so it trains again from scratch")
    try:
        with write_errors(out, resume):
            return _save(trainer, cfg, out, tokenizer, result, start)
    except KdpipeError as e:
        with contextlib.suppress(OSError):  # the record's own write may not fit either
            _mark_failed(trainer, out, e.message)
        raise


def check_finite(model: Any, step: int) -> None:
    """Raise Diverged when a trained weight holds nan or inf."""
    bad = [n for n, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
    if bad:
        raise Diverged(f"{len(bad)} trained weight tensor(s) hold nan or inf after step {step} "
                       f"({bad[0]}{', ...' if len(bad) > 1 else ''})", step)


def _set_aside(out: Path, bad_from: int) -> list[str]:
    """Rename the checkpoints that hold the weights which gave a non-finite loss (step >= `bad_from`) to
    diverged-checkpoint-N: kept to look at, never picked up by --resume."""
    moved = []
    for path in sorted(out.glob("checkpoint-*")):
        step = path.name.removeprefix("checkpoint-")
        if step.isdigit() and int(step) >= bad_from:
            path.rename(out / f"diverged-{path.name}")
            moved.append(path.name)
    return moved


def _aside_note(moved: list[str]) -> str:
    if not moved:
        return ""
    return (f"; {', '.join(moved)} held the weights that diverged: renamed diverged-checkpoint-N, so "
            "--resume never continues from them")


def _mark_failed(trainer: Any, out: Path, message: str) -> None:
    if trainer.is_world_process_zero():
        record = read_json(out / RUN_FILE) or {}
        write_json(out / RUN_FILE, {**record, "status": "failed", "error": message, "updated": now()})


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


def finished_state(checkpoint: str) -> Any:
    """The TrainerState of `checkpoint` if it was written at the run's last step, else None."""
    from transformers import TrainerState

    state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
    return state if state.max_steps and state.global_step >= state.max_steps else None


def logged_mean_loss(state: Any) -> float | None:
    """The run's mean loss from the logged losses (each the mean over its logging interval): Trainer's
    `training_loss` of a run that is not trained again; None when no loss was logged (--logging-steps)."""
    total, last, steps = 0.0, 0, 0
    for entry in state.log_history:
        if "loss" in entry:
            total += float(entry["loss"]) * (entry["step"] - last)
            steps += entry["step"] - last
            last = entry["step"]
    return total / steps if steps else None


class Diverged(Exception):
    """The loss or the trained weights became non-finite (nan or inf): the run stops, nothing is saved.
    `bad_from`: the first step whose weights are bad (a loss is computed with the previous step's)."""

    def __init__(self, message: str, bad_from: int) -> None:
        super().__init__(message)
        self.bad_from = bad_from


# what --resume does after a failed write of a checkpoint or the model
FROM_CHECKPOINT = "training continues from the last complete checkpoint"


@contextmanager
def write_errors(target: Path, resume: str = FROM_CHECKPOINT) -> Iterator[None]:
    """A failed write of a checkpoint or of the trained model -> a KdpipeError naming it (torch.save reports
    a full disk as a bare RuntimeError from its zip writer); `resume` says what --resume will then do."""
    from safetensors import SafetensorError  # safetensors' own: its "I/O error: No space left on device"

    try:
        yield
        honour_umask(target)  # weights are written 0600 by transformers; the rest of a run honours the umask
    except (OSError, RuntimeError, SafetensorError) as e:
        reason = getattr(e, "strerror", None) or first_line(e, 200)
        raise KdpipeError(
            f"could not write {target} ({reason}); is the disk full? Free some space and rerun with "
            f"--resume: {resume}"
        ) from None


# ---------------------------------------------------------------- the student's loss on a batch


def student_at_targets(model: Any, inputs: dict[str, Any]) -> tuple[torch.Tensor, Any]:
    """The student's last hidden states at the batch's target positions [T, D], and its LM head (whole
    again under FSDP2) to apply to them: full logits never exist."""
    hidden = last_hidden_states(model, **model_inputs(inputs))  # padded or packed rows
    selected = hidden[inputs["target_rows"], inputs["target_cols"]]
    _gather_fsdp_root(model)
    return selected, output_head(model)


def student_distill_loss(model: Any, inputs: dict[str, Any], cfg: DistillLossConfig,
                         num_items: Any = None, terms: dict[str, float] | None = None) -> torch.Tensor:
    """`distill_loss` of the student on a `DistillCollator` batch (hidden states at the targets, LM head);
    with `terms`, also add the loss's parts (`loss_terms`) and the position count to it."""
    selected, head = student_at_targets(model, inputs)
    targets = SparseTargets(inputs["topk_ids"], inputs["topk_logprobs"], inputs["tail_mass"],
                            inputs["labels"])
    loss = distill_loss(selected, head, targets, cfg, num_items=num_items)
    if terms is not None:
        for name, value in loss_terms(selected.detach(), head, targets, cfg).items():
            terms[name] = terms.get(name, 0.0) + value
        terms["diag_positions"] = terms.get("diag_positions", 0.0) + len(targets)
    return loss


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
