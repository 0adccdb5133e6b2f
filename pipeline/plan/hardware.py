"""What `kdpipe plan` plans for: model shapes and devices.

`Arch` is a decoder-only LM's shape as far as memory and FLOPs care, read from the configs shipped in
`archs/` (offline) or a hub/local `config.json`; `Gpu` is a device's allocatable memory, peak FLOP/s
and bandwidth, from a table of the usual cards (T4 to H200), this machine's CUDA device, or its CPU.
The memory and time models over them are in `kdpipe.plan.estimate`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kdpipe.errors import KdpipeError

ARCH_DIR = Path(__file__).with_name("archs")

# ---------------------------------------------------------------- architecture


@dataclass(frozen=True)
class Arch:
    """A decoder-only LM's shape, as far as memory and FLOPs care."""

    name: str
    model_type: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: an RMSNorm over each head's q and k
    positions: int = 0  # learned position embeddings (GPT-2); 0 for RoPE models
    gpt2: bool = False  # GPT-2's block: LayerNorms with bias, fused c_attn, 2-matrix GELU MLP

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> list[tuple[str, int, int, bool]]:
        """Each block's weight matrices: (name, in, out, bias) — what LoRA adapts."""
        h, q, kv, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        if self.gpt2:
            return [("c_attn", h, 3 * h, True), ("attn.c_proj", h, h, True), ("c_fc", h, i, True),
                    ("mlp.c_proj", i, h, True)]
        return [("q_proj", h, q, self.qkv_bias), ("k_proj", h, kv, self.qkv_bias),
                ("v_proj", h, kv, self.qkv_bias), ("o_proj", q, h, self.o_bias),
                ("gate_proj", h, i, self.mlp_bias), ("up_proj", h, i, self.mlp_bias),
                ("down_proj", i, h, self.mlp_bias)]

    def block_params(self) -> int:
        norms = 4 * self.hidden if self.gpt2 else 2 * self.hidden + (2 * self.head_dim if self.qk_norm else 0)
        return norms + sum(n_in * n_out + (n_out if bias else 0) for _, n_in, n_out, bias in self.linears())

    def embedding_params(self) -> int:
        return self.vocab * self.hidden + self.positions * self.hidden

    def head_params(self) -> int:
        return 0 if self.tied else self.vocab * self.hidden

    def params(self) -> int:
        """Every parameter, counted once (a tied head shares the embedding matrix)."""
        final_norm = 2 * self.hidden if self.gpt2 else self.hidden
        return self.embedding_params() + self.layers * self.block_params() + final_norm + self.head_params()

    def lora_params(self, r: int) -> int:
        """Parameters of rank-r LoRA adapters on every block matrix (kdpipe's default targets)."""
        return self.layers * sum(r * (n_in + n_out) for _, n_in, n_out, _ in self.linears())

    def matmul_params(self) -> int:
        """Weights a token's forward multiplies through, the LM head excluded (FLOPs = 2 x this)."""
        return self.layers * sum(n_in * n_out for _, n_in, n_out, _ in self.linears())

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.layers * self.kv_dim * dtype_bytes


# config.json keys `kdpipe plan` reads as sizes, by the Arch field they fill (GPT-2's names after the slash)
_SIZE_KEYS = {"vocab": "vocab_size", "hidden": "hidden_size / n_embd",
              "layers": "num_hidden_layers / n_layer", "heads": "num_attention_heads / n_head",
              "kv_heads": "num_key_value_heads", "head_dim": "head_dim",
              "intermediate": "intermediate_size / n_inner", "positions": "n_positions"}


def _checked(arch: Arch, where: str) -> Arch:
    """The sizes a plan multiplies must be whole positive numbers: a config.json saying
    `num_hidden_layers: -2` or `hidden_size: "576"` would otherwise print a negative plan that "fits"."""
    for field, key in _SIZE_KEYS.items():
        value = getattr(arch, field)
        if field == "positions" and value == 0 and not arch.gpt2:
            continue  # RoPE models have no learned positions
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise KdpipeError(f"{where}: {key} is {value!r}; kdpipe plan needs a whole number of at least 1 "
                              "(fix the model's config.json)")
    if arch.kv_heads > arch.heads or arch.heads % arch.kv_heads:
        raise KdpipeError(f"{where}: num_key_value_heads {arch.kv_heads} does not divide num_attention_heads "
                          f"{arch.heads} (fix the model's config.json)")
    if not isinstance(arch.tied, bool):
        raise KdpipeError(f"{where}: tie_word_embeddings is {arch.tied!r}, not true or false")
    return arch


