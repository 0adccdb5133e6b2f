"""`kdpipe plan`: will it fit, how long will it take, how large is the cache — before anything runs.

Everything comes from a model's ``config.json`` (no weights, no torch): a hub id (read from the
local hub cache, offline), a local model folder, or one of the published configs shipped in
``kdpipe/archs/`` (Qwen3-0.6B ... Qwen2.5-7B-Instruct, DeepSeek-R1-Distill-Qwen-1.5B/7B, gpt2-medium).

Units, each small and separately testable (the architectures and devices are `kdpipe.plan.hardware`, the
report and the data sizes `kdpipe.plan.report`):
  Arch            the architecture and its exact parameter count (embeddings, blocks, head)
  GPUS            memory, peak half-precision FLOP/s, bandwidth, compute capability
  *_memory        the peak-memory model of each stage, in named parts (bytes)
  seconds()       time from FLOPs at a stated fraction of the peak FLOP/s (and bandwidth)
  cache_bytes()   the cache's size on disk from the measured bytes per target token

Where a coefficient was measured rather than derived, the comment says where. Memory models are
for one process on one device; multi-GPU (DDP/FSDP, vLLM tensor parallel) is not modelled.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from kdpipe.errors import KdpipeError
from kdpipe.plan.hardware import Arch, Gpu, load_arch
from kdpipe.precision import auto_precision

GiB = 2**30
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

# ---------------------------------------------------------------- the run being planned


@dataclass
class Workload:
    """What is planned: data size, lengths, and the options of the stages that matter for memory and time."""

    examples: int
    mean_length: float  # tokens per example (padding excluded)
    targets_per_example: float  # distilled / trained positions per example
    max_length: int = 512
    top_k: int = 32
    encoding: str = "compact"
    sparse_mode: str = "topk"
    samples: int = 12
    backend: str = "hf"
    lora: bool = True
    lora_r: int = 16
    batch_size: int = 8  # the student's micro-batch
    teacher_batch_size: int = 32  # cache-teacher's --batch-size ...
    max_batch_tokens: int = 16384  # ... and --max-batch-tokens
    teacher_chunk: int = 2048  # cache-teacher's --chunk-size
    student_chunk: int = 1024  # train-student's --chunk-size
    vllm_gpu_memory_utilization: float = 0.9
    vllm_max_num_batched_tokens: int = 8192
    gradient_checkpointing: bool = False
    efficiency: float = 0.35  # fraction of the peak FLOP/s reached (HF on a T4: about a third)
    teacher_dtype: str = "auto"
    precision: str = "auto"

    @property
    def tokens(self) -> float:
        return self.examples * self.mean_length

    @property
    def targets(self) -> float:
        return self.examples * self.targets_per_example


# ---------------------------------------------------------------- memory models (bytes)


def train_activation_bytes(arch: Arch, tokens: int, positions: int, lora: bool, precision: str, r: int = 16,
                           checkpointing: bool = False) -> int:
    """What autograd keeps from the student's forward for backward, LM head excluded.

    Counted per token and block from the tensors a Qwen3 block saves (measured with saved-tensor
    hooks: tests/test_plan.py checks this against a real model). With LoRA (dropout > 0) the frozen
    projections save nothing, but each adapter saves its dropped-out input and mask; the first
    block's input (frozen embeddings) needs no gradient. Full fine-tuning saves each projection's
    input and the normalised activations the norm weights need. In half precision the RMSNorms
    keep an fp32 copy of their input.
    """
    h, q, kv, i = arch.hidden, arch.q_dim, arch.kv_dim, arch.intermediate
    norm = 1 if arch.qk_norm else 0
    if lora:
        per_token = (2 + 2 * 5) * h + (2 + norm + 2) * q + (2 + norm) * kv + (3 + 2) * i + 7 * r
        first = -2.75 * h
    else:
        per_token = 4 * h + (3 + 2 * norm) * q + (2 + 2 * norm) * kv + 4 * i
        first = 3.25 * h
    dt = BYTES[precision]
    small = 2 * arch.heads + arch.kv_heads + 2  # log-sum-exps and rsqrt's, fp32
    upcast = (2 * h + norm * (q + kv)) * (4 - dt)  # the norms' fp32 input copies in half precision
    per_layer = tokens * (per_token * dt + small * 4 + upcast)
    if checkpointing:  # each block keeps its input; one block's activations are recomputed at a time
        return int(arch.layers * tokens * h * dt + per_layer + positions * h * dt)
    return int(arch.layers * per_layer + tokens * first * dt + positions * h * dt)


def inference_activation_bytes(arch: Arch, tokens: int, dtype: str) -> int:
    """The peak a no-grad forward adds: one block's working set plus the residual stream (in and out)."""
    dt = BYTES[dtype]
    h, q, kv, i = arch.hidden, arch.q_dim, arch.kv_dim, arch.intermediate
    return int(tokens * ((3 * h + q + 2 * kv + 3 * i) * dt + 2 * h * 4 * (dt < 4)))


