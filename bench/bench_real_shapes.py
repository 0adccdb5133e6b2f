"""The mission's shapes for real: a Qwen3-4B teacher and a Qwen3-0.6B student, measured beside `kdpipe plan`.

    python bench/bench_real_shapes.py --gpu-memory-gb 16            # on a GPU: capped to a T4's 16 GB, fp16
    python bench/bench_real_shapes.py --layers 2 --batch 1          # on CPU: real widths and vocabulary, 2 layers

Random-weight models with the exact published architectures, built from kdpipe's shipped configs
(kdpipe/archs/Qwen3-4B.json, Qwen3-0.6B.json: vocabulary 151,936, tied embeddings), nothing
downloaded. At sequence length 512 and k = 32 it measures:
  cache    cache-teacher's HF scoring of one full-length batch (decoder + LM head on every position in
           chunks + top-k/tail): peak memory and target tokens/s
  train    train-student: LoRA r = 16 on every projection, kdpipe's fused sparse KD loss (fkl, alpha 0.5,
           bucket tail) on cached-style targets, AdamW: peak memory and step time
  online   online KD: the teacher resident beside the student, a teacher forward (no grad, same chunked
           head) making the targets before each student step (what kdpipe replaces)
  sft      the student's SFT step alone (the model's own causal-LM loss, as `kdpipe finetune`)
and prints `kdpipe plan`'s prediction for the same shapes beside each measurement.

GPU mode (CUDA present): fp16 as on a T4 (`auto` below compute capability 8; pass --dtype to change),
`--gpu-memory-gb` caps the process with torch.cuda.set_per_process_memory_fraction and plan predicts
for that memory; peak = torch.cuda.max_memory_allocated; a case that runs out of memory is reported
as not fitting. Defaults: all layers, student batch 8 x 512, teacher batch 32 x 512 (cache-teacher's
defaults at 512 tokens). The vLLM backend is not measured here (bench/bench_vllm.py compares it).
CPU mode: fp32, `--layers N` keeps the real widths and vocabulary with N layers (plan is given the same
N), peak = the process's peak RSS (VmHWM, restarted once the models are built) minus its RSS before
the models were built; `--batch` sets the
student and teacher batch (default 1 on CPU, to finish in minutes).

Each case runs in a fresh subprocess, so that one case's peak (and the allocator's cached memory)
does not hide the next one's: one warm-up step, then `--steps` timed steps (median).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CASES = ("cache", "train", "online", "sft")
K = 32


def peak_rss() -> int:
    """The process's peak resident set size (VmHWM), bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak_rss() -> None:
    """Give freed heap back to the OS and restart the peak (VmHWM) from the current RSS (Linux >= 4.0)."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------- one case, in a child process


def build(name: str, layers: int | None, dtype, device):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from kdpipe.plan.hardware import ARCH_DIR

    raw = json.loads((ARCH_DIR / f"{name}.json").read_text())
    raw = {k: v for k, v in raw.items() if not k.startswith("_") and k != "torch_dtype"}
    if layers:
        raw["num_hidden_layers"] = layers
    cfg = AutoConfig.for_model(raw.pop("model_type"), **raw)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.config.use_cache = False
    return model


def batch_of(rows: int, length: int, vocab: int, device):
    import torch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (rows, length), generator=g)
    r = torch.arange(rows).repeat_interleave(length - 1)
    c = torch.arange(length - 1).repeat(rows)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "target_rows": r, "target_cols": c,
           "labels": ids[r, c + 1]}
    return {k: v.to(device) for k, v in out.items()}


def teacher_targets(teacher, batch: dict, chunk: int) -> dict:
    """The sparse targets cache-teacher would store, made on the fly (the online-KD teacher step)."""
    import torch

    from kdpipe.teacher.hf import sparse_targets

    with torch.inference_mode():
        hidden = teacher.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                    use_cache=False).last_hidden_state
        selected = hidden[batch["target_rows"], batch["target_cols"]]
        head = teacher.get_output_embeddings()
        parts = [sparse_targets(head(selected[s:s + chunk]), batch["labels"][s:s + chunk], K)
                 for s in range(0, len(selected), chunk)]
    ids, logprobs, _, tail = (torch.cat(p) for p in zip(*parts))
    return {**batch, "topk_ids": ids.long().clone(), "topk_logprobs": logprobs.clone(), "tail_mass": tail.clone()}


def run_case(args: argparse.Namespace) -> dict:
    import torch

    from kdpipe.data.tokenize import TokenizedExample
    from kdpipe.losses import DistillLossConfig
    from kdpipe.teacher.hf import HFTeacher
    from kdpipe.train.lora import lora_targets
    from kdpipe.train.trainer import student_distill_loss

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    if gpu and args.gpu_memory_gb:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.gpu_memory_gb * 1e9 / total))
    import peft  # noqa: F401  (imported before the baseline: code is runtime, not the step's memory)
    from transformers import AutoModelForCausalLM  # noqa: F401
    from transformers.models.qwen3 import modeling_qwen3  # noqa: F401

    base = rss()
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    times: list[float] = []
    tokens = 0

    def timed(fn) -> None:
        if not gpu:  # the peak of the steps, not of building the models (init's temporaries)
            reset_peak_rss()
        fn()  # warm-up
        for _ in range(args.steps):
            if gpu:
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if gpu:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)

    try:
        if args.case == "cache":
            teacher = build(args.teacher, args.layers, dtype, device).eval()
            vocab = teacher.config.vocab_size
            scorer = HFTeacher(teacher, K, args.teacher_chunk)
            g = torch.Generator().manual_seed(1)
            import numpy as np

            rows = [TokenizedExample(f"x{i}", torch.randint(0, vocab, (args.length,), generator=g).numpy().astype(np.int32),
                                     np.arange(args.length - 1, dtype=np.int32)) for i in range(args.teacher_batch)]
            tokens = args.teacher_batch * (args.length - 1)
            timed(lambda: scorer.score(rows))
        else:
            from peft import LoraConfig, get_peft_model

            student_dtype = dtype if gpu else torch.float32  # a frozen LoRA base stays in half precision on a GPU
            student = build(args.student, args.layers, student_dtype, device)
            student = get_peft_model(student, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                         target_modules=lora_targets(student), task_type="CAUSAL_LM"))
            student.train()
            teacher = build(args.teacher, args.layers, dtype, device).eval() if args.case == "online" else None
            vocab = student.config.vocab_size
            opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-4)
            batch = batch_of(args.batch, args.length, vocab, device)
            cached = None
            if args.case == "train":  # targets as read from a cache: sorted top-k log-probs, tail mass
                n, g = len(batch["labels"]), torch.Generator().manual_seed(2)
                logprobs = torch.log_softmax(torch.randn(n, K + 1, generator=g) * 3, -1).sort(-1, descending=True).values
                cached = {**batch, "topk_ids": torch.randint(0, vocab, (n, K), generator=g).to(device),
                          "topk_logprobs": logprobs[:, :K].to(device), "tail_mass": logprobs[:, K].exp().to(device)}
            loss_cfg = DistillLossConfig("fkl", 0.5, 1.0, tail="bucket", chunk_size=args.student_chunk)
            sft_labels = torch.full_like(batch["input_ids"], -100)
            sft_labels[:, 1:] = batch["input_ids"][:, 1:]
            scaler = torch.amp.GradScaler("cuda") if gpu and dtype == torch.float16 else None
            autocast = torch.autocast("cuda", dtype=dtype) if gpu and dtype != torch.float32 else None

            def step() -> None:
                from contextlib import nullcontext

                with autocast or nullcontext():
                    if args.case == "sft":
                        loss = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                       labels=sft_labels).loss
                    else:
                        targets = cached if cached is not None else teacher_targets(teacher, batch, args.teacher_chunk)
                        loss = student_distill_loss(student, targets, loss_cfg)
                if scaler:
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward()
                    opt.step()
                opt.zero_grad(set_to_none=True)

            tokens = args.batch * args.length
            timed(step)
    except torch.cuda.OutOfMemoryError as e:
        return {"case": args.case, "oom": True, "error": str(e).splitlines()[0][:200]}
    peak = torch.cuda.max_memory_allocated() if gpu else peak_rss() - base
    return {"case": args.case, "oom": False, "peak_bytes": peak, "seconds": statistics.median(times), "tokens": tokens}


# ---------------------------------------------------------------- the parent: cases, plan, table


def predictions(args: argparse.Namespace) -> dict[str, dict]:
    """`kdpipe plan`'s prediction for each case, for exactly these shapes."""
    from dataclasses import replace

    from kdpipe.plan import estimate, hardware

    device = hardware.cpu_device() if args.device == "cpu" else hardware.local_device()
    if args.gpu_memory_gb and args.device != "cpu":
        device = replace(device, memory=int(args.gpu_memory_gb * 1e9))
    w = estimate.Workload(examples=args.batch, mean_length=args.length, targets_per_example=args.length - 1,
                      max_length=args.length, top_k=K, encoding="compact", batch_size=args.batch,
                      teacher_batch_size=args.teacher_batch, max_batch_tokens=args.teacher_batch * args.length,
                      teacher_chunk=args.teacher_chunk, student_chunk=args.student_chunk,
                      teacher_dtype=args.dtype, precision=args.dtype)
    teacher, student = hardware.load_arch(args.teacher, args.layers), hardware.load_arch(args.student, args.layers)
    cache = estimate.cache_teacher_plan(teacher, device, estimate.Workload(**{**w.__dict__, "examples": args.teacher_batch}))
    out = {"cache": cache, "train": estimate.train_plan(student, device, w),
           "online": estimate.online_plan(teacher, student, device, w),
           "sft": estimate.train_plan(student, device, w, "SFT alone", head="hf")}
    return {k: {"peak_bytes": v.peak, "fits": v.fits, "seconds": v.seconds, "device_bytes": v.device_memory,
                "memory": v.memory} for k, v in out.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="Qwen3-4B")
    p.add_argument("--student", default="Qwen3-0.6B")
    p.add_argument("--layers", type=int, default=None, help="layers of both models (default: all; CPU: 2)")
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--batch", type=int, default=None, help="student batch (GPU default 8, CPU 1)")
    p.add_argument("--teacher-batch", type=int, default=None, help="cache-teacher rows (GPU default 32, CPU: --batch)")
    p.add_argument("--teacher-chunk", type=int, default=2048, help="cache-teacher --chunk-size")
    p.add_argument("--student-chunk", type=int, default=1024, help="train-student --chunk-size")
    p.add_argument("--gpu-memory-gb", type=float, default=None, help="GPU: cap the process (16: a T4)")
    p.add_argument("--dtype", choices=["auto", "fp16", "bf16", "fp32"], default="auto",
                   help="teacher dtype and student mixed precision (auto: fp16 below compute capability 8 and "
                        "with --gpu-memory-gb, bf16 from 8, fp32 on CPU)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per case (after one warm-up)")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--case", help=argparse.SUPPRESS)  # the child's case
    p.add_argument("--device", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        print(json.dumps(run_case(args)))
        return
    import torch

    from kdpipe.precision import auto_precision, device_capability

    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cpu = args.device == "cpu"
    args.layers = args.layers or (2 if cpu else None)
    args.batch = args.batch or (1 if cpu else 8)
    args.teacher_batch = args.teacher_batch or (args.batch if cpu else 32)
    if args.dtype == "auto":
        args.dtype = "fp16" if args.gpu_memory_gb and not cpu else auto_precision(device_capability())
    predicted = predictions(args)
    results = {}
    for case in args.cases.split(","):
        cmd = [sys.executable, __file__, "--case", case, "--device", args.device] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
            if v is not None and k not in ("case", "cases", "device")]
        print(f"running {case} ...", file=sys.stderr, flush=True)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            results[case] = {"case": case, "oom": None, "error": done.stderr.strip().splitlines()[-1][:200]}
        else:
            results[case] = json.loads(done.stdout.strip().splitlines()[-1])
    where = (f"CPU ({os.cpu_count()} cores), peak RSS" if cpu else
             f"{torch.cuda.get_device_name(0)}, max_memory_allocated"
             + (f", capped at {args.gpu_memory_gb:g} GB" if args.gpu_memory_gb else ""))
    print(f"{args.teacher} -> {args.student}, {args.layers or 'all'} layers, {args.dtype}; student batch {args.batch} x "
          f"{args.length}, teacher batch {args.teacher_batch} x {args.length}, k = {K}; {where}")
    print(f"{'case':8}{'measured':>12}{'predicted':>12}{'pred/meas':>10}{'fits (plan)':>13}{'step s':>9}"
          f"{'pred s':>9}{'tokens/s':>11}")
    for case, r in results.items():
        pr = predicted[case]
        fits = "yes" if pr["fits"] else "no"
        if r.get("oom") or r.get("error"):
            status = "OOM" if r.get("oom") else "error"
            print(f"{case:8}{status:>12}{pr['peak_bytes'] / 2**30:11.2f}G{'':>10}{fits:>13}   {r.get('error', '')}")
            continue
        print(f"{case:8}{r['peak_bytes'] / 2**30:11.2f}G{pr['peak_bytes'] / 2**30:11.2f}G"
              f"{pr['peak_bytes'] / r['peak_bytes']:10.2f}{fits:>13}{r['seconds']:9.2f}{pr['seconds']:9.2f}"
              f"{r['tokens'] / r['seconds']:11,.0f}")
    print("(tokens/s: target tokens for cache, input tokens for the training steps; predicted peaks leave out the "
          "CUDA context / Python runtime)")


if __name__ == "__main__":
    main()
