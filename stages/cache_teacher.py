"""Stage one: run the teacher once over a dataset and cache each target token's sparse distribution.

Recipe: load the tokenizer and data, tokenize with the loss mask, load the teacher alone, then
shard by shard: batch by length, score, encode, write (atomically), update the manifest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm.auto import tqdm

import kdpipe
from kdpipe.cache.format import ENCODINGS, Targets, ids_hash
from kdpipe.cache.manifest import Manifest
from kdpipe.cache.sections import (
    DatasetInfo,
    Sharding,
    SparseMode,
    SparseSpec,
    TeacherInfo,
    TemplateInfo,
    TokenizerInfo,
)
from kdpipe.cache.storage import Store
from kdpipe.cache.values import RECOMPUTE, nonfinite, value_stats
from kdpipe.cache.writer import CacheWriter
from kdpipe.config import progress_disabled
from kdpipe.data.generated import check_unedited, provenance
from kdpipe.data.sources import load_examples
from kdpipe.data.templates import get_template
from kdpipe.data.tokenize import tokenize_examples
from kdpipe.errors import KdpipeError
from kdpipe.models import (
    load_model,
    load_model_config,
    load_tokenizer,
    model_revision,
    pick_device,
    resolve_model_name,
    source_record,
    vocab_hash,
)
from kdpipe.precision import resolve_dtype
from kdpipe.stages.base import Echo, log_note
from kdpipe.stages.configs import CacheTeacherConfig
from kdpipe.teacher.hf import HFTeacher, Sampling, TeacherBackend, make_batches

# The config is defined torch-free in kdpipe.stages.configs (the CLI builds its options from it).


@dataclass(frozen=True)
class CacheRun:
    """What `run` did: the cache's final manifest and the seconds spent scoring and writing."""

    manifest: Manifest
    elapsed_s: float


