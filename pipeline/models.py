"""Model and tokenizer loading (hub ids, local paths, GGUF files and the short names people type), and
reaching the causal LM, its last hidden states and its LM head through DDP / accelerate / peft wrappers.

Every stage loads through `load_model`, `load_tokenizer` and `load_model_config` here: a ``.gguf`` file (or a
folder whose only checkpoint is one) goes through transformers' GGUF support (``gguf_file=``),
dequantized, and `source_record` names the file and its sha256 for manifests and run records."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdpipe.errors import KdpipeError, first_line

DTYPES = {"auto": "auto", "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

_QWEN25 = ("0.5b", "1.5b", "3b", "7b", "14b", "32b", "72b")
_SHORT = {
    **{f"qwen3-{s}": f"Qwen/Qwen3-{s.upper()}" for s in ("0.6b", "1.7b", "4b", "8b", "14b", "32b")},
    **{f"qwen2.5-{s}": f"Qwen/Qwen2.5-{s.upper()}" for s in _QWEN25},
    **{f"qwen2.5-{s}-instruct": f"Qwen/Qwen2.5-{s.upper()}-Instruct" for s in _QWEN25},
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
}


def resolve_model_name(name: str) -> str:
    """A local path as it is; ``Qwen3-4B`` -> ``Qwen/Qwen3-4B``; other hub ids unchanged."""
    if Path(name).expanduser().exists():
        return str(Path(name).expanduser())
    short = _SHORT.get(name.lower())
    if short:
        return short
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or re.search(r"[\\]", name):
        raise KdpipeError(f"model path {name} does not exist")
    return name


@dataclass(frozen=True)
class ModelSource:
    """Where transformers loads a model from: `path` (a folder or hub id) and, for a GGUF checkpoint,
    the file's name inside that folder."""

    path: str
    gguf_file: str | None = None

    def kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}

    @property
    def file(self) -> Path | None:
        return Path(self.path) / self.gguf_file if self.gguf_file else None


GGUF_MAGIC = b"GGUF"


def model_source(name: str) -> ModelSource:
    """`name` resolved; a ``.gguf`` file, or a folder without config.json holding exactly one, as a GGUF
    source (checked to be one, with the packages it needs)."""
    resolved = resolve_model_name(name)
    path = Path(resolved)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _gguf_source(name, path)
    if path.is_dir() and not (path / "config.json").is_file():
        found = sorted(path.glob("*.gguf"))
        if len(found) > 1:
            raise KdpipeError(f"model folder {name} holds {len(found)} GGUF files ("
                              f"{', '.join(f.name for f in found)}); pass the one to load as the path of "
                              "the file itself")
        if found:
            return _gguf_source(name, found[0])
    if path.is_file():
        raise KdpipeError(f"model {name} is a file but not a GGUF checkpoint (*.gguf); pass a model folder "
                          "(with config.json), a .gguf file or a hub id")
    return ModelSource(resolved)


def _gguf_source(name: str, file: Path) -> ModelSource:
    with open(file, "rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        raise KdpipeError(f"{file} is not a GGUF file (it starts with {head!r}, a GGUF file with "
                          f"{GGUF_MAGIC!r}); pass a real .gguf checkpoint or a model folder")
    from importlib.util import find_spec

    missing = [p for p in ("gguf", "accelerate") if find_spec(p) is None]
    if missing:
        raise KdpipeError(f"loading the GGUF checkpoint {name} needs the package(s) {', '.join(missing)}: "
                          f"pip install {' '.join(missing)}")
    return ModelSource(str(file.parent), file.name)


def source_record(name: str) -> dict[str, Any]:
    """What manifests and run records say of a GGUF checkpoint: the file and its sha256 ({} otherwise)."""
    source = model_source(name)
    if source.file is None:
        return {}
    return {"gguf_file": str(source.file.resolve()), "gguf_sha256": file_sha256(source.file)}


_SHA256: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a file (remembered per path, size and mtime: a 100 MB checkpoint is hashed once)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA256:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _SHA256[key] = digest.hexdigest()
    return _SHA256[key]


def load_tokenizer(name: str, revision: str | None = None) -> Any:
    """The tokenizer, with a pad token (EOS when it has none)."""
    from transformers import AutoTokenizer

    source = model_source(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, revision=revision, **source.kwargs())
    except Exception as e:
        raise KdpipeError(_load_error("tokenizer", name, source.path, e)) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str, dtype: str = "auto", device: str = "auto", revision: str | None = None) -> Any:
    """A causal LM in eval mode on `device` ("auto": CUDA if there is one, else CPU); refused when the
    checkpoint has no LM-head weights: transformers would load it with a random head (only a warning),
    and the teacher would be cached, the generator would generate, the student would train as noise."""
    from transformers import AutoModelForCausalLM

    source = model_source(name)
    target = pick_device(device)  # an unusable device is reported before the weights load
    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype], "revision": revision, "output_loading_info": True,
                              **source.kwargs()}
    if source.gguf_file and dtype == "auto":
        kwargs["dtype"] = torch.float32  # dequantized: "auto" has no stored dtype to keep
    if device == "auto" and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        kwargs["device_map"] = "auto"
    try:
        model, info = AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
    except Exception as e:
        raise KdpipeError(_load_error("model", name, source.path, e)) from None
    head = [k for k in info.get("missing_keys", []) if "lm_head" in k or "embed_out" in k]
    if head:
        raise KdpipeError(f"--model {name} has no LM head ({sorted(head)[0]} is missing from its "
                          "checkpoint): it is a base model without the layer that predicts tokens, so it "
                          "cannot generate or be distilled; pass the causal-LM checkpoint (...ForCausalLM)")
    if source.gguf_file:
        model = _plain_model(model)
    if "device_map" not in kwargs:
        model.to(target)
    return model.eval()


