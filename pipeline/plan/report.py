"""`kdpipe plan`'s report: the plan as the terminal shows it, `kdpipe run --dry-run`'s line per step, and
the size of the data a plan is made for. The estimates themselves are `kdpipe.plan.estimate`."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from kdpipe.errors import KdpipeError
from kdpipe.plan.estimate import GiB, Workload, cache_teacher_plan, train_plan
from kdpipe.plan.hardware import Gpu, load_arch, local_device


def _size(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:.0f} MiB"


def _duration(s: float | None) -> str:
    if s is None:
        return "?"
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


def format_plan(p: dict[str, Any]) -> str:
    """The plan as the terminal shows it."""
    d, w = p["device"], p["workload"]
    lines = [f"device: {d['name']}, {_size(d['memory_bytes'])} usable"
             + (f", compute capability {d['capability'][0]}.{d['capability'][1]}" if d["capability"] else ""),
             f"data: {w['examples']:,} examples x {w['mean_length']:g} tokens = {w['tokens']:,.0f} tokens, "
             f"{w['targets']:,.0f} distilled; max length {w['max_length']}"]
    for role, m in p["models"].items():
        lines.append(f"{role}: {m['name']}: {m['params']:,} parameters, "
                     f"{m['layers']} layers x {m['hidden']}, "
                     f"vocab {m['vocab']:,}{', tied head' if m['tied'] else ''}")
    eff = f"{w['efficiency']:.0%} of peak FLOP/s"
    for s in p["stages"]:
        verdict = "fits" if s["fits"] else "DOES NOT FIT"
        lines += ["", f"{s['stage']} [{s['model']}, {s['dtype']}, batch {s['batch']}]: "
                      f"peak {_size(s['peak_bytes'])} "
                      f"of {_size(s['device_bytes'])}: {verdict}"]
        width = max(map(len, s["memory"]))
        lines += [f"  {name:<{width}}  {_size(b):>10}" for name, b in s["memory"].items()]
        largest = s["largest_batch"]
        lines.append(f"  largest batch that fits: {largest if largest is not None else '?'}"
                     + (f" x {w['max_length']}" if largest and "vLLM" not in s["stage"] else ""))
        steps = f" ({s['steps per epoch']:,} steps per epoch)" if "steps per epoch" in s else ""
        span = "per epoch" if "steps per epoch" in s else "for the data"
        lines.append(f"  time: {_duration(s['seconds'])} {span} "
                     f"at {eff}{steps}")
        if "padded seconds" in s:
            lines.append(f"    packed rows (--batching packed, the default); --batching padded: up to "
                         f"{_duration(s['padded seconds'])} (batches padded to --max-length)")
        if s.get("measured_step_seconds"):
            lines.append(f"  measured: {s['measured_step_seconds']:.2f} s per step over "
                         f"{s['measured_steps']} steps -> {_duration(s['measured_seconds'])} {span} "
                         f"({s['calibration']:.1f}x the estimate)")
        if s["note"]:
            lines.append(f"  note: {s['note']}")
    c = p["cache"]
    mode = f"k = {c['k']}" if "k" in c else f"N = {c['samples']} samples"
    lines += ["", f"cache on disk: {_size(c['bytes'])} ({c['encoding']}, {c['sparse_mode']} {mode}: "
                  f"{c['bytes_per_target']} bytes per distilled token, measured rates: docs/benchmarks.md)"]
    if p["note"]:
        lines.append(f"note: {p['note']}")
    return "\n".join(lines)


# ---------------------------------------------------------------- data sizes and this machine

# Training-split sizes of the hub datasets the README names (offline, no download); token counts
# are not known without the tokenizer: pass --mean-length (default: every example max-length long).
KNOWN_EXAMPLES = {"imdb": 25_000, "stanfordnlp/imdb": 25_000, "stanfordnlp/sst2": 67_349, "sst2": 67_349,
                  "yahma/alpaca-cleaned": 51_760, "timdettmers/openassistant-guanaco": 9_846,
                  "kdpipe:arithmetic": 2_700}


def dataset_examples(dataset: str) -> int:
    """Examples in a known hub dataset's training split, or rows of a local .jsonl/.json/.csv/.parquet."""
    path = Path(dataset).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows
        if suffix == ".json":
            data = json.loads(path.read_text())
            return len(data) if isinstance(data, list) else len(next(iter(data.values())))
        with path.open("rb") as f:
            lines = sum(1 for line in f if line.strip())
        return lines - 1 if suffix == ".csv" else lines
    if dataset in KNOWN_EXAMPLES:
        return KNOWN_EXAMPLES[dataset]
    raise KdpipeError(f"--dataset {dataset}: not a local file and not a dataset kdpipe plan "
                      "knows the size of "
                      f"({', '.join(KNOWN_EXAMPLES)}); pass --limit N (examples) or --tokens N instead")


def one_line(s: dict[str, Any]) -> str:
    """A stage's prediction in one line (for `kdpipe run --dry-run`)."""
    verdict = "fits" if s["fits"] else "DOES NOT FIT"
    parts = ", ".join(f"{k} {_size(v)}" for k, v in s["memory"].items())
    return (f"{s['stage']}: peak {_size(s['peak_bytes'])} of {_size(s['device_bytes'])} "
            f"({verdict}; largest batch "
            f"{s['largest_batch']}) = {parts}")


def step_line(kind: str, cfg: Any, max_length: int | None = None, device: Gpu | None = None,
              pending: Any = ()) -> str | None:
    """`kdpipe run --dry-run`'s plan line for a cache, train or finetune step on this machine (else None).

    Memory only (the data size is not known before the step runs): every batch at full length.
    """
    if kind not in ("cache", "train", "finetune"):
        return None
    if cfg.model in pending and not (Path(cfg.model) / "config.json").is_file():
        return f"plan: once {cfg.model} exists (an earlier step writes it)"
    try:
        device = device or local_device()
        length = getattr(cfg, "max_length", None) or max_length or 512
        w = Workload(examples=1, mean_length=length, targets_per_example=length - 1, max_length=length)
        if kind == "cache":
            w = replace(w, top_k=cfg.top_k, encoding=cfg.encoding, sparse_mode=cfg.sparse_mode,
                        samples=cfg.samples, backend=cfg.backend, teacher_batch_size=cfg.batch_size,
                        max_batch_tokens=cfg.max_batch_tokens,
                        teacher_chunk=cfg.chunk_size, teacher_dtype=cfg.dtype,
                        vllm_gpu_memory_utilization=cfg.vllm_gpu_memory_utilization)
            if cfg.vllm_max_num_batched_tokens:
                w.vllm_max_num_batched_tokens = cfg.vllm_max_num_batched_tokens
            s = cache_teacher_plan(load_arch(cfg.model), device, w)
        else:
            w = replace(w, lora=cfg.lora, lora_r=cfg.lora_r, batch_size=cfg.batch_size,
                        precision=cfg.precision,
                        gradient_checkpointing=cfg.gradient_checkpointing,
                        student_chunk=getattr(cfg, "chunk_size", w.student_chunk))
            arch = load_arch(cfg.model)
            s = train_plan(arch, device, w, "train-student" if kind == "train" else "finetune")
    except KdpipeError as e:
        return f"plan: unavailable ({e.message})"
    return "plan: " + one_line({"stage": s.stage, "memory": s.memory, "peak_bytes": s.peak,
                                "device_bytes": s.device_memory,
                                "fits": s.fits, "largest_batch": s.largest_batch}) + f" on {device.name}"