def _from_config(name: str, c: dict[str, Any], where: str | None = None) -> Arch:
    """An `Arch` from config.json's keys (GPT-2's n_embd/n_layer/... included), every size checked."""
    where = where or name
    if not isinstance(c, dict):
        raise KdpipeError(f"{where}: config.json holds {type(c).__name__}, not an object of model settings")
    return _checked(_arch_of(name, c), where)


def _arch_of(name: str, c: dict[str, Any]) -> Arch:
    model_type = c.get("model_type", "")
    try:
        if model_type == "gpt2":
            hidden = c["n_embd"]
            return Arch(name, model_type, c["vocab_size"], hidden, c["n_layer"], c["n_head"], c["n_head"],
                        hidden // c["n_head"], c.get("n_inner") or 4 * hidden,
                        c.get("tie_word_embeddings", True),
                        positions=c["n_positions"], gpt2=True)
        hidden, heads = c["hidden_size"], c["num_attention_heads"]
        bias = bool(c.get("attention_bias", model_type == "qwen2"))
        return Arch(name, model_type, c["vocab_size"], hidden, c["num_hidden_layers"], heads,
                    c.get("num_key_value_heads") or heads, c.get("head_dim") or hidden // heads,
                    c["intermediate_size"], bool(c.get("tie_word_embeddings", False)),
                    qkv_bias=bias, o_bias=bias and model_type != "qwen2",
                    mlp_bias=bool(c.get("mlp_bias", False)),
                    qk_norm=model_type in ("qwen3", "qwen3_moe", "olmo2"))
    except KeyError as e:
        raise KdpipeError(f"{name}: config.json has no {e.args[0]} (model type {model_type or 'unknown'}); "
                          "kdpipe plan knows decoder-only Llama/Qwen-style and GPT-2 configs") from None
    except (TypeError, ZeroDivisionError) as e:  # hidden_size "576", num_attention_heads 0 ...
        raise KdpipeError(f"{name}: config.json has a size that is not a positive whole number ({e}); "
                          "fix the model's config.json") from None


def shipped_configs() -> dict[str, Path]:
    """The published configs shipped with kdpipe, by lower-case short name and hub id."""
    out: dict[str, Path] = {}
    for path in sorted(ARCH_DIR.glob("*.json")):
        hub_id = json.loads(path.read_text())["_name_or_path"]
        out[path.stem.lower()] = out[hub_id.lower()] = path
    return out


def load_arch(name: str, layers: int | None = None) -> Arch:
    """The architecture of `name`: a folder or config.json, a shipped short name or hub id, the hub cache."""
    local = Path(name).expanduser()
    path: Path | None = None
    if local.is_dir() and (local / "config.json").is_file():
        path = local / "config.json"
    elif local.is_file() and local.suffix == ".json":
        path = local
    elif local.exists():
        raise KdpipeError(f"{name} has no config.json: kdpipe plan needs the model's config (a model folder, "
                          "a config.json, a hub id, or a known short name)")
    else:
        path = shipped_configs().get(name.lower()) or _hub_config(name)
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise KdpipeError(f"cannot read {path}: {e}") from None
    arch = _from_config(name, config, str(path))
    if layers is not None:
        if layers < 1:
            raise KdpipeError(f"--layers must be at least 1, not {layers}")
        arch = replace(arch, layers=layers)
    return arch


def _hub_config(name: str) -> Path:
    known = sorted({p.stem for p in ARCH_DIR.glob("*.json")})
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise KdpipeError(f"no model config for {name}: not a folder with config.json, not a hub id, "
                          "and not one "
                          f"of the shipped configs ({', '.join(known)})")
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(name, "config.json"))
    except Exception as e:  # offline and not cached, unknown repo, no network ...
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise KdpipeError(f"no model config for {name}: {reason}. Pass a local model folder, "
                          "or one of the shipped "
                          f"configs: {', '.join(known)}") from None


# ---------------------------------------------------------------- devices


