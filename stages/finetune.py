"""Supervised fine-tuning (cross-entropy only, LoRA or full): to adapt a teacher before caching it,
and the SFT-only student baseline.

Recipe: tokenize the data with the loss mask exactly as cache-teacher does, load the model, train
with `transformers.Trainer` (cross-entropy on the trained tokens through the same fused LM head + loss
path as train-student: ``train-student --alpha 0``'s loss, no full-vocabulary logits), save. Batches
are packed by default (``--batching``, `kdpipe.train.packing`).

Its config, recipe and registration (`STAGE`) are all here; the run folder's skip/resume rule is
train-student's (`kdpipe.stages.train_student.run_state`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdpipe import run_folder
from kdpipe.data.sources import DataConfig, load_examples
from kdpipe.data.templates import get_template
from kdpipe.errors import KdpipeError
from kdpipe.run_folder import slug
from kdpipe.stages.base import Stage
from kdpipe.stages.train_student import run_state, summary, training_runner
from kdpipe.train import setup as training
from kdpipe.train.config import TrainConfig


@dataclass
class FinetuneConfig(TrainConfig, DataConfig):
    """Options of `kdpipe finetune`: the data options of cache-teacher plus the training options."""

    def __post_init__(self) -> None:
        DataConfig.__post_init__(self)
        TrainConfig.__post_init__(self)

    def output_folder(self) -> Path:
        if self.output:
            return Path(self.output)
        source = self.dataset or "data"
        stem = Path(source).stem if Path(source).suffix else source.replace(":", "-").split("/")[-1]
        return Path("runs") / slug(f"sft-{stem}-{Path(self.model or 'model').name}")


@run_folder.locked
def run(cfg: FinetuneConfig, command: str = "", callbacks: list[Any] | None = None) -> dict[str, Any]:
    """Fine-tune `cfg.model` on `cfg.dataset`; returns the run record (kdpipe_run.json)."""
    from kdpipe.data.tokenize import tokenize_examples
    from kdpipe.losses import DistillLossConfig
    from kdpipe.models import load_tokenizer, source_record
    from kdpipe.train.data import BlockShuffleSampler, SFTCollator, TokenizedDataset
    from kdpipe.train.packing import choose_batching, pack_length_for
    from kdpipe.train.trainer import DistillTrainer, fit

    if not cfg.model:
        raise KdpipeError("no model given: pass --model (or 'model:' in the config file)")
    cfg.output = str(cfg.output_folder())
    tokenizer = load_tokenizer(cfg.model, cfg.revision)
    template = get_template(cfg.resolved_template(), cfg.label_names)
    selection = load_examples(cfg)
    examples, _report = tokenize_examples(selection.examples, template, tokenizer, cfg)
    identity = {"model": training.model_identity(cfg.model), **source_record(cfg.model),
                "data": selection.fingerprint}
    checkpoint = run_folder.check_output(cfg, "finetune", identity)

    cfg.model = identity["model"]
    args = training.training_arguments(cfg, Path(cfg.output))  # bad options: before the model loads
    model = training.load_trainable(cfg)
    # only now: bad options leave no folder behind
    batching = choose_batching(cfg.batching, model)  # packed, or the fallback with a note
    out = run_folder.start_run(cfg, "finetune", identity, command, checkpoint, used={"batching": batching})
    dataset = TokenizedDataset(examples)
    lengths = [len(e.input_ids) for e in examples] if batching == "grouped" else None
    sampler = BlockShuffleSampler([len(dataset)], cfg.seed, lengths=lengths, stripe=cfg.batch_size)
    packed = batching == "packed"
    collator = SFTCollator(tokenizer.pad_token_id, packed, pack_length_for(model, cfg.pack_length))
    trainer = DistillTrainer(  # cross-entropy on the trained tokens through the fused head: alpha 0
        loss_config=DistillLossConfig(alpha=0.0), model=model, args=args, train_dataset=dataset,
        data_collator=collator, processing_class=tokenizer, sampler=sampler, callbacks=callbacks,
    )
    return fit(trainer, cfg, out, tokenizer, checkpoint)


STAGE = Stage(
    name="finetune", config=FinetuneConfig, runner=training_runner(run),
    state=lambda cfg, command, ran: run_state("finetune", cfg, command, ran),
    summary=lambda record, cfg: summary(record, cfg.output) if record else "",
    trains=True, plan_kind="finetune", required=("model", "dataset"),
    help="""Supervised fine-tuning (cross-entropy only, LoRA or full): a teacher before caching, or the SFT
    baseline.

    \b
    Example:
      kdpipe finetune --model Qwen3-4B --dataset imdb --lora --merge --output runs/imdb-teacher
    """)
