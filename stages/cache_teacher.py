"""Stage one, `kdpipe cache-teacher`: run the teacher once over a dataset and cache each target token's
sparse distribution. Its config, its recipe and its registration (`STAGE`) are all here.

Recipe: load the tokenizer and data, tokenize with the loss mask, load the teacher alone, then
shard by shard: batch by length, score, encode, write (atomically), update the manifest.

The config is torch-free and this module imports numpy, pyarrow and torch only inside the functions that
use them: the CLI builds `kdpipe cache-teacher --help` from `CacheTeacherConfig`.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from kdpipe.config import option, progress_disabled
from kdpipe.data.generated import check_unedited, provenance
from kdpipe.data.sources import DataConfig, load_examples
from kdpipe.data.templates import get_template
from kdpipe.errors import KdpipeError
from kdpipe.precision import resolve_dtype
from kdpipe.run_folder import slug
from kdpipe.stages.base import Echo, Stage, log_note

if TYPE_CHECKING:
    from kdpipe.cache.manifest import Manifest
    from kdpipe.cache.sections import SparseSpec
    from kdpipe.teacher.hf import Sampling, TeacherBackend


@dataclass
class CacheTeacherConfig(DataConfig):
    """Options of `kdpipe cache-teacher` (YAML keys; CLI options with dashes)."""

    model: str | None = option(None, "Teacher: hub id, local path or short name (Qwen3-4B).")
    revision: str | None = option(None, "Hub revision (branch, tag or commit) of the teacher.")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = option(
        "auto", "Teacher dtype, the same on both backends: auto = fp16 on GPUs before compute capability 8 "
                "(T4, V100), bf16 from 8, fp32 on CPU.")
    device: str = option("auto", "Device: auto (CUDA if present), cpu, cuda, cuda:1 ...")
    backend: Literal["hf", "vllm"] = option("hf", "Teacher runtime: hf (transformers) or vllm.")
    cache: str | None = option(None, "Cache folder or object-storage URL (s3://bucket/prefix, gs://...; "
                                     "default: cache/<dataset name>).")
    top_k: int = option(32, "Teacher token ids and log-probs kept per position.")
    sparse_mode: Literal["topk", "sampled"] = option(
        "topk", "What is stored per position: topk (the k most likely ids) or sampled (N draws from the "
                "teacher: unbiased).")
    samples: int = option(12, "Sampled mode: draws N per position (1-255); distinct ids are stored with "
                              "their counts.")
    proposal_temperature: float = option(
        1.0, "Sampled mode: draw from p^(1/T) renormalised; T != 1 stores importance ratios so the estimate "
             "stays unbiased.")
    encoding: Literal["plain", "compact", "compact16"] = option(
        "plain", "Column encoding: plain (int32 ids, fp16 log-probs), compact (narrow ids, 8-bit log-prob "
                 "codes) or compact16.")
    rows_per_shard: int = option(1000, "Examples per shard (the unit of resume and of multi-machine splits).")
    batch_size: int = option(32, "Most examples in one teacher batch.")
    max_batch_tokens: int = option(16384, "Most tokens (rows × longest row, padding included) in one batch.")
    chunk_size: int = option(2048, "Positions per LM-head chunk (bounds the fp32 full-vocabulary scratch).")
    num_shards: int = option(1, "Split the work across this many machines ...")
    shard_index: int = option(0, "... and do this machine's part (0-based); join the parts with `kdpipe "
                                 "cache merge`.")
    overwrite: bool = option(False, "Replace an existing cache of another run in the folder.")
    heldout: bool = option(False, "Mark this data as held out from training (e.g. a separate test file): "
                                  "evaluate --cache then uses it for fidelity without the training-data note "
                                  "(it still checks the overlap with the run's training cache).")
    vllm_tensor_parallel_size: int = option(1, "vLLM backend: GPUs the teacher is split across (tensor "
                                               "parallel).")
    vllm_max_model_len: int | None = option(None, "vLLM backend: context length (default: max_length + 1, "
                                                  "capped by the model's).")
    vllm_gpu_memory_utilization: float = option(0.9, "vLLM backend: fraction of GPU memory for weights and "
                                                     "KV cache.")
    vllm_max_num_batched_tokens: int | None = option(None, "vLLM backend: most tokens in one engine step "
                                                           "(default: vLLM's).")

    def __post_init__(self) -> None:
        super().__post_init__()
        positive = ("top_k", "samples", "rows_per_shard", "batch_size", "max_batch_tokens", "chunk_size",
                    "num_shards", "vllm_tensor_parallel_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        for name in ("vllm_max_model_len", "vllm_max_num_batched_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.samples > 255:
            raise ValueError(f"samples must be at most 255 (counts are stored as uint8), not {self.samples}")
        if not self.proposal_temperature > 0:
            raise ValueError(f"proposal_temperature must be > 0, not {self.proposal_temperature}")
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ValueError("vllm_gpu_memory_utilization must be in (0, 1], not "
                             f"{self.vllm_gpu_memory_utilization}")
        if not 0 <= self.shard_index < self.num_shards:
            raise ValueError(f"shard_index must be in [0, num_shards={self.num_shards}), not "
                             f"{self.shard_index}")

    def is_sampled(self) -> bool:
        """--sparse-mode sampled (kdpipe.cache.sections.SparseMode, whose module loads pyarrow)."""
        return self.sparse_mode == "sampled"

    def is_heldout(self) -> bool:
        """A cache of held-out data (--heldout or --part heldout): scored against, not trained from."""
        return bool(self.heldout or self.part == "heldout")

    def cache_folder(self) -> Path | str:
        """The cache's folder, or its object-storage URL (s3://bucket/prefix, gs://..., kept as a string)."""
        if self.cache:
            from kdpipe.cache.storage import is_url  # pyarrow: imported when used, not by `kdpipe --help`

            return self.cache if is_url(self.cache) else Path(self.cache)
        source = self.dataset or "data"
        stem = Path(source).stem if Path(source).suffix else re.split(r"[/:]", source)[-1]
        return Path("cache") / slug(stem)


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
    from kdpipe.cache.storage import Store
    from kdpipe.data.tokenize import tokenize_examples
    from kdpipe.models import load_tokenizer, pick_device

    if not cfg.model:
        raise KdpipeError("no teacher given: pass --model (or 'model:' in the config file)")
    if cfg.backend == "vllm" and cfg.is_sampled():
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
    from tqdm.auto import tqdm

    from kdpipe.cache.format import ENCODINGS, ids_hash
    from kdpipe.cache.values import TeacherConfidence, check_finite, value_stats
    from kdpipe.cache.writer import CacheWriter

    header = new_manifest(cfg, command, tokenizer, template, selection, report, teacher, total_shards)
    encode = ENCODINGS[cfg.encoding].encode
    meta = header.file_metadata()
    start = time.perf_counter()
    rows_of = {i: examples[i * cfg.rows_per_shard : (i + 1) * cfg.rows_per_shard] for i in assigned}
    shard_ids = {i: ids_hash([e.id for e in rows]) for i, rows in rows_of.items()}
    with CacheWriter(cfg.cache_folder(), header, assigned, cfg.overwrite, shard_ids) as writer:
        for line in writer.resume_notes():
            echo(line)
        todo = writer.pending()
        todo_rows = [rows_of[i] for i in todo]
        bar = tqdm(total=sum(map(len, todo_rows)), unit="ex", desc=f"caching {cfg.model}", dynamic_ncols=True,
                   mininterval=1.0, disable=progress_disabled())
        tokens = 0
        said = TeacherConfidence(sampled=cfg.is_sampled(),
                                 heldout=cfg.is_heldout())
        for index, rows in zip(todo, todo_rows):
            targets = [None] * len(rows)
            for batch in _batches(teacher, rows, cfg):
                for i, t in zip(batch, teacher.score([rows[i] for i in batch])):
                    check_finite(t, rows[i], index, header.teacher.dtype)
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