def run(cfg: CacheTeacherConfig, command: str = "", teacher: TeacherBackend | None = None,
        echo: Echo = log_note) -> CacheRun:
    """Cache the teacher's targets for `cfg`; returns the final manifest and the time taken.

    `teacher` is a backend already loaded for `cfg` (e.g. to cache several splits with one load);
    otherwise the teacher is loaded here and released at the end, before any later stage. Notes (what a
    resume repaired, a max_length lowered to the teacher's context) go to `echo`.
    """
    if not cfg.model:
        raise KdpipeError("no teacher given: pass --model (or 'model:' in the config file)")
    if cfg.backend == "vllm" and cfg.sparse_mode == SparseMode.SAMPLED:
        raise KdpipeError("--sparse-mode sampled needs the teacher's full distribution, but --backend vllm "
                          "only returns the top-k prompt log-probs: use --backend hf for sampled caches (or "
                          "--sparse-mode topk with vllm)")
    pick_device(cfg.device)  # a device this machine lacks: said now, not after tokenizing
    tokenizer = load_tokenizer(cfg.model, cfg.revision)
    template = get_template(cfg.resolved_template(), cfg.label_names)
    selection = load_examples(cfg)
    check_unedited(cfg.dataset)  # a generated file changed since it was finished: said, not recorded
    _check_model_limits(cfg, echo)
    examples, report = tokenize_examples(selection.examples, template, tokenizer, cfg)

    total_shards = -(-len(examples) // cfg.rows_per_shard)
    assigned = [i for i in range(total_shards) if i % cfg.num_shards == cfg.shard_index]
    Store.open(cfg.cache_folder()).check_writable()  # before the teacher loads (minutes for a large one)
    owned = teacher is None
    teacher = _load_teacher(cfg) if owned else teacher
    try:
        return _write(cfg, command, tokenizer, template, selection, examples, report, teacher, total_shards,
                      assigned, echo)
    finally:
        if owned:
            getattr(teacher, "close", lambda: None)()


def _write(cfg: CacheTeacherConfig, command: str, tokenizer: Any, template: Any, selection: Any,
           examples: list[Any], report: Any, teacher: TeacherBackend, total_shards: int,
           assigned: list[int], echo: Echo) -> CacheRun:
    """Score and write every pending shard of this machine's part."""
    header = new_manifest(cfg, command, tokenizer, template, selection, report, teacher, total_shards)
    encode = ENCODINGS[cfg.encoding].encode
    meta = header.file_metadata()
    start = time.perf_counter()
    rows_of = {i: examples[i * cfg.rows_per_shard : (i + 1) * cfg.rows_per_shard] for i in assigned}
    shard_ids = {i: ids_hash([e.id for e in rows]) for i, rows in rows_of.items()}
    with CacheWriter(cfg.cache_folder(), header, assigned, cfg.overwrite, shard_ids) as writer:
        _resume_notes(writer, echo)
        todo = writer.pending()
        todo_rows = [rows_of[i] for i in todo]
        bar = tqdm(total=sum(map(len, todo_rows)), unit="ex", desc=f"caching {cfg.model}", dynamic_ncols=True,
                   mininterval=1.0, disable=progress_disabled())
        tokens = 0
        said = TeacherConfidence(sampled=cfg.sparse_mode == SparseMode.SAMPLED,
                                 heldout=cfg.is_heldout())
        for index, rows in zip(todo, todo_rows):
            targets = [None] * len(rows)
            for batch in _batches(teacher, rows, cfg):
                for i, t in zip(batch, teacher.score([rows[i] for i in batch])):
                    _check_finite(t, rows[i], index, header)
                    targets[i] = t
                tokens += sum(len(rows[i].input_ids) for i in batch)
                bar.update(len(batch))
                bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - start, 1e-9):,.0f}")
            said.add(targets)
            own = {"shard_index": index, "ids_sha256": shard_ids[index], "stats": value_stats(targets)}
            table = encode([(e.id, e.input_ids, e.positions, t) for e, t in zip(rows, targets)], width(cfg),
                           {**meta, **own})
            writer.write(index, table)
        bar.close()
        manifest = writer.manifest
    for line in said.notes():
        echo(line)
    return CacheRun(manifest, round(time.perf_counter() - start, 2))


LOW_TARGET_PROB = 0.1  # below: the teacher does not say the completions it is asked to teach
ONE_HOT_TOP1 = 0.99  # above: a near one-hot teacher, whose targets carry little beyond the label


@dataclass
class TeacherConfidence:
    """How much the teacher itself says the cached completions, over the positions scored in this run: the
    mean probability of the actual next token and (top-k caches) of its top-1 token. A real chat teacher
    asked zero-shot for a one-word label put 0.0016 on it (docs/results/real-teacher.md): distilling it
    teaches its own answer format, not the labels; a fine-tuned teacher near one-hot makes KD act as SFT."""

    sampled: bool
    heldout: bool = False  # a cache to score fidelity on, not to train from: the one-hot note does not apply
    positions: int = 0
    target_prob: float = 0.0
    top1_prob: float = 0.0

    def add(self, targets: list[Targets]) -> None:
        for t in targets:
            self.positions += len(t.target_logprob)
            self.target_prob += float(np.exp(np.asarray(t.target_logprob, np.float64)).sum())
            if not self.sampled and len(t.target_logprob):
                self.top1_prob += float(np.exp(np.asarray(t.topk_logprobs[:, 0], np.float64)).sum())

    def notes(self) -> list[str]:
        if not self.positions:
            return []
        target, top1 = self.target_prob / self.positions, self.top1_prob / self.positions
        if target < LOW_TARGET_PROB:
            return [f"note: over the {self.positions:,} cached positions the teacher gives the actual next "
                    f"token a mean probability of {target:.4f} (under {LOW_TARGET_PROB}): it does not say "
                    "these completions, so distilling it teaches its own answers rather than yours; "
                    "fine-tune it on the task first (kdpipe finetune) or write the completions as it says "
                    "them (its label words, its chat format)"]
        if not self.sampled and not self.heldout and top1 > ONE_HOT_TOP1:
            return [f"note: over the {self.positions:,} cached positions the teacher is near one-hot (mean "
                    f"top-1 probability {top1:.4f}): its targets carry little beyond the completions, so KD "
                    "will act much like SFT; --temperature above 1 at train time spreads what it has"]
        return []


