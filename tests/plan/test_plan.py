"""`kdpipe plan`: parameter and optimizer bytes exact against real models built from the same configs,
the activation model against what autograd really keeps, published totals, the cache-size model and
clear errors from the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import expect_error, kdpipe

from kdpipe.plan import estimate, hardware, report

SHIPPED = sorted(p.stem for p in hardware.ARCH_DIR.glob("*.json"))

# The model cards' published totals and non-embedding counts (Qwen3, Qwen2.5), the hub pages' totals
# (DeepSeek-R1-Distill-Qwen, GPT-2 medium), in the precision they are published in (billions).
PUBLISHED = {
    "Qwen3-0.6B": ("0.6", "0.44"), "Qwen3-1.7B": ("1.7", "1.4"), "Qwen3-4B": ("4.0", "3.6"),
    "Qwen3-8B": ("8.2", "6.95"), "Qwen2.5-0.5B": ("0.49", "0.36"), "Qwen2.5-1.5B": ("1.54", "1.31"),
    "Qwen2.5-3B": ("3.09", "2.77"), "Qwen2.5-7B": ("7.61", "6.53"), "DeepSeek-R1-Distill-Qwen-1.5B": ("1.78", None),
    "DeepSeek-R1-Distill-Qwen-7B": ("7.62", None), "gpt2-medium": ("0.355", None),
}


def hf_config(name: str, **changes):
    from transformers import AutoConfig

    raw = json.loads((hardware.ARCH_DIR / f"{name}.json").read_text())
    raw = {k: v for k, v in raw.items() if not k.startswith("_") and k != "torch_dtype"} | changes
    return AutoConfig.for_model(raw.pop("model_type"), **raw)


@pytest.mark.parametrize("name", SHIPPED)
def test_parameter_count_equals_the_model_built_from_the_config(name: str) -> None:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # the real architecture, no memory
        model = AutoModelForCausalLM.from_config(hf_config(name))
    arch = hardware.load_arch(name)
    assert arch.params() == sum(p.numel() for p in model.parameters())  # tied weights counted once
    assert arch.tied == (model.get_output_embeddings().weight is model.get_input_embeddings().weight)
    assert arch.vocab == model.config.vocab_size


def published(count: int, figure: str) -> bool:
    """`count` shows as `figure` billions, rounded or truncated to its digits (model cards use both)."""
    digits = len(figure.split(".")[1])
    return figure in (f"{count / 1e9:.{digits}f}", f"{math.floor(count / 1e9 * 10**digits) / 10**digits:.{digits}f}")


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_shipped_configs_match_the_published_totals(name: str) -> None:
    arch = hardware.load_arch(name)
    total, non_embedding = PUBLISHED[name]
    assert published(arch.params(), total), arch.params()
    if non_embedding:
        assert published(arch.params() - arch.embedding_params() - arch.head_params(), non_embedding)
    hub_id = json.loads((hardware.ARCH_DIR / f"{name}.json").read_text())["_name_or_path"]
    assert hardware.load_arch(hub_id).params() == hardware.load_arch(name.lower()).params() == arch.params()


@pytest.mark.parametrize("name", ["Qwen3-0.6B", "Qwen2.5-0.5B", "gpt2-medium"])
def test_lora_and_optimizer_bytes_equal_a_real_lora_models(name: str) -> None:
    """A small model from the same config family: LoRA parameters, and AdamW's state after a real step, exactly."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from kdpipe.train.lora import lora_targets

    small = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
    if name.startswith("gpt2"):
        small = {"vocab_size": 256, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 32}
    cfg = hf_config(name, **small)
    folder_config = json.loads((hardware.ARCH_DIR / f"{name}.json").read_text()) | small
    arch = hardware._from_config(name, folder_config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    assert arch.params() == sum(p.numel() for p in model.parameters())
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=lora_targets(model), task_type="CAUSAL_LM"))
    trainable = [p for p in lora.parameters() if p.requires_grad]
    assert arch.lora_params(4) == sum(p.numel() for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    ids = torch.randint(0, 256, (2, 8))
    lora(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    state_bytes = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if t.dim())
    grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in trainable)
    w = estimate.Workload(examples=1, mean_length=8, targets_per_example=7, max_length=8, lora_r=4)
    parts = estimate.train_memory(arch, w, "fp32", 1, "fused")
    assert parts["gradients + AdamW"] == grad_bytes + state_bytes
    assert parts["LoRA weights (fp32)"] == sum(p.numel() * p.element_size() for p in trainable)
    assert parts["weights"] == sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)