def _plain_model(model: Any) -> Any:
    """A GGUF-loaded model as an ordinary one: transformers keeps its GGUF quantizer attached, which
    refuses `save_pretrained` and makes peft and the Trainer treat the dequantized weights as quantized.
    The same class rebuilt from the config without `quantization_config`, the weights moved over."""
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config = type(model.config).from_dict(config)
    config.dtype = model.dtype
    with torch.device("meta"):
        plain = type(model)(config)
    plain.load_state_dict(model.state_dict(), assign=True, strict=True)
    buffers = dict(model.named_buffers())  # the ones outside the state dict (rotary inv_freq)
    for name, buffer in list(plain.named_buffers()):
        if buffer.is_meta:
            owner, _, leaf = name.rpartition(".")
            plain.get_submodule(owner).register_buffer(leaf, buffers[name], persistent=False)
    plain.tie_weights()
    plain.generation_config = model.generation_config
    return plain


def load_model_config(name: str, revision: str | None = None) -> Any:
    """The model's transformers config (read before the weights, to check what they would refuse later);
    the caller decides what a config that does not load means."""
    from transformers import AutoConfig

    source = model_source(name)
    return AutoConfig.from_pretrained(source.path, revision=revision, **source.kwargs())


def pick_device(device: str = "auto") -> torch.device:
    """The torch device for --device; a KdpipeError for one this machine does not have."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        picked = torch.device(device)
    except (RuntimeError, ValueError):
        raise KdpipeError(f"--device {device} is not a device; use auto, cpu, cuda or cuda:N") from None
    if picked.type == "cuda":
        if not torch.cuda.is_available():
            why = "was built without CUDA" if torch.version.cuda is None else "finds no CUDA GPU"
            raise KdpipeError(f"--device {device}: this torch ({torch.__version__}) {why}; use --device cpu, "
                              "or auto (CUDA when there is a GPU)")
        if picked.index is not None and picked.index >= torch.cuda.device_count():
            raise KdpipeError(f"--device {device}: only {torch.cuda.device_count()} CUDA GPU(s) are visible "
                              f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return picked


# Below this many parameters a model runs on one CPU thread: thread hand-offs on tiny matrices cost more
# than they save (10x on a busy CPU).
SMALL_MODEL = 20_000_000


def small_on_cpu(params: int | None, device: str | torch.device) -> bool:
    """Whether a model of `params` parameters (None: not known, so not small) on `device` is run on one
    thread."""
    return torch.device(device).type == "cpu" and params is not None and params < SMALL_MODEL


def parameter_count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


@contextmanager
def threads_for(params: int | None, device: str | torch.device) -> Iterator[None]:
    """One torch thread inside the block for a small model on the CPU (`small_on_cpu`); the thread count
    is given back after it."""
    threads = torch.get_num_threads()
    if small_on_cpu(params, device):
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def causal_lm(model: Any) -> Any:
    """The transformers causal LM under DDP / accelerate / peft wrappers."""
    while hasattr(model, "module") and not hasattr(model, "config"):
        model = model.module
    if hasattr(model, "get_base_model"):  # peft
        model = model.get_base_model()
    return model


def output_head(model: Any) -> Any:
    """The LM head (hidden state -> vocabulary logits) of a possibly wrapped causal LM."""
    return causal_lm(model).get_output_embeddings()


def head_is_linear(model: Any) -> bool:
    """Whether the logits are the plain LM head of the last hidden state: no soft-capping or scale
    (Gemma 2, Cohere) that only the model's own forward applies."""
    config = causal_lm(model).config
    return all(getattr(config, name, None) is None for name in ("final_logit_softcapping", "logit_scale"))


def last_hidden_states(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The last hidden states [B, L, D] (after the final norm), through the model's own forward.

    Padded rows come with their `attention_mask`; packed rows (`kdpipe.train.packing`) with `position_ids`
    restarting per example and no mask.

    Through the forward, not the body alone, so that wrappers (peft, DDP, FSDP) run their hooks; a
    forward hook on the body catches its output, and ``logits_to_keep=1`` keeps the forward's own LM
    head to one position, since callers apply the head only where they need it.
    """
    import inspect

    lm = causal_lm(model)
    captured: dict[str, Any] = {}

    def hook(_module: Any, _args: Any, output: Any) -> None:
        captured["hidden"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    kwargs: dict[str, Any] = {"input_ids": input_ids, "use_cache": False}
    kwargs.update({k: v for k, v in (("attention_mask", attention_mask), ("position_ids", position_ids))
                   if v is not None})
    if "logits_to_keep" in inspect.signature(lm.forward).parameters:
        kwargs["logits_to_keep"] = 1
    handle = lm.base_model.register_forward_hook(hook)
    try:
        model(**kwargs)
    finally:
        handle.remove()
    return captured["hidden"]


def vocab_hash(tokenizer: Any) -> str:
    """sha256 of the token -> id table (added tokens included): equal hashes, interchangeable ids."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def model_revision(model: Any) -> str | None:
    """The hub commit a model was loaded from, where transformers recorded it."""
    return getattr(model.config, "_commit_hash", None)


def _load_error(what: str, name: str, resolved: str, error: Exception) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
    shown = name if resolved == name else f"{name} ({resolved})"
    reason = first_line(error)
    hint = "offline mode is on (HF_HUB_OFFLINE)" if offline else "check the name or path and your network"
    return f"could not load the {what} {shown}: {reason}. {hint}"