def _resume_notes(writer: CacheWriter, echo: Echo) -> None:
    """Say what the resume found and repaired."""
    if writer.rebuilt:
        kept = len(writer.manifest.shards)
        echo(f"note: {writer.rebuilt}: rebuilt from the shards' own metadata ({kept} verified and "
             "kept, the rest computed again)")
    if writer.rewritten:
        echo(f"note: {', '.join(writer.rewritten)} missing or damaged (size or sha256 differs from the "
             "manifest): written again")
    if writer.refused:
        echo(f"note: not adopted, computed again: {', '.join(writer.refused)}")


def _check_finite(t: Targets, example: Any, index: int, header: Manifest) -> None:
    """Refuse a non-finite teacher value where it appears (before anything of its shard is written)."""
    problem = nonfinite(t, example.positions)
    if problem:
        dtype = header.teacher.dtype
        hint = (f"A {dtype} teacher can overflow: rerun with {RECOMPUTE}" if dtype != "float32" else
                "The teacher already runs in float32 (--dtype fp32), so its checkpoint itself gives them "
                "(NaN or inf weights?): check the model")
        raise KdpipeError(f"the teacher gave example '{example.id}' (shard {index}) {problem}; nothing was "
                          f"cached for that shard. {hint}")


def width(cfg: CacheTeacherConfig) -> int:
    """Ids stored per position: k (top-k) or at most N distinct ids (sampled)."""
    return cfg.samples if cfg.sparse_mode == SparseMode.SAMPLED else cfg.top_k


def sparse_spec(cfg: CacheTeacherConfig) -> SparseSpec:
    """The manifest's `sparse` section (top-k caches keep the version-1 keys, so their settings hash is
    unchanged)."""
    if cfg.sparse_mode == SparseMode.TOPK:
        return SparseSpec.topk(cfg.top_k)
    return SparseSpec.sampled(cfg.samples, cfg.proposal_temperature, cfg.seed)


def _check_model_limits(cfg: CacheTeacherConfig, echo: Echo) -> None:
    """top_k within the teacher's vocabulary; max_length lowered to the teacher's context (positions beyond
    it are garbage or a crash)."""
    try:
        config = load_model_config(cfg.model, cfg.revision).get_text_config()
    except Exception:  # the model load right after reports it clearly
        return
    if cfg.sparse_mode == SparseMode.TOPK and cfg.top_k > config.vocab_size:
        raise KdpipeError(f"top_k={cfg.top_k} is larger than the teacher's vocabulary "
                          f"({config.vocab_size} tokens)")
    context = getattr(config, "max_position_embeddings", None)
    if context and cfg.max_length > context:
        echo(f"note: max_length={cfg.max_length} is longer than the teacher's context ({context} tokens); "
             f"using max_length={context} (longer examples: --truncation {cfg.truncation})")
        cfg.max_length = context


def _load_teacher(cfg: CacheTeacherConfig) -> TeacherBackend:
    dtype = resolve_dtype(cfg.dtype, cfg.device)  # one rule for "auto" on both backends
    if cfg.backend == "vllm":
        from kdpipe.teacher.vllm import VllmTeacher

        return VllmTeacher.load(
            cfg.model, cfg.top_k, dtype, cfg.device, cfg.revision, seed=cfg.seed,
            tensor_parallel_size=cfg.vllm_tensor_parallel_size,
            max_model_len=cfg.vllm_max_model_len or _vllm_model_len(cfg),
            gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
            max_num_batched_tokens=cfg.vllm_max_num_batched_tokens,
        )
    model = load_model(cfg.model, dtype, cfg.device, cfg.revision)
    return HFTeacher(model, cfg.top_k, cfg.chunk_size, sampling(cfg))


