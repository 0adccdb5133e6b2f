"""Stage two: train a student (LoRA or full) against the teacher's cached sparse distributions.

Recipe: check the cache (checksums, counts, not empty) and the student's tokenizer against it, load
the student alone, stream the cache a row group at a time in a seeded order, train with the sparse
distillation loss through `transformers.Trainer`, save the model (or adapter, or merged model).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kdpipe import training
from kdpipe.cache.reader import Cache
from kdpipe.cache.tools import open_checked
from kdpipe.config import option
from kdpipe.errors import KdpipeError
from kdpipe.losses import DistillLossConfig
from kdpipe.models import load_tokenizer, vocab_hash
from kdpipe.student_data import BlockShuffleSampler, CacheDataset, DistillCollator
from kdpipe.student_mix import MixedCacheDataset, cache_identity, check_mixable


@dataclass
class TrainStudentConfig(training.TrainConfig):
    """Options of `kdpipe train-student` (YAML keys; CLI options with dashes)."""

    cache: str | list[str] | None = option(
        None, "Cache folder (or object-storage URL: s3://bucket/prefix ...) written by `kdpipe cache-teacher`; "
        "repeat --cache to train on several caches mixed (same teacher, tokenizer and sparse settings).")
    loss: Literal["fkl", "rkl", "skew-fkl", "skew-rkl", "jsd", "tvd"] = option(
        "fkl", "Divergence: fkl, rkl, skew-fkl, skew-rkl (skew), jsd (beta), tvd."
    )
    alpha: float = option(0.5, "Weight of the distillation term: alpha·T²·D + (1 − alpha)·CE (1: distillation only).")
    temperature: float = option(1.0, "Distillation temperature T (both sides; the term is scaled by T²).")
    skew: float = option(0.1, "Skew λ of skew-fkl / skew-rkl.")
    beta: float = option(0.5, "Mixing weight β of jsd.")
    tail: Literal["renorm", "bucket"] = option(
        "bucket", "Mass outside the top-k: bucket (a (k+1)-th atom on both sides) or renorm (top-k renormalised)."
    )
    chunk_size: int = option(1024, "Target positions per LM-head chunk (bounds the fp32 full-vocabulary scratch).")
    shuffle_window: int = option(4, "Row groups (256 rows each) shuffled together; that many are kept decoded in memory.")
    data_lanes: int | None = option(
        None, "Split the row groups into this many lanes, one per process, so each process reads its own part "
        "(default: the number of processes; set it to a multi-process run's count to replay its order on one process)."
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.loss_config()  # validates loss, alpha, temperature, skew, beta, tail, chunk_size
        if self.shuffle_window < 1:
            raise ValueError(f"shuffle_window must be at least 1, not {self.shuffle_window}")
        if self.data_lanes is not None and self.data_lanes < 1:
            raise ValueError(f"data_lanes must be at least 1, not {self.data_lanes}")
        if isinstance(self.cache, (list, tuple)):  # one cache stays a plain string, as before
            if len(set(self.cache)) != len(self.cache):
                raise ValueError(f"cache lists a cache twice: {', '.join(self.cache)}")
            self.cache = (self.cache[0] if len(self.cache) == 1 else list(self.cache)) or None

    def caches(self) -> list[str]:
        """The cache folders trained on (one, or several mixed)."""
        return [] if not self.cache else [self.cache] if isinstance(self.cache, str) else list(self.cache)

    def loss_config(self, sampled: bool = False) -> DistillLossConfig:
        return DistillLossConfig(self.loss, self.alpha, self.temperature, self.skew, self.beta, self.tail, self.chunk_size,
                                 sampled=sampled)

    def output_folder(self) -> Path:
        if self.output:
            return Path(self.output)
        data = "+".join(Path(c).name for c in self.caches()) or "cache"
        return Path("runs") / _slug(f"{data}-{Path(self.model or 'student').name}")


@training.locked
def run(cfg: TrainStudentConfig, command: str = "", callbacks: list[Any] | None = None) -> dict[str, Any]:
    """Train the student of `cfg` on its cache; returns the run record (kdpipe_run.json)."""
    if not cfg.cache:
        raise KdpipeError("no cache given: pass --cache (a folder written by `kdpipe cache-teacher`)")
    if not cfg.model:
        raise KdpipeError("no student given: pass --model (or 'model:' in the config file)")
    cfg.output = str(cfg.output_folder())
    caches = [open_checked(c) for c in cfg.caches()]
    check_mixable(caches)  # several caches: same teacher, tokenizer and sparse settings
    cache = caches[0]
    loss_config = sampled_loss_config(cfg, cache)
    tokenizer = load_tokenizer(cfg.model, cfg.revision)
    check_tokenizer(tokenizer, cache, cfg.model)
    identity = {"model": training.model_identity(cfg.model), "cache": cache_identity(caches)}
    checkpoint = training.check_output(cfg, "train-student", identity)

    cfg.model = identity["model"]  # absolute: the adapter's base_model_name_or_path must load from anywhere
    model = training.load_trainable(cfg)
    for each in caches:
        check_context(each, model, cfg.model)
    args = training.training_arguments(cfg, Path(cfg.output))
    out = training.start_run(cfg, "train-student", identity, command, checkpoint)  # only now: bad options leave no folder behind
    dataset = (CacheDataset(cache, keep_groups=cfg.shuffle_window + 1) if len(caches) == 1 else
               MixedCacheDataset(caches, keep_groups=cfg.shuffle_window + 1))
    sampler = BlockShuffleSampler(dataset.sizes, cfg.seed, cfg.shuffle_window, **lane_layout(cfg))
    collator = DistillCollator(tokenizer.pad_token_id, student_vocab_size(model), cache.k)
    trainer = training.make_trainer(
        loss_config, model=model, args=args, train_dataset=dataset,
        data_collator=collator, processing_class=tokenizer, sampler=sampler, callbacks=callbacks,
    )
    return training.fit(trainer, cfg, out, tokenizer, checkpoint)


def lane_layout(cfg: TrainStudentConfig) -> dict[str, int]:
    """`lanes` and `stripe` of the sampler: one lane per process, a per-device batch from each in turn."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    lanes = cfg.data_lanes or processes
    rows = cfg.batch_size * processes  # one micro-batch over all processes
    if rows % lanes:
        raise KdpipeError(
            f"--data-lanes {lanes} does not divide the {rows} rows of a micro-batch (--batch-size {cfg.batch_size} × "
            f"{processes} process(es)); pick a divisor"
        )
    return {"lanes": lanes, "stripe": rows // lanes}


def sampled_loss_config(cfg: TrainStudentConfig, cache: Cache) -> DistillLossConfig:
    """The loss for this cache; a sampled cache refuses the options whose estimate would be biased."""
    sampled = cache.manifest["sparse"]["mode"] == "sampled"
    if sampled and cfg.alpha > 0:
        wrong = [f"{opt} {value}" for opt, value, sound in (("--loss", cfg.loss, "fkl"), ("--temperature", cfg.temperature, 1.0),
                                                             ("--tail", cfg.tail, "bucket")) if value != sound]
        if wrong:
            raise KdpipeError(
                f"{', '.join(wrong)} cannot train on the sampled cache {cache.path}: only forward KL at temperature 1 "
                "over the whole vocabulary (--loss fkl --temperature 1 --tail bucket) has an unbiased estimate from "
                "sampled tokens; use a top-k cache for the other losses")
    return cfg.loss_config(sampled)


def check_tokenizer(tokenizer: Any, cache: Cache, model: str) -> None:
    """The student must tokenize exactly as the teacher did (same token -> id table)."""
    expected = cache.manifest["tokenizer"]
    if vocab_hash(tokenizer) != expected["vocab_hash"]:
        raise KdpipeError(
            f"the student {model} has another tokenizer than the cache's teacher ({expected['name']}): "
            f"{len(tokenizer)} vs {expected['vocab_size']} tokens, vocabulary hashes differ. The cached token ids "
            "would mean other tokens to this student; pick a student of the teacher's family (same tokenizer)"
        )


def check_context(cache: Cache, model: Any, name: str) -> None:
    """Every cached example fits the student's context (max_position_embeddings)."""
    context = getattr(training.causal_lm(model).config.get_text_config(), "max_position_embeddings", None)
    if not context or (cache.manifest["dataset"].get("max_length") or context + 1) <= context:
        return
    longest = max(longest_example(cache.path / s["file"]) for s in cache.shards)
    if longest > context:
        raise KdpipeError(
            f"cache {cache.path} holds examples of up to {longest} tokens, longer than the student {name}'s context "
            f"({context} tokens); cache the data again with --max-length {context} or pick a student with a longer context"
        )


def longest_example(shard: Path) -> int:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    lengths = pc.list_value_length(pq.read_table(shard, columns=["input_ids"])["input_ids"])
    return int(pc.max(lengths).as_py() or 0)


def student_vocab_size(model: Any) -> int:
    """Rows of the student's LM head: cached ids at or above it are masked out (see kdpipe.student_data)."""
    return int(training.causal_lm(model).get_output_embeddings().weight.shape[0])


def summary(record: dict[str, Any], out: str | Path) -> str:
    return (f"trained {record.get('global_step', 0)} steps, mean loss {record.get('train_loss', float('nan')):.4f}, "
            f"{record.get('train_seconds', 0):.1f} s -> {out} ({record.get('saved')})")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")