def width(cfg: CacheTeacherConfig) -> int:
    """Ids stored per position: k (top-k) or at most N distinct ids (sampled)."""
    return cfg.samples if cfg.is_sampled() else cfg.top_k


def sparse_spec(cfg: CacheTeacherConfig) -> SparseSpec:
    """The manifest's `sparse` section (top-k caches keep the version-1 keys, so their settings hash is
    unchanged)."""
    from kdpipe.cache.sections import SparseSpec

    if not cfg.is_sampled():
        return SparseSpec.topk(cfg.top_k)
    return SparseSpec.sampled(cfg.samples, cfg.proposal_temperature, cfg.seed)


def _check_model_limits(cfg: CacheTeacherConfig, echo: Echo) -> None:
    """top_k within the teacher's vocabulary; max_length lowered to the teacher's context (positions beyond
    it are garbage or a crash)."""
    from kdpipe.models import load_model_config

    try:
        config = load_model_config(cfg.model, cfg.revision).get_text_config()
    except Exception:  # the model load right after reports it clearly
        return
    if not cfg.is_sampled() and cfg.top_k > config.vocab_size:
        raise KdpipeError(f"top_k={cfg.top_k} is larger than the teacher's vocabulary "
                          f"({config.vocab_size} tokens)")
    context = getattr(config, "max_position_embeddings", None)
    if context and cfg.max_length > context:
        echo(f"note: max_length={cfg.max_length} is longer than the teacher's context ({context} tokens); "
             f"using max_length={context} (longer examples: --truncation {cfg.truncation})")
        cfg.max_length = context