def saved_bytes(model, inputs, cfg) -> int:
    """Bytes of the activations autograd keeps for backward (unique storages, parameters excluded)."""
    from kdpipe.train.trainer import student_distill_loss

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        student_distill_loss(model, inputs, cfg)
    return sum(seen.values())


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("name", ["Qwen3-0.6B", "Qwen2.5-0.5B"])
def test_activation_estimate_within_25_percent_of_what_autograd_keeps(name: str, lora: bool) -> None:
    """One block at the real width (a smaller vocabulary: the head's scratch is not an activation), fp32 on CPU."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from kdpipe.losses import DistillLossConfig
    from kdpipe.train.lora import lora_targets

    vocab, batch, length, k = 1024, 2, 48, 8
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config(name, num_hidden_layers=1, vocab_size=vocab), dtype=torch.float32)
    model.config.use_cache = False
    if lora:
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                 target_modules=lora_targets(model), task_type="CAUSAL_LM"))
    model.train()
    ids = torch.randint(0, vocab, (batch, length))
    rows = torch.arange(batch).repeat_interleave(length - 1)
    cols = torch.arange(length - 1).repeat(batch)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "target_rows": rows, "target_cols": cols,
              "labels": ids[rows, cols + 1], "topk_ids": torch.randint(0, vocab, (len(rows), k)),
              "topk_logprobs": torch.log_softmax(torch.randn(len(rows), k), -1) - 0.1,
              "tail_mass": torch.full((len(rows),), 0.05)}
    measured = saved_bytes(model, inputs, DistillLossConfig("fkl", 0.5, 1.0))
    predicted = estimate.train_activation_bytes(hardware.load_arch(name, layers=1), batch * length, len(rows), lora, "fp32")
    assert abs(predicted / measured - 1) <= 0.25, (predicted, measured)


def test_cache_size_model_reproduces_the_measured_rates() -> None:
    """The fit behind `cache_bytes` against bench_encoding's measured bytes per target token (README)."""
    measured = {("plain", "topk", 8): 42.0, ("plain", "topk", 32): 125.7, ("plain", "topk", 64): 236.2,
                ("compact", "topk", 8): 26.7, ("compact", "topk", 32): 84.2, ("compact", "topk", 64): 157.9,
                ("compact16", "topk", 32): 100.4, ("compact", "sampled", 6): 12.4,
                ("compact", "sampled", 12): 17.8, ("compact", "sampled", 24): 25.6}
    for (encoding, mode, n), rate in measured.items():
        predicted = estimate.cache_bytes(1e6, 1e6, encoding, mode, k=n, samples=n) / 1e6
        assert abs(predicted / rate - 1) < 0.05, (encoding, mode, n, predicted, rate)
    # completions only: every non-distilled token still stores its input id
    assert estimate.cache_bytes(10, 110, "compact", "topk", 32) == int(10 * (8.0 + 2.343 * 32) + 100 * estimate.INPUT_ID_BYTES)