def teacher_head_scratch(arch: Arch, rows: int, dtype: str) -> int:
    """cache-teacher's LM head on one chunk of positions: the logits in the model's dtype, their fp32 copy."""
    dt = BYTES[dtype]
    return rows * arch.vocab * (dt + 4 if dt < 4 else 4)


def fused_head_scratch(arch: Arch, rows: int, precision: str) -> int:
    """train-student's fused head on one chunk: logits, their fp32 working copy (it becomes the gradient) and
    the gradient cast back; plus the fp32 gradient accumulator of an untied trainable head."""
    dt = BYTES[precision]
    return rows * arch.vocab * (dt + 4 + dt if dt < 4 else 4)


def sft_head_scratch(arch: Arch, tokens: int, precision: str) -> int:
    """HF's causal-LM loss (what `finetune` uses): full [B, S, V] logits, their fp32 copy, log-softmax."""
    return tokens * arch.vocab * (BYTES[precision] + 8)


@dataclass
class StagePlan:
    stage: str
    model: str
    dtype: str
    batch: str
    memory: dict[str, int]  # named parts, bytes
    device_memory: int
    largest_batch: int | None
    seconds: float | None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def peak(self) -> int:
        return sum(self.memory.values())

    @property
    def fits(self) -> bool:
        return self.peak <= self.device_memory


def _largest(memory_at: Any, budget: int, limit: int = 4096) -> int:
    """The largest batch b <= limit with memory_at(b) <= budget (0 if 1 does not fit); grows with b."""
    if memory_at(1) > budget:
        return 0
    lo, hi = 1, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if memory_at(mid) <= budget else (lo, mid - 1)
    return lo


def resolve(dtype: str, gpu: Gpu) -> str:
    return auto_precision(gpu.capability) if dtype == "auto" else dtype