@dataclass(frozen=True)
class Gpu:
    name: str
    memory: int  # bytes the process can allocate
    flops: float  # peak dense FLOP/s in the stage's precision (tensor cores, fp16/bf16)
    bandwidth: float  # memory bandwidth, bytes/s
    capability: tuple[int, int] | None  # None: CPU
    fp32_flops: float = 0.0  # peak fp32 FLOP/s (no tensor cores), used when the precision is fp32

    def peak(self, precision: str) -> float:
        return self.fp32_flops if precision == "fp32" and self.fp32_flops else self.flops


def _gb(x: float) -> int:
    return int(x * 1e9)


# Memory: what torch can allocate (the card's memory less ECC and the CUDA context, ~0.5 GB).
# FLOP/s: the datasheets' dense fp16/bf16 tensor-core figures (no sparsity), and fp32.
GPUS: dict[str, Gpu] = {
    "t4": Gpu("Tesla T4 (16 GB)", _gb(15.3), 65e12, 320e9, (7, 5), 8.1e12),
    "l4": Gpu("L4 (24 GB)", _gb(23.3), 121e12, 300e9, (8, 9), 30.3e12),
    "a10g": Gpu("A10G (24 GB)", _gb(23.3), 70e12, 600e9, (8, 6), 31.2e12),
    "4090": Gpu("RTX 4090 (24 GB)", _gb(24.7), 165e12, 1008e9, (8, 9), 82.6e12),
    "a100-40": Gpu("A100 40 GB", _gb(41.9), 312e12, 1555e9, (8, 0), 19.5e12),
    "a100-80": Gpu("A100 80 GB", _gb(84.5), 312e12, 2039e9, (8, 0), 19.5e12),
    "h100": Gpu("H100 SXM 80 GB", _gb(84.5), 989e12, 3350e9, (9, 0), 67e12),
    "h200": Gpu("H200 141 GB", _gb(149.9), 989e12, 4800e9, (9, 0), 67e12),
}


def cpu_device(memory: int | None = None) -> Gpu:
    """This machine's CPU: its RAM, and a rough peak of 32 fp32 FLOP per core-cycle at 2.5 GHz (AVX2 FMA)."""
    cores = os.cpu_count() or 1
    ram = memory or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    flops = cores * 2.5e9 * 32
    return Gpu(f"CPU ({cores} cores)", ram, flops, 20e9, None, flops)


def get_device(name: str | None, memory_gb: float | None = None) -> Gpu:
    """A GPU from the table (or the CPU), its memory replaced by `memory_gb` when given."""
    if memory_gb is not None and not memory_gb > 0:
        raise KdpipeError(f"--gpu-memory-gb must be positive, not {memory_gb:g}")
    if name is None:
        if memory_gb is None:
            raise KdpipeError(f"pass --gpu ({', '.join([*GPUS, 'cpu'])}) or --gpu-memory-gb")
        name = "t4"  # the memory given, on T4-class compute
    key = name.lower()
    if key == "cpu":
        return cpu_device(None if memory_gb is None else _gb(memory_gb))
    if key not in GPUS:
        raise KdpipeError(f"--gpu {name}: unknown GPU; known: {', '.join([*GPUS, 'cpu'])} "
                          "(or give its memory with --gpu-memory-gb)")
    gpu = GPUS[key]
    return gpu if memory_gb is None else replace(gpu, name=f"{gpu.name}, capped at {memory_gb:g} GB",
                                                 memory=_gb(memory_gb))


def local_device() -> Gpu:
    """This machine's first CUDA device (from the table when its name matches), else its CPU."""
    import torch

    if not torch.cuda.is_available():
        return cpu_device()
    props = torch.cuda.get_device_properties(0)
    name = props.name.lower().replace(" ", "")
    keys = {"t4": "t4", "l4": "l4", "a10g": "a10g", "4090": "4090", "h200": "h200", "h100": "h100",
            "a100": "a100-80" if props.total_memory > 50e9 else "a100-40"}
    known = next((GPUS[k] for key, k in keys.items() if key in name), GPUS["t4"])
    return replace(known, name=props.name, memory=props.total_memory,
                   capability=tuple(torch.cuda.get_device_capability(0)))  # type: ignore[arg-type]