def test_defaults_are_the_stages_defaults() -> None:
    from kdpipe.stages.cache_teacher import CacheTeacherConfig
    from kdpipe.stages.train_student import TrainStudentConfig

    w, c, t = estimate.Workload(1, 1, 1), CacheTeacherConfig(), TrainStudentConfig()
    assert (w.teacher_batch_size, w.max_batch_tokens, w.teacher_chunk) == (c.batch_size, c.max_batch_tokens, c.chunk_size)
    assert (w.student_chunk, w.lora_r, w.batch_size, w.lora) == (t.chunk_size, t.lora_r, t.batch_size, t.lora)
    assert w.vllm_gpu_memory_utilization == c.vllm_gpu_memory_utilization


def test_t4_plan_json(workdir: Path) -> None:
    result = kdpipe("plan", "--teacher", "Qwen3-4B", "--student", "Qwen3-0.6B", "--gpu", "t4", "--dataset", "imdb",
                    "--mean-length", "300", "--targets-per-example", "2", "--json")
    p = json.loads(result.output)
    stages = {s["stage"]: s for s in p["stages"]}
    assert list(stages) == ["cache-teacher", "train-student", "online KD (both resident)", "SFT alone (finetune)",
                            "teacher fine-tune (finetune)"]
    assert p["device"]["capability"] == [7, 5] and stages["cache-teacher"]["dtype"] == "fp16"
    assert stages["train-student"]["dtype"] == "fp16"
    assert p["models"]["teacher"]["params"] == hardware.load_arch("Qwen3-4B").params()
    assert stages["cache-teacher"]["memory"]["weights"] == hardware.load_arch("Qwen3-4B").params() * 2
    for s in stages.values():
        assert s["peak_bytes"] == sum(s["memory"].values())
        assert s["fits"] == (s["peak_bytes"] <= s["device_bytes"])
    assert stages["online KD (both resident)"]["memory"]["teacher weights"] == stages["cache-teacher"]["memory"]["weights"]
    for s in stages.values():  # padded rows never train faster than packed ones (online KD: the teacher in both)
        assert "padded seconds" not in s or s["padded seconds"] >= s["seconds"], s["stage"]
    online, alone = stages["online KD (both resident)"], stages["train-student"]
    assert online["padded seconds"] - alone["padded seconds"] == pytest.approx(online["seconds"] - alone["seconds"])
    assert p["workload"]["examples"] == 25_000 and p["workload"]["targets"] == 50_000
    text = kdpipe("plan", "--teacher", "Qwen3-4B", "--student", "Qwen3-0.6B", "--gpu", "t4", "--limit", "100").output
    assert "cache-teacher [Qwen3-4B, fp16, batch 32 x 512]" in text and "largest batch that fits" in text


def test_packed_time_follows_the_mean_length_padded_the_max_length() -> None:
    arch, gpu = hardware.load_arch("Qwen3-0.6B"), hardware.get_device("t4")
    short = estimate.train_plan(arch, gpu, estimate.Workload(examples=1000, mean_length=300, targets_per_example=299))
    full = estimate.train_plan(arch, gpu, estimate.Workload(examples=1000, mean_length=512, targets_per_example=299))
    assert short.extra["steps per epoch"] == full.extra["steps per epoch"] == 125  # batches of 8 examples either way
    assert short.extra["padded seconds"] == full.extra["padded seconds"] == full.seconds  # padded: 512 per row
    assert 300 / 512 < short.seconds / full.seconds < 0.75  # packed: the mean length (the head's share stays)


