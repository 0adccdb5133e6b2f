"""Stage two: train a student (LoRA or full) against the teacher's cached sparse distributions.

Recipe: check the cache (checksums, counts, not empty) and the student's tokenizer against it, load
the student alone, stream the cache a row group at a time in a seeded order, train with the sparse
distillation loss through `transformers.Trainer`, save the model (or adapter, or merged model).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe import run_folder
from kdpipe.cache.reader import Cache
from kdpipe.cache.sections import SparseMode
from kdpipe.cache.verified import open_checked
from kdpipe.errors import KdpipeError
from kdpipe.losses import BiasedOnSampled, DistillLossConfig
from kdpipe.stages.configs import TrainStudentConfig
from kdpipe.train import setup as training
from kdpipe.vocab import routes as student_vocab

# The config is defined torch-free in kdpipe.stages.configs (the CLI builds its options from it).


@run_folder.locked
def run(cfg: TrainStudentConfig, command: str = "", callbacks: list[Any] | None = None) -> dict[str, Any]:
    """Train the student of `cfg` on its cache; returns the run record (kdpipe_run.json)."""
    from kdpipe.models import load_tokenizer, source_record
    from kdpipe.train.data import BlockShuffleSampler, CacheDataset, DistillCollator
    from kdpipe.train.mix import MixedCacheDataset, cache_identity, check_distinct, check_mixable
    from kdpipe.train.packing import choose_batching, pack_length_for
    from kdpipe.train.trainer import DistillTrainer, fit
    from kdpipe.vocab.uld import CrossTokenizerTrainer

    if not cfg.cache:
        raise KdpipeError("no cache given: pass --cache (a folder written by `kdpipe cache-teacher`)")
    if not cfg.model:
        raise KdpipeError("no student given: pass --model (or 'model:' in the config file)")
    cfg.output = str(cfg.output_folder())
    caches = [open_checked(c, cfg.verify) for c in cfg.caches()]
    check_mixable(caches)  # several caches: same teacher, tokenizer and sparse settings
    check_distinct(caches, cfg.caches(), cfg.allow_overlap)  # ... and no example in two of them
    cache = caches[0]
    loss_config = sampled_loss_config(cfg, cache)
    tokenizer = load_tokenizer(cfg.model, cfg.revision)
    student_vocab.check_options(cfg)
    vocab = student_vocab.choose(cfg, cache, tokenizer)  # None: identical tokenizers, today's route
    identity = {"model": training.model_identity(cfg.model), **source_record(cfg.model),
                "cache": cache_identity(caches)}
    checkpoint = run_folder.check_output(cfg, "train-student", identity)

    cfg.model = identity["model"]  # absolute: the adapter's base_model_name_or_path must load from anywhere
    model = training.load_trainable(cfg)
    for each in caches:
        check_context(each, model, cfg.model)
    args = training.training_arguments(cfg, Path(cfg.output))
    # only now: bad options leave no folder behind
    batching = choose_batching(cfg.batching, model)  # packed, or the fallback with a note
    used = {"batching": batching}
    out = run_folder.start_run(cfg, "train-student", identity, command, checkpoint, used=used)
    dataset = (CacheDataset(cache, keep_groups=cfg.shuffle_window + 1) if len(caches) == 1 else
               MixedCacheDataset(caches, keep_groups=cfg.shuffle_window + 1))
    lengths = np.concatenate([c.row_lengths() for c in caches]) if batching == "grouped" else None
    sampler = BlockShuffleSampler(dataset.sizes, cfg.seed, cfg.shuffle_window, lengths=lengths,
                                  **lane_layout(cfg))
    packing = {"packed": batching == "packed", "pack_length": pack_length_for(model, cfg.pack_length)}
    collator = DistillCollator(tokenizer.pad_token_id, student_vocab_size(model), cache.k, **packing)
    collator = student_vocab.collator(vocab, collator, tokenizer, cfg, student_vocab_size(model), **packing)
    if vocab is not None:
        student_vocab.save(vocab, out)
    cross = vocab is not None and vocab.route == "cross"  # offsets-aligned batches: their own loss
    trainer_class, extra = ((CrossTokenizerTrainer, {"uld_weight": cfg.uld_weight}) if cross
                            else (DistillTrainer, {}))
    trainer = trainer_class(
        **extra, loss_config=loss_config, model=model, args=args, train_dataset=dataset,
        data_collator=collator, processing_class=tokenizer, sampler=sampler, callbacks=callbacks,
    )
    return fit(trainer, cfg, out, tokenizer, checkpoint)


def lane_layout(cfg: TrainStudentConfig) -> dict[str, int]:
    """`lanes` and `stripe` of the sampler: one lane per process, a per-device batch from each in turn."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    lanes = cfg.data_lanes or processes
    rows = cfg.batch_size * processes  # one micro-batch over all processes
    if rows % lanes:
        raise KdpipeError(
            f"--data-lanes {lanes} does not divide the {rows} rows of a micro-batch (--batch-size "
            f"{cfg.batch_size} × {processes} process(es)); pick a divisor"
        )
    return {"lanes": lanes, "stripe": rows // lanes}


def sampled_loss_config(cfg: TrainStudentConfig, cache: Cache) -> DistillLossConfig:
    """The loss for this cache. On a sampled cache `DistillLossConfig` refuses the options whose estimate
    would be biased (the rule is `kdpipe.losses.SAMPLED_SOUND`); this names them as options."""
    try:
        return cfg.loss_config(sampled=cache.manifest.sparse.mode is SparseMode.SAMPLED)
    except BiasedOnSampled as e:
        wrong = ", ".join(f"--{name} {value}" for name, value, _ in e.unsound)
        raise KdpipeError(
            f"{wrong} cannot train on the sampled cache {cache.path}: only forward KL at temperature 1 over "
            "the whole vocabulary (--loss fkl --temperature 1 --tail bucket) has an unbiased estimate from "
            "sampled tokens; use a top-k cache for the other losses") from None




def check_context(cache: Cache, model: Any, name: str) -> None:
    """Every cached example fits the student's context (max_position_embeddings)."""
    from kdpipe.models import causal_lm

    context = getattr(causal_lm(model).config.get_text_config(), "max_position_embeddings", None)
    if not context or (cache.manifest.dataset.max_length or context + 1) <= context:
        return
    longest = cache.longest_example()  # through the cache's store: a local folder or an object-storage URL
    if longest > context:
        raise KdpipeError(
            f"cache {cache.path} holds examples of up to {longest} tokens, longer than the student {name}'s "
            f"context ({context} tokens); cache the data again with --max-length {context} or pick a student "
            "with a longer context"
        )


def student_vocab_size(model: Any) -> int:
    """Rows of the student's LM head: cached ids at or above it are masked out (see kdpipe.train.data)."""
    from kdpipe.models import output_head

    return int(output_head(model).weight.shape[0])


def summary(record: dict[str, Any], out: str | Path) -> str:
    loss = record.get("train_loss", float("nan"))
    loss = "not logged" if loss is None else f"{loss:.4f}"  # saved from its last checkpoint, none logged
    return (f"trained {record.get('global_step', 0)} steps, mean loss {loss}, "
            f"{record.get('train_seconds', 0):.1f} s -> {out} ({record.get('saved')})")