def sampling(cfg: CacheTeacherConfig) -> Sampling | None:
    """The HF backend's sampler for sampled mode (None for top-k)."""
    if cfg.sparse_mode != SparseMode.SAMPLED:
        return None
    return Sampling(cfg.samples, cfg.proposal_temperature, cfg.seed)


def _vllm_model_len(cfg: CacheTeacherConfig) -> int | None:
    """max_length + 1 (vLLM counts the one generated token), capped by the model's own limit."""
    try:
        config = load_model_config(cfg.model, cfg.revision)
    except Exception:  # the engine start reports it
        return None
    limit = getattr(config.get_text_config(), "max_position_embeddings", None)
    return min(cfg.max_length + 1, limit) if limit else cfg.max_length + 1


def _batches(teacher: TeacherBackend, rows: list[Any], cfg: CacheTeacherConfig) -> list[list[int]]:
    """A whole shard for backends that batch internally (vLLM), else length-sorted batches."""
    if getattr(teacher, "whole_shard", False):
        return [list(range(len(rows)))]
    return make_batches(rows, cfg.max_batch_tokens, cfg.batch_size)


def new_manifest(cfg: CacheTeacherConfig, command: str, tokenizer: Any, template: Any, selection: Any,
                 report: Any, teacher: Any, total_shards: int) -> Manifest:
    """The new cache's header from the facts of this run: settings, teacher, tokenizer, data read."""
    model = getattr(teacher, "model", None)
    config = getattr(model, "config", None)
    teacher_info = {  # the backend's own facts (backend, its version, perhaps its dtype) override these
        "model": resolve_model_name(cfg.model),
        "revision": cfg.revision,
        "commit": model_revision(model) if model is not None else None,
        "dtype": str(getattr(model, "dtype", cfg.dtype)).removeprefix("torch."),
        "vocab_size": getattr(config, "vocab_size", None),
        **source_record(cfg.model),
        **teacher.info(),
    }
    return Manifest.create(
        kdpipe_version=kdpipe.__version__,
        command=command,
        teacher=TeacherInfo.from_dict(teacher_info),
        tokenizer=TokenizerInfo(
            name=getattr(tokenizer, "name_or_path", cfg.model), vocab_hash=vocab_hash(tokenizer),
            vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id),
        template=TemplateInfo(name=template.name, add_eos=template.add_eos, distill_prompt=cfg.distill_prompt,
                              label_names=list(cfg.label_names)),
        dataset=DatasetInfo(
            source=selection.source, split=cfg.split, part=cfg.part, heldout_fraction=cfg.heldout_fraction,
            seed=cfg.seed, limit=cfg.limit, columns=cfg.resolved_columns(), fingerprint=selection.fingerprint,
            max_length=cfg.max_length, truncation=cfg.truncation,
            examples=report.examples, report=dict(report.counts),
            heldout=cfg.is_heldout(), file=selection.file),
        sparse=sparse_spec(cfg),
        encoding=cfg.encoding,
        sharding=Sharding(rows_per_shard=cfg.rows_per_shard, total_shards=total_shards,
                          num_shards=cfg.num_shards, shard_index=cfg.shard_index),
        generated=provenance(cfg.dataset),  # a file of `kdpipe generate`: the model and settings behind it
    )


def summary(result: CacheRun) -> str:
    m, t = result.manifest, result.manifest.totals
    return (
        f"{t.rows} examples, {t.target_tokens:,} target tokens ({t.tokens:,} tokens) in {t.shards} shard(s), "
        f"{t.bytes / 1e6:.2f} MB on disk, {t.bytes_per_target_token} bytes per target token, "
        f"{result.elapsed_s:.1f} s"
        + "".join(f"; {n} {what}" for what, n in sorted((m.dataset.report or {}).items()))
    )