def test_measure_runs_real_steps_and_writes_nothing(workdir: Path, tiny_model_dir: Path) -> None:
    out = kdpipe("plan", "--teacher", tiny_model_dir, "--student", tiny_model_dir, "--gpu", "cpu", "--limit", 64,
                 "--mean-length", 40, "--max-length", 64, "--measure", "--json").output
    out = out[out.index('{\n  "device"'):]  # after transformers' loading bars (stderr, mixed in by the runner)
    stages = {s["stage"]: s for s in json.loads(out)["stages"]}
    measured = [name for name, s in stages.items() if "measured_step_seconds" in s]
    assert measured == ["cache-teacher", "train-student", "SFT alone (finetune)", "teacher fine-tune (finetune)"]
    for name in measured:
        s = stages[name]
        steps = 2 if name == "cache-teacher" else 8  # 64 examples: 32 rows per teacher batch, 8 per student step
        assert s["measured_steps"] == 3 and s["measured_step_seconds"] > 0
        assert s["measured_seconds"] == pytest.approx(s["measured_step_seconds"] * steps)
        assert s["calibration"] == pytest.approx(s["measured_seconds"] / s["seconds"])
    assert list(workdir.iterdir()) == []
    text = kdpipe("plan", "--student", tiny_model_dir, "--gpu", "cpu", "--limit", 16, "--mean-length", 40,
                  "--max-length", 64, "--measure").output
    assert "measured: " in text and "x the estimate)" in text and "--batching padded: up to" in text


def test_largest_batch_is_the_largest_that_fits() -> None:
    arch, gpu = hardware.load_arch("Qwen3-0.6B"), hardware.get_device("t4")
    w = estimate.Workload(examples=100, mean_length=512, targets_per_example=511)
    s = estimate.train_plan(arch, gpu, w)
    fits = lambda b: sum(estimate.train_memory(arch, w, "fp16", b, "fused").values()) <= gpu.memory  # noqa: E731
    assert s.largest_batch >= 1 and fits(s.largest_batch) and not fits(s.largest_batch + 1)


