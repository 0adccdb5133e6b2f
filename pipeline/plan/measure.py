"""`kdpipe plan --measure`: calibrate the plan's time figures with a few real steps on this machine.

The estimate's times come from FLOPs at an assumed fraction of the device's peak, which on a busy CPU
was 6-11x optimistic. ``--measure`` loads the given models (their weights: a local folder or the
local hub cache) and runs, per stage, one warm-up step and then `steps` timed steps on this machine
with the stage's real code and batch shape: random tokens of ``--mean-length`` (``--batch-size``
examples, packed, as train-student batches them; ``--targets-per-example`` targets each, top-k
teacher targets), the student's loss (`student_distill_loss`; alpha 0 for the fine-tunes), AdamW;
for cache-teacher a forward without gradients and the top-k of the targets' logits. Nothing is
written. Each stage then shows its median seconds per step, the epoch's time at that rate and the
ratio to the estimate. Online KD is not measured (its time is cache-teacher's plus train-student's).
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

from kdpipe.errors import KdpipeError


def measure(result: dict[str, Any], teacher: str | None, student: str | None, w: Any, steps: int = 3) -> None:
    """Add ``measured_step_seconds``, ``measured_seconds``, ``measured_steps`` and ``calibration`` to the
    stages of `result` (`make_plan`'s) that can be measured."""
    import torch

    from kdpipe.plan.estimate import teacher_rows

    device = "cuda" if torch.cuda.is_available() else "cpu"
    for s in result["stages"]:
        name = s["stage"]
        if name.startswith("online"):
            continue
        model_name = teacher if name.startswith(("cache-teacher", "teacher")) else student
        if name == "cache-teacher":
            rows = teacher_rows(w)
            step = _teacher_step(model_name, w, rows, device)
            total_steps = math.ceil(w.examples / rows)
        else:
            step = _train_step(model_name, w, alpha=0.5 if name == "train-student" else 0.0, device=device)
            total_steps = s["steps per epoch"]
        step()  # warm-up
        took = []
        for _ in range(steps):
            start = time.perf_counter()
            step()
            took.append(time.perf_counter() - start)
        per_step = statistics.median(took)
        total = per_step * total_steps
        s.update(measured_step_seconds=per_step, measured_steps=steps, measured_seconds=total,
                 calibration=total / s["seconds"] if s["seconds"] else float("nan"))
        del step
        if device == "cuda":
            torch.cuda.empty_cache()


def _batch(w: Any, rows: int, vocab: int, device: str) -> dict[str, Any]:
    """`rows` examples of the mean length, the last ``targets_per_example`` positions targets, packed."""
    import numpy as np
    import torch

    from kdpipe.train.packing import token_batch

    length = max(2, round(w.mean_length))
    targets = max(1, min(length - 1, round(w.targets_per_example)))
    rng = np.random.default_rng(0)
    tokens = [rng.integers(0, vocab, length) for _ in range(rows)]
    positions = [np.arange(length - 1 - targets, length - 1)] * rows
    batch = token_batch(tokens, positions, 0, packed=True, pack_length=w.max_length)
    batch["labels"] = batch["input_ids"][batch["target_rows"], batch["target_cols"] + 1]
    n, k = len(batch["labels"]), w.top_k
    batch["topk_ids"] = torch.from_numpy(rng.integers(0, vocab, (n, k)))
    logits = torch.from_numpy(rng.normal(size=(n, k + 1))).float()
    batch["topk_logprobs"] = logits.log_softmax(-1)[:, :k]
    batch["tail_mass"] = 1 - batch["topk_logprobs"].exp().sum(-1)
    return {key: v.to(device) for key, v in batch.items()}


def _load(name: str | None, dtype: str) -> Any:
    from kdpipe.models import load_model

    if not name:
        raise KdpipeError("--measure needs the model of every stage it measures")
    try:
        return load_model(name, dtype)
    except KdpipeError as e:
        raise KdpipeError(f"--measure loads the models' weights: {e.message}") from None


def _teacher_step(name: str | None, w: Any, rows: int, device: str) -> Any:
    import torch

    from kdpipe.precision import resolve_dtype
    from kdpipe.train.packing import model_inputs

    model = _load(name, resolve_dtype(w.teacher_dtype))
    batch = _batch(w, rows, model.config.get_text_config().vocab_size, device)
    body, head = model.base_model, model.get_output_embeddings()

    def step() -> None:
        with torch.no_grad():
            hidden = body(**model_inputs(batch), use_cache=False)[0]
            for start in range(0, len(batch["labels"]), w.teacher_chunk):
                sl = slice(start, start + w.teacher_chunk)
                logits = head(hidden[batch["target_rows"][sl], batch["target_cols"][sl]]).float()
                logits.log_softmax(-1).topk(w.top_k, -1)

    return step


def _train_step(name: str | None, w: Any, alpha: float, device: str) -> Any:
    import torch

    from kdpipe.losses import DistillLossConfig
    from kdpipe.precision import resolve_dtype
    from kdpipe.train.config import TrainConfig
    from kdpipe.train.setup import load_trainable
    from kdpipe.train.trainer import student_distill_loss

    if not name:
        raise KdpipeError("--measure needs the model of every stage it measures")
    cfg = TrainConfig(model=name, lora=w.lora, lora_r=w.lora_r, precision=w.precision,
                      gradient_checkpointing=w.gradient_checkpointing)
    model = load_trainable(cfg).to(device).train()
    if w.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = _batch(w, w.batch_size, model.config.get_text_config().vocab_size, device)
    loss_cfg = DistillLossConfig("fkl", alpha, 1.0, chunk_size=w.student_chunk)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    precision = resolve_dtype(w.precision)  # mixed precision as Trainer runs it (fp32 master weights)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def step() -> None:
        with torch.autocast(device, dtype=half, enabled=half is not None):
            loss = student_distill_loss(model, batch, loss_cfg)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step
