"""Stage two: train a student (LoRA or full) against the teacher's cached sparse distributions.

Recipe: check the cache (checksums, counts, not empty) and the student's tokenizer against it, load
the student alone, stream the cache a row group at a time in a seeded order, train with the sparse
distillation loss through `transformers.Trainer`, save the model (or adapter, or merged model).

Its config, recipe and registration (`STAGE`) are all here, with the skip/resume rule of a training run
folder that finetune shares. numpy, pyarrow and torch load inside the functions that use them: the CLI
builds `kdpipe train-student --help` from `TrainStudentConfig`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from kdpipe import run_folder
from kdpipe.config import option, to_dict
from kdpipe.errors import KdpipeError
from kdpipe.losses import LOSSES, TAIL_MODES, BiasedOnSampled, DistillLossConfig
from kdpipe.run_folder import RUN_FILE, holds_other_files, last_checkpoint, read_json, slug
from kdpipe.stages.base import VERIFY_HELP, Echo, Stage
from kdpipe.stages.init_model import changed
from kdpipe.train import setup as training
from kdpipe.train.config import TrainConfig

if TYPE_CHECKING:
    from kdpipe.cache.reader import Cache


@dataclass
class TrainStudentConfig(TrainConfig):
    """Options of `kdpipe train-student` (YAML keys; CLI options with dashes)."""

    cache: str | list[str] | None = option(
        None, "Cache folder (or object-storage URL: s3://bucket/prefix ...) written by `kdpipe "
              "cache-teacher`; repeat --cache to train on several caches pooled (same teacher, tokenizer and "
              "sparse settings).")
    allow_overlap: bool = option(
        False, "Pool caches that hold some of the same examples (a cache and one of its parts), which are "
               "then trained on twice per epoch; refused by default.")
    # Literal over the registry's names: the CLI's choices and the YAML check come from kdpipe.losses
    loss: Literal[LOSSES] = option(  # type: ignore[valid-type]
        "fkl", "Divergence: fkl, rkl, skew-fkl, skew-rkl (skew), jsd (beta), tvd."
    )
    alpha: float = option(0.5, "Weight of the distillation term: alpha·T²·D + (1 − alpha)·CE (1: "
                               "distillation only).")
    temperature: float = option(1.0, "Distillation temperature T (both sides; the term is scaled by T²).")
    skew: float = option(0.1, "Skew λ of skew-fkl / skew-rkl.")
    beta: float = option(0.5, "Mixing weight β of jsd.")
    tail: Literal[TAIL_MODES] = option(  # type: ignore[valid-type]
        "bucket", "Mass outside the top-k: bucket (a (k+1)-th atom on both sides) or renorm (top-k "
                  "renormalised)."
    )
    chunk_size: int = option(1024, "Target positions per LM-head chunk (bounds the fp32 full-vocabulary "
                                   "scratch).")
    verify: Literal["fast", "full"] = option("fast", VERIFY_HELP)
    shuffle_window: int = option(4, "Row groups (256 rows each) shuffled together; that many are kept "
                                    "decoded in memory.")
    data_lanes: int | None = option(
        None, "Split the row groups into this many lanes, one per process, so each process reads its own "
              "part "
        "(default: the number of processes; set it to a multi-process run's count to replay its order on one "
        "process)."
    )
    min_coverage: float = option(
        0.99, "A student with another tokenizer trains on the cache remapped by token string when at "
              "least this share of the teacher's cached mass is on its tokens and of the rows tokenize "
              "identically.")
    cross_tokenizer: bool = option(
        False, "A student with a different tokenizer: align the tokenizations by character offsets (README).")
    uld_weight: float = option(
        0.0, "With --cross-tokenizer: weight of the ULD term (sorted-probability distance, Boizard et al.).")
    teacher_tokenizer: str | None = option(
        None, "The cache's teacher tokenizer, when its manifest's tokenizer.name does not load here.")

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
        """The cache folders trained on (one, or several pooled)."""
        return [] if not self.cache else [self.cache] if isinstance(self.cache, str) else list(self.cache)

    def loss_config(self, sampled: bool = False) -> DistillLossConfig:
        return DistillLossConfig(loss=self.loss, alpha=self.alpha, temperature=self.temperature,
                                 skew=self.skew, beta=self.beta, tail=self.tail, chunk_size=self.chunk_size,
                                 sampled=sampled)

    def output_folder(self) -> Path:
        if self.output:
            return Path(self.output)
        data = "+".join(Path(c).name for c in self.caches()) or "cache"
        name = f"{data}-{Path(self.model or 'student').name}"
        return Path("runs") / slug(name)


@run_folder.locked
def run(cfg: TrainStudentConfig, command: str = "", callbacks: list[Any] | None = None) -> dict[str, Any]:
    """Train the student of `cfg` on its cache; returns the run record (kdpipe_run.json)."""
    import numpy as np

    from kdpipe.cache.verified import open_checked
    from kdpipe.models import load_tokenizer, source_record
    from kdpipe.train.data import BlockShuffleSampler, CacheDataset, DistillCollator
    from kdpipe.train.mix import MixedCacheDataset, cache_identity, check_distinct, check_mixable
    from kdpipe.train.packing import choose_batching, pack_length_for
    from kdpipe.train.trainer import DistillTrainer, fit
    from kdpipe.vocab import routes as student_vocab
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
    args = training.training_arguments(cfg, Path(cfg.output))  # bad options: before the model loads
    model = training.load_trainable(cfg)
    for each in caches:
        check_context(each, model, cfg.model)
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
        return cfg.loss_config(sampled=cache.sampled)
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


# ---------------------------------------------------------------- the stage: a command, a `kdpipe run` step
# (finetune's too: the same run folder, the same rules)


def run_state(kind: str, cfg: Any, command: str, anything_ran: bool) -> tuple[str, str]:
    """A training stage's state from its run record: skip when complete with the same settings, resume
    from the last checkpoint, or restart one interrupted before its first checkpoint."""
    from kdpipe.cache.manifest import Manifest

    out = Path(cfg.output)
    record = read_json(out / RUN_FILE)
    if record is None:
        if holds_other_files(out):
            raise KdpipeError(f"{out} already holds files that are not a kdpipe run; remove it or choose "
                              "another output")
        return "run", ""
    ignore = {"model", "output", "resume"}
    defaults = to_dict(type(cfg)())  # an option added since the run was recorded: its default is no change
    before = {k: v for k, v in {**defaults, **(record.get("config") or {})}.items() if k not in ignore}
    now = {k: v for k, v in to_dict(cfg).items() if k not in ignore}
    same = record.get("kind") == kind and before == now and _same_model(record, cfg.model)
    if not same:
        raise KdpipeError(
            f"{out} holds a `kdpipe {record.get('kind')}` run with other settings "
            f"({changed(before, now) or 'model'}); "
            "remove it or choose another output"
        )
    cached = record.get("identity", {}).get("cache")
    manifests = [Manifest.read_if_any(c) for c in (cfg.caches() if hasattr(cfg, "caches") else [])]
    hashes = [m.settings_hash for m in manifests if m]
    if cached and len(hashes) == len(manifests) and (hashes[0] if len(hashes) == 1 else hashes) != cached:
        raise KdpipeError(f"{out} was trained on another cache than {cfg.cache} (settings differ); "
                          "remove it to train again on this cache")
    if record.get("status") == "complete":
        return "skip", f"{out} is complete with the same settings"
    if last_checkpoint(out):
        return "resume", f"{out} was interrupted; resuming from {Path(last_checkpoint(out)).name}"
    return "restart", f"{out} was interrupted before its first checkpoint; starting it over"


def _same_model(record: dict[str, Any], model: str | None) -> bool:
    recorded = record.get("identity", {}).get("model")
    try:
        return recorded == training.model_identity(model or "")
    except Exception:
        return recorded == model


def training_runner(recipe: Any) -> Any:
    """A training stage's runner: `kdpipe run`'s planned state (resume, or restart a run interrupted
    before its first checkpoint) becomes --resume; the CLI passes None (--resume as the user gave it)."""
    def runner(cfg: Any, command: str, echo: Echo, state: str | None) -> Any:
        if state == "restart":  # interrupted before its first checkpoint: nothing to keep
            shutil.rmtree(cfg.output)
        if state is not None:
            cfg = dataclasses.replace(cfg, resume=state == "resume")
        return recipe(cfg, command)
    return runner


STAGE = Stage(
    name="train-student", config=TrainStudentConfig, runner=training_runner(run),
    state=lambda cfg, command, ran: run_state("train-student", cfg, command, ran),
    summary=lambda record, cfg: summary(record, cfg.output) if record else "",
    trains=True, plan_kind="train", repeatable=("cache",), required=("cache", "model"),
    help="""Train a student (LoRA or full) against a teacher cache with a sparse distillation loss.

    \b
    Example:
      kdpipe train-student --cache cache/imdb --model Qwen3-0.6B --output runs/imdb-0.6b \\
          --loss fkl --alpha 0.5
    Multi-GPU: accelerate launch -m kdpipe.cli train-student ...
           (or torchrun --nproc-per-node N -m kdpipe.cli ...)
    """)