def test_a_local_folder_and_the_layers_override(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text((hardware.ARCH_DIR / "Qwen3-0.6B.json").read_text())
    assert hardware.load_arch(str(folder)).params() == hardware.load_arch("Qwen3-0.6B").params()
    two = hardware.load_arch(str(folder), layers=2)
    assert two.params() == hardware.load_arch("Qwen3-0.6B").params() - 26 * two.block_params()


@pytest.mark.parametrize("args,message", [
    (["--student", "Qwen3-0.6B", "--gpu", "k80", "--limit", "10"], "--gpu k80: unknown GPU; known: t4, l4"),
    (["--student", "Qwen3-0.6B", "--gpu-memory-gb", "0", "--limit", "10"], "--gpu-memory-gb must be positive, not 0"),
    (["--student", "Qwen3-0.6B", "--gpu", "t4", "--gpu-memory-gb", "-16", "--limit", "10"], "must be positive, not -16"),
    (["--student", "no-such-model", "--gpu", "t4", "--limit", "10"], "no model config for no-such-model"),
    (["--student", "{folder}", "--gpu", "t4", "--limit", "10"], "has no config.json"),
    (["--student", "Qwen3-0.6B", "--gpu", "t4"], "how much data? pass --dataset, --limit N"),
    (["--student", "Qwen3-0.6B", "--gpu", "t4", "--dataset", "no/such-data"], "--dataset no/such-data: not a local file"),
    (["--student", "Qwen3-0.6B", "--gpu", "t4", "--limit", "0"], "--limit must be at least 1, not 0"),
    (["--gpu", "t4", "--limit", "10"], "pass --teacher and/or --student"),
    (["--student", "Qwen3-0.6B", "--gpu", "t4", "--limit", "5", "--mean-length", "900"], "--mean-length must be in"),
])
def test_bad_input_is_a_clear_error(args: list[str], message: str, tmp_path: Path) -> None:
    args = [a.replace("{folder}", str(tmp_path)) for a in args]
    result = kdpipe("plan", *args, ok=False)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_plan_imports_no_torch() -> None:
    code = ("import sys; from kdpipe.plan import estimate, hardware, report; p = estimate.make_plan('Qwen3-4B', 'Qwen3-0.6B', hardware.get_device('t4'), "
            "estimate.Workload(100, 300, 2)); print(report.format_plan(p)[:40]); assert 'torch' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1",
                         "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("device: Tesla T4")


def test_dry_run_shows_each_steps_plan(workdir: Path, tiny_model_dir: Path) -> None:
    (workdir / "exp.yaml").write_text(
        f"name: exp\ncache:\n  model: {tiny_model_dir}\n  dataset: kdpipe:arithmetic\n  max_length: 64\n"
        f"train:\n  model: {tiny_model_dir}\n  batch_size: 4\n"
        "baseline:\n  model: '@train'\n  dataset: kdpipe:arithmetic\n")
    out = kdpipe("run", "exp.yaml", "--dry-run").output
    lines = [line.strip() for line in out.splitlines() if line.strip().startswith("plan:")]
    arch = hardware.load_arch(str(tiny_model_dir))
    assert len(lines) == 3, out
    assert lines[0].startswith("plan: cache-teacher: peak") and f"weights {report._size(arch.params() * 4)}" in lines[0]
    assert lines[1].startswith("plan: train-student: peak") and "(fits; largest batch" in lines[1]
    assert lines[2] == "plan: once runs/exp/train exists (an earlier step writes it)"
    assert not (workdir / "runs").exists() and not (workdir / "cache").exists()


def test_vllm_takes_its_share_and_the_kv_cache_is_the_rest() -> None:
    arch, gpu = hardware.load_arch("Qwen3-4B"), hardware.get_device("t4")
    w = estimate.Workload(examples=10, mean_length=300, targets_per_example=2, backend="vllm", vllm_max_num_batched_tokens=2048)
    s = estimate.cache_teacher_plan(arch, gpu, w)
    assert s.fits and s.peak == int(gpu.memory * 0.9)
    assert s.memory["prompt log-probs (fp32)"] == 2048 * arch.vocab * 8
    per_sequence = 2 * arch.layers * arch.kv_dim * 2 * 512  # K and V, fp16, 512 tokens
    assert s.largest_batch == s.memory["vLLM KV cache"] // per_sequence
    crowded = estimate.cache_teacher_plan(arch, gpu, estimate.Workload(**{**w.__dict__, "vllm_max_num_batched_tokens": 8192}))
    assert not crowded.fits and crowded.largest_batch == 0
    result = kdpipe("plan", "--teacher", "Qwen3-4B", "--gpu", "t4", "--limit", "5", "--backend", "vllm",
                    "--vllm-gpu-memory-utilization", "0", ok=False)
    assert result.exit_code == 2 and "--vllm-gpu-memory-utilization must be in (0, 1], not 0" in result.output


@pytest.mark.parametrize(("key", "value", "says"), [
    ("num_hidden_layers", -2, "num_hidden_layers / n_layer is -2"),
    ("vocab_size", 0, "vocab_size is 0"),
    ("hidden_size", "576", "hidden_size / n_embd is '576'"),
    ("num_attention_heads", 0, "num_attention_heads / n_head is 0"),
    ("num_key_value_heads", 5, "num_key_value_heads 5 does not divide num_attention_heads 16"),
    ("intermediate_size", 3.5, "intermediate_size / n_inner is 3.5"),
])
def test_plan_refuses_a_config_json_with_impossible_sizes(tmp_path: Path, key: str, value, says: str) -> None:
    """Issue 29 item 9: `num_hidden_layers: -2` printed "-49,472 parameters ... fits" with rc 0; a string
    hidden_size was a TypeError. Every size plan reads is checked, the message names the file and the key."""
    folder = tmp_path / "teacher"
    folder.mkdir()
    config = json.loads((hardware.ARCH_DIR / "Qwen3-0.6B.json").read_text()) | {key: value}
    (folder / "config.json").write_text(json.dumps(config))
    out = expect_error("plan", "--teacher", folder, "--student", "Qwen3-0.6B", "--gpu", "t4", "--limit", "100",
                       match=f"{folder / 'config.json'}: {says}")
    assert "fits" not in out.output
