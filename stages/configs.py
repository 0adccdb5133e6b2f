"""The stages' configs: one dataclass per stage, whose fields are its YAML keys and (with dashes) its CLI
options. Torch-free on purpose: the CLI builds every command's options from these classes, so
`kdpipe --help` and an option error never import torch or transformers. Each stage's recipe module
imports its config from here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kdpipe.config import option
from kdpipe.data.sources import DataConfig
from kdpipe.losses import LOSSES, TAIL_MODES, DistillLossConfig
from kdpipe.train.config import TrainConfig

# --verify of train-student and evaluate (the check is kdpipe.cache.verified.check_for_use)
VERIFY_HELP = ("Cache check before use: fast (manifest and sizes; sha256 only of shards changed since they "
               "last passed, see .kdpipe-verified.json) or full (sha256 of every shard).")


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
        return Path("cache") / _slug(stem)


@dataclass
class GenerateConfig(DataConfig):
    """Options of `kdpipe generate` (YAML keys; CLI options with dashes)."""

    model: str | None = option(None, "Model that writes the completions: hub id, local path or short name.")
    revision: str | None = option(None, "Hub revision (branch, tag or commit) of the model.")
    output: str | None = option(None, "The JSONL file to write (e.g. data/NAME.jsonl); a rerun continues it.")
    backend: Literal["hf", "vllm"] = option("hf", "Runtime: hf (transformers, anywhere) or vllm (fast on "
                                                  "GPU).")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = option(
        "auto", "Model dtype: auto = fp16 on GPUs before compute capability 8, bf16 from 8, fp32 on CPU.")
    device: str = option("auto", "Device: auto (CUDA if present), cpu, cuda, cuda:1 ...")
    samples: int = option(1, "Completions per prompt (sample j of example ID gets the id ID#j).")
    temperature: float = option(1.0, "Sampling temperature (0: greedy).")
    top_p: float = option(1.0, "Nucleus sampling: keep the smallest set of tokens whose probability reaches "
                               "top_p.")
    max_new_tokens: int = option(256, "Most tokens generated per completion.")
    batch_size: int = option(16, "Completions per batch (the unit of resume).")
    fraction: float = option(1.0, "Generate for a seeded random share of the selected prompts: "
                                  "ceil(fraction x N) of them, in their dataset order (on-policy rounds).")
    fraction_seed: int | None = option(None, "Seed of the --fraction choice (default --seed; another value "
                                             "picks other prompts without moving the held-out split).")
    overwrite: bool = option(False, "Start the output file again (otherwise a rerun continues it).")
    vllm_max_model_len: int | None = option(None, "vLLM backend: context length (default: the model's).")
    vllm_gpu_memory_utilization: float = option(0.9, "vLLM backend: fraction of GPU memory for weights and "
                                                      "KV cache.")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("samples", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"--temperature must be a finite number >= 0 (0: greedy), "
                             f"not {self.temperature}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"--top-p must be in (0, 1], not {self.top_p}")
        if not (math.isfinite(self.fraction) and 0 < self.fraction <= 1):
            raise ValueError(f"--fraction must be in (0, 1] (a share of the prompts), not {self.fraction}")
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ValueError(f"--vllm-gpu-memory-utilization must be in (0, 1], not "
                             f"{self.vllm_gpu_memory_utilization}")

    def selection_seed(self) -> int:
        return self.seed if self.fraction_seed is None else self.fraction_seed

    def sampling(self) -> dict[str, Any]:
        return {"samples": self.samples, "temperature": self.temperature, "top_p": self.top_p,
                "max_new_tokens": self.max_new_tokens, "seed": self.seed}


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
        return Path("runs") / _slug(name)


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
        return Path("runs") / _slug(f"sft-{stem}-{Path(self.model or 'model').name}")


@dataclass
class EvaluateConfig(DataConfig):
    """Options of `kdpipe evaluate` (YAML keys; CLI options with dashes)."""

    model: list[str] = option([], "Model to evaluate (repeat for several): hub id, folder, LoRA adapter "
                                  "folder or run "
                                  "folder. Default: the latest finished run's student, its base and its "
                                  "teacher.")
    task: list[str] = option(["auto"], "classify, exact-match, perplexity (comma-separated), or auto (by "
                                       "template: "
                                       "sentiment -> classify, arithmetic -> exact-match,perplexity, else "
                                       "perplexity).")
    cache: str | None = option(None, "Held-out teacher cache: fidelity to the teacher (KL, top-1 agreement, "
                                     "top-k recall, ECE).")
    cache_limit: int | None = option(None, "Use at most this many cached examples.")
    checker: str | None = option(None, "Exact-match checker: arithmetic, exact, regex:PATTERN ({field} "
                                       "inserts a field, "
                                       "escaped) or path/to/file.py:function (fields, answer) -> bool. "
                                       "Default: arithmetic "
                                       "for the arithmetic template, else exact (equal to the reference, "
                                       "stripped).")
    generate: bool = option(False, "classify by greedy generation and parsing the label after 'Sentiment:' "
                                   "(the default "
                                   "for sentiment-think) instead of scoring each label.")
    max_new_tokens: int | None = option(None, "Generation length (default: longest reference + 16; 256 for "
                                              "sentiment-think).")
    lm_eval: list[str] = option([], "lm-evaluation-harness tasks, e.g. ifeval,hellaswag (needs "
                                    "kdpipe[lm-eval]; --limit applies; --max-new-tokens caps generation).")
    lm_eval_data: list[str] = option([], "TASK=FILE: run that --lm-eval task on a local JSONL/JSON/CSV/"
                                         "Parquet file in the task's own format instead of its hub data set "
                                         "(e.g. ifeval=ifeval.jsonl with key, prompt, instruction_id_list, "
                                         "kwargs).")
    output: str | None = option(None, "Folder for results.json/.csv, predictions and plots (default: "
                                      "RUN/eval for a run, else eval).")
    batch_size: int = option(64, "Most sequences in one forward pass (or one generation batch).")
    max_batch_tokens: int = option(16384, "Most tokens (rows × longest row) in one forward pass.")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = option("auto", "Weights dtype (auto keeps the "
                                                                    "checkpoint's).")
    device: str = option("auto", "Device: auto (CUDA if present), cpu, cuda, cuda:1 ...")
    verify: Literal["fast", "full"] = option("fast", VERIFY_HELP)
    plot: bool | None = option(None, "Write metrics.png (and training curves of runs); needs matplotlib. "
                                     "Default: when matplotlib is installed.")

    def __post_init__(self) -> None:
        super().__post_init__()
        from kdpipe.evaluation.tasks import TASK_NAMES  # the task registry (numpy, no torch)

        unknown = [t for t in self.task if t not in TASK_NAMES]
        if unknown:
            raise ValueError(f"unknown task {', '.join(map(repr, unknown))}; "
                             f"use one of {', '.join(TASK_NAMES)}")
        for name in ("batch_size", "max_batch_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        for name in ("max_new_tokens", "cache_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        for pair in self.lm_eval_data:
            task, _, path = pair.partition("=")
            if not task or not path:
                raise ValueError(f"lm_eval_data takes TASK=FILE (e.g. ifeval=ifeval.jsonl), not {pair!r}")
            if task not in self.lm_eval:
                raise ValueError(f"lm_eval_data names the task {task!r}, which is not among the lm_eval "
                                 f"tasks ({', '.join(self.lm_eval) or 'none'}): add --lm-eval {task}")

    @property
    def lm_eval_files(self) -> dict[str, str]:
        """--lm-eval-data as {task: file}."""
        return dict(pair.partition("=")[::2] for pair in self.lm_eval_data)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")