def _load_teacher(cfg: CacheTeacherConfig) -> TeacherBackend:
    from kdpipe.models import load_model
    from kdpipe.teacher.hf import HFTeacher

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
    from kdpipe.teacher.hf import Sampling

    if not cfg.is_sampled():
        return None
    return Sampling(cfg.samples, cfg.proposal_temperature, cfg.seed)


def _vllm_model_len(cfg: CacheTeacherConfig) -> int | None:
    """max_length + 1 (vLLM counts the one generated token), capped by the model's own limit."""
    from kdpipe.models import load_model_config

    try:
        config = load_model_config(cfg.model, cfg.revision)
    except Exception:  # the engine start reports it
        return None
    limit = getattr(config.get_text_config(), "max_position_embeddings", None)
    return min(cfg.max_length + 1, limit) if limit else cfg.max_length + 1


def _batches(teacher: TeacherBackend, rows: list[Any], cfg: CacheTeacherConfig) -> list[list[int]]:
    """A whole shard for backends that batch internally (vLLM), else length-sorted batches."""
    from kdpipe.teacher.hf import make_batches

    if getattr(teacher, "whole_shard", False):
        return [list(range(len(rows)))]
    return make_batches(rows, cfg.max_batch_tokens, cfg.batch_size)


def new_manifest(cfg: CacheTeacherConfig, command: str, tokenizer: Any, template: Any, selection: Any,
                 report: Any, teacher: Any, total_shards: int) -> Manifest:
    """The new cache's header from the facts of this run: settings, teacher, tokenizer, data read."""
    import kdpipe
    from kdpipe.cache.manifest import Manifest
    from kdpipe.cache.sections import DatasetInfo, Sharding, TeacherInfo, TemplateInfo, TokenizerInfo
    from kdpipe.models import model_revision, resolve_model_name, source_record, vocab_hash

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


# ---------------------------------------------------------------- the stage: a command, a `kdpipe run` step


def state(cfg: CacheTeacherConfig, command: str, anything_ran: bool) -> tuple[str, str]:
    """From the cache's manifest: complete with the same command: skip; partly written: resume."""
    from kdpipe.cache.manifest import Manifest

    manifest = Manifest.read_if_any(cfg.cache)
    if manifest is None:
        return "run", ""
    if manifest.command == command and manifest.complete:
        return "skip", f"{cfg.cache} is complete with the same settings"
    if manifest.command == command:
        return "resume", (f"{cfg.cache} is partly written; cache-teacher continues after its last "
                          "complete shard")
    return "run", (f"{cfg.cache} holds another cache; cache-teacher decides (same settings resume, others "
                   "are refused unless overwrite)")


STAGE = Stage(
    name="cache-teacher", config=CacheTeacherConfig, output_key="cache", plan_kind="cache",
    runner=lambda cfg, command, echo, state: run(cfg, command, echo=echo), state=state,
    summary=lambda result, cfg: f"cached {summary(result)} -> {cfg.cache_folder()}",
    required=("model", "dataset"),
    help="""Run the teacher once over a dataset and cache each target token's top-k distribution.

    \b
    Example:
      kdpipe cache-teacher --model Qwen3-4B --dataset imdb --top-k 32 --cache cache/imdb
    Rerunning the same command resumes after the last complete shard.
    """)