def teacher_rows(w: Workload) -> int:
    """Rows of cache-teacher's full-length batch: --batch-size within --max-batch-tokens."""
    return max(1, min(w.teacher_batch_size, w.max_batch_tokens // w.max_length))


def cache_teacher_plan(arch: Arch, gpu: Gpu, w: Workload) -> StagePlan:
    dtype = resolve(w.teacher_dtype, gpu)
    weights = arch.params() * BYTES[dtype]
    targets_fraction = min(1.0, w.targets_per_example / max(1.0, w.mean_length - 1))
    if w.backend == "vllm":
        return _vllm_plan(arch, gpu, w, dtype, weights)

    def memory(rows: int) -> dict[str, int]:
        tokens = rows * w.max_length
        positions = min(tokens, math.ceil(rows * max(1.0, w.targets_per_example)))
        return {"weights": weights,
                "activations": inference_activation_bytes(arch, tokens, dtype)
                + positions * arch.hidden * BYTES[dtype],
                "LM-head chunk": teacher_head_scratch(arch, min(w.teacher_chunk, positions), dtype)}

    rows = teacher_rows(w)
    flops = 2 * (arch.matmul_params() + arch.layers * w.mean_length * arch.q_dim) * w.tokens \
        + 2 * arch.hidden * arch.vocab * w.targets
    return StagePlan("cache-teacher", arch.name, dtype, f"{rows} x {w.max_length}", memory(rows), gpu.memory,
                     _largest(lambda b: sum(memory(b).values()), gpu.memory),
                     seconds(flops, weights, gpu, dtype, w),
                     extra={"target_fraction": round(targets_fraction, 4)})


def _vllm_plan(arch: Arch, gpu: Gpu, w: Workload, dtype: str, weights: int) -> StagePlan:
    """vLLM takes `gpu_memory_utilization` of the device: weights, its activation profile, the rest KV cache.

    Prompt log-probs are computed for every prompt token of an engine step in fp32 (logits and
    their log-softmax): up to max_num_batched_tokens x vocab x 8 bytes, which vLLM's start-up
    profile does not reserve — the usual out-of-memory with prompt_logprobs on small GPUs.
    """
    budget = int(gpu.memory * w.vllm_gpu_memory_utilization)
    step = w.vllm_max_num_batched_tokens
    activations = inference_activation_bytes(arch, step, dtype)
    logprobs = step * arch.vocab * 8
    kv = max(0, budget - weights - activations - logprobs)
    seq_kv = arch.kv_bytes_per_token(BYTES[dtype]) * w.max_length
    memory = {"weights": weights, "activations": activations, "prompt log-probs (fp32)": logprobs,
              "vLLM KV cache": kv}
    if kv == 0:
        memory["vLLM KV cache"] = seq_kv  # it needs at least one sequence: shows by how much it is short
    flops = 2 * (arch.matmul_params() + arch.layers * w.mean_length * arch.q_dim) * w.tokens \
        + 2 * arch.hidden * arch.vocab * w.tokens  # vLLM scores every prompt token
    return StagePlan("cache-teacher (vLLM)", arch.name, dtype, f"{step:,} tokens per engine step", memory,
                     gpu.memory if kv else budget, kv // seq_kv if seq_kv else None,
                     seconds(flops, weights, gpu, dtype, w),
                     note=f"vLLM reserves {w.vllm_gpu_memory_utilization:g} of the memory; "
                          "the largest batch is "
                          "the sequences its KV cache holds at once")


def train_memory(arch: Arch, w: Workload, precision: str, batch: int, head: str) -> dict[str, int]:
    """A training step's parts: weights, gradients + optimizer (+ LoRA), activations, the head's scratch."""
    tokens = batch * w.max_length
    positions = min(tokens, math.ceil(batch * max(1.0, w.targets_per_example)))
    if w.lora:
        trainable = arch.lora_params(w.lora_r)
        weights = arch.params() * BYTES[precision]  # the frozen base stays in half precision with LoRA
        state = {"LoRA weights (fp32)": trainable * 4}
    else:
        trainable = arch.params()
        weights = trainable * 4  # fp32 master weights; autocast computes in half precision
        state = {}
    state["gradients + AdamW"] = trainable * (4 + 8)  # fp32 grads, exp_avg, exp_avg_sq
    if head == "fused":
        scratch = fused_head_scratch(arch, min(w.student_chunk, positions), precision)
        if not w.lora:
            scratch += arch.vocab * arch.hidden * 4  # the head's fp32 gradient accumulator
        head_part = {"LM-head chunk": scratch}
    else:
        head_part = {"LM head (full logits + CE)": sft_head_scratch(arch, tokens, precision)}
    activations = train_activation_bytes(arch, tokens, positions if head == "fused" else 0, w.lora, precision,
                                         w.lora_r,
                                         w.gradient_checkpointing)
    return {"weights": weights, **state, "activations": activations, **head_part}


def train_plan(arch: Arch, gpu: Gpu, w: Workload, stage: str = "train-student", head: str = "fused",
               resident: dict[str, int] | None = None) -> StagePlan:
    precision = resolve(w.precision, gpu)

    def memory(batch: int) -> dict[str, int]:
        return {**(resident or {}), **train_memory(arch, w, precision, batch, head)}

    factor = 2.0 if w.lora else 3.0  # forward + input gradients (+ weight gradients in a full fine-tune)
    factor += 1.0 if w.gradient_checkpointing else 0.0  # the forward again in backward
    steps = math.ceil(w.examples / w.batch_size)
    weights = arch.params() * BYTES[precision]

    def time_at(length: float) -> float:  # every row `length` tokens long (packed rows: the mean length)
        tokens = steps * w.batch_size * length
        positions = w.targets if head == "fused" else tokens
        flops = factor * 2 * (arch.matmul_params() + arch.layers * length * arch.q_dim) * tokens \
            + (2 + factor) * arch.hidden * arch.vocab * positions
        return seconds(flops, weights * steps * 2, gpu, precision, w)

    plan = StagePlan(stage, arch.name, precision, f"{w.batch_size} x {w.max_length}", memory(w.batch_size),
                     gpu.memory, _largest(lambda b: sum(memory(b).values()), gpu.memory),
                     time_at(w.mean_length))
    plan.extra["steps per epoch"] = steps
    plan.extra["padded seconds"] = time_at(w.max_length)  # --batching padded: a max-length row in each batch
    return plan


def online_plan(teacher: Arch, student: Arch, gpu: Gpu, w: Workload) -> StagePlan:
    """Online KD: the teacher resident beside the student, its forward (no grad) before each student step."""
    dtype = resolve(w.teacher_dtype, gpu)
    resident = {"teacher weights": teacher.params() * BYTES[dtype]}
    plan = train_plan(student, gpu, w, "online KD (both resident)", resident=resident)
    tokens = w.batch_size * w.max_length
    transient = inference_activation_bytes(teacher, tokens, dtype) + teacher_head_scratch(
        teacher, min(w.teacher_chunk, math.ceil(w.batch_size * w.targets_per_example)), dtype)
    plan.note = f"the teacher's forward adds {transient / GiB:.2f} GiB before the student's step (then freed)"
    teacher_time = cache_teacher_plan(teacher, gpu, w).seconds or 0.0
    plan.seconds = (plan.seconds or 0.0) + teacher_time
    plan.extra["padded seconds"] += teacher_time  # the teacher's forward is in both, padded or packed
    return plan


def seconds(flops: float, bytes_moved: float, gpu: Gpu, precision: str, w: Workload) -> float:
    """FLOPs at `efficiency` of the peak, or the bytes at `efficiency` of the bandwidth if that is longer."""
    return max(flops / (gpu.peak(precision) * w.efficiency), bytes_moved / (gpu.bandwidth * w.efficiency))


# ---------------------------------------------------------------- cache size on disk

# Bytes on disk per target token = a + b x (k or N), least-squares fits to bench/bench_encoding.py's measured
# shard sizes (README "What it costs and buys": a 152k vocabulary, every token distilled, so the
# input ids are included once per target): plain 42.0 / 125.7 / 236.2 and compact 26.7 / 84.2 /
# 157.9 at k = 8 / 32 / 64, compact16 100.4 at k = 32, sampled 12.4 / 17.8 / 25.6 at N = 6 / 12 / 24.
# Update these when the encodings change.
TARGET_BYTES: dict[tuple[str, str], tuple[float, float]] = {
    ("plain", "topk"): (14.3, 3.468),
    ("compact", "topk"): (8.0, 2.343),
    ("compact16", "topk"): (8.0, 2.853),
    ("plain", "sampled"): (10.5, 1.05),  # not measured: compact's fit plus ~0.3 byte per draw for int32 ids
    ("compact", "sampled"): (8.5, 0.721),
    ("compact16", "sampled"): (8.5, 0.85),  # not measured: 16-bit codes of the estimates
}
# Each token that is not distilled (the prompt, with completions only) still stores its input id.
# Estimated (not measured alone): about 2 bytes per id after zstd for a 152k vocabulary.
INPUT_ID_BYTES = 2.0


def cache_bytes(targets: float, tokens: float, encoding: str = "compact", sparse_mode: str = "topk",
                k: int = 32, samples: int = 12) -> int:
    """Predicted shard bytes for `targets` distilled positions out of `tokens` tokens."""
    try:
        a, b = TARGET_BYTES[(encoding, sparse_mode)]
    except KeyError:
        raise KdpipeError(f"no size model for --encoding {encoding} with --sparse-mode {sparse_mode}; "
                          f"known: {', '.join(f'{e}/{m}' for e, m in TARGET_BYTES)}") from None
    per_target = a + b * (samples if sparse_mode == "sampled" else k)
    return int(targets * per_target + max(0.0, tokens - targets) * INPUT_ID_BYTES)


# ---------------------------------------------------------------- the whole plan


def make_plan(teacher: str | None, student: str | None, gpu: Gpu, w: Workload,
              layers: int | None = None) -> dict[str, Any]:
    """Every stage's prediction, as plain data (what --json prints)."""
    if not (teacher or student):
        raise KdpipeError("pass --teacher and/or --student")
    for name in ("examples", "max_length", "top_k", "batch_size", "lora_r", "teacher_batch_size",
                 "max_batch_tokens",
                 "teacher_chunk", "student_chunk", "samples", "vllm_max_num_batched_tokens"):
        if getattr(w, name) < 1:
            raise KdpipeError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(w, name)}")
    if not 0 < w.vllm_gpu_memory_utilization <= 1:
        raise KdpipeError("--vllm-gpu-memory-utilization must be in (0, 1], "
                          f"not {w.vllm_gpu_memory_utilization:g}")
    if not 0 < w.efficiency <= 1:
        raise KdpipeError(f"--efficiency must be in (0, 1], not {w.efficiency:g}")
    if not 1 <= w.mean_length <= w.max_length:
        raise KdpipeError(f"--mean-length must be in [1, --max-length={w.max_length}], not {w.mean_length:g}")
    if not 0 < w.targets_per_example <= w.mean_length:
        raise KdpipeError(f"--targets-per-example must be in (0, mean length {w.mean_length:g}], "
                          f"not {w.targets_per_example:g}")
    t_arch = load_arch(teacher, layers) if teacher else None
    s_arch = load_arch(student, layers) if student else None
    if t_arch and s_arch and t_arch.vocab != s_arch.vocab:
        note = f"the teacher's vocabulary ({t_arch.vocab:,}) and the student's ({s_arch.vocab:,}) differ"
    else:
        note = ""
    stages: list[StagePlan] = []
    if t_arch:
        stages.append(cache_teacher_plan(t_arch, gpu, w))
    if s_arch:
        stages.append(train_plan(s_arch, gpu, w))
    if t_arch and s_arch:
        stages.append(online_plan(t_arch, s_arch, gpu, w))
    if s_arch:  # finetune trains its cross-entropy through the same fused head as train-student
        stages.append(train_plan(s_arch, gpu, w, "SFT alone (finetune)"))
    if t_arch:
        stages.append(train_plan(t_arch, gpu, w, "teacher fine-tune (finetune)"))
    size = cache_bytes(w.targets, w.tokens, w.encoding, w.sparse_mode, w.top_k, w.samples)
    return {
        "device": {"name": gpu.name, "memory_bytes": gpu.memory, "peak_flops": gpu.flops,
                   "bandwidth": gpu.bandwidth,
                   "capability": list(gpu.capability) if gpu.capability else None},
        "workload": asdict(w) | {"tokens": w.tokens, "targets": w.targets},
        "models": {role: {"name": a.name, "params": a.params(), "layers": a.layers, "hidden": a.hidden,
                          "vocab": a.vocab, "tied": a.tied, "lora_params": a.lora_params(w.lora_r)}
                   for role, a in (("teacher", t_arch), ("student", s_arch)) if a},
        "stages": [{"stage": s.stage, "model": s.model, "dtype": s.dtype, "batch": s.batch,
                    "memory": s.memory,
                    "peak_bytes": s.peak, "device_bytes": s.device_memory, "fits": s.fits,
                    "largest_batch": s.largest_batch, "seconds": s.seconds, "note": s.note, **s.extra}
                   for s in stages],
        "cache": {"bytes": size, "encoding": w.encoding, "sparse_mode": w.sparse_mode,
                  **({"k": w.top_k} if w.sparse_mode == "topk" else {"samples": w.samples}),
                  "bytes_per_target": round(size / w.targets, 1) if w.targets else None},
        "note": note,
    }
