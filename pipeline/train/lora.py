"""LoRA: which modules to adapt per architecture, adding the adapters (peft), merging them back.

No torch or peft at import: they load when a model is adapted or merged.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kdpipe.cache.storage import Store
from kdpipe.errors import KdpipeError, first_line
from kdpipe.filemode import honour_umask

# LoRA target modules per model type: every linear projection of the blocks (not the LM head).
_DECODER_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_DECODERS = ("llama", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mistral", "mixtral", "gemma", "gemma2",
             "gemma3_text", "olmo", "olmo2", "granite", "smollm3")
LORA_TARGETS: dict[str, list[str]] = {
    **{t: _DECODER_PROJ for t in _DECODERS},
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}


def lora_targets(model: Any) -> list[str] | str:
    """Default LoRA targets for the model's architecture; peft's ``all-linear`` for the others."""
    targets = LORA_TARGETS.get(getattr(model.config, "model_type", ""))
    if targets is None:
        return "all-linear"
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    present = [t for t in targets if t in names]
    return present or "all-linear"


def add_lora(model: Any, cfg: Any) -> Any:
    """`model` with LoRA adapters of `cfg` (a `TrainConfig`: lora_r, lora_alpha, ...) on its projections."""
    from peft import LoraConfig, get_peft_model

    targets = cfg.lora_target_modules or lora_targets(model)
    targets = "all-linear" if targets == ["all-linear"] else targets
    # peft ignores a listed name that matches nothing as long as another one matches: check each
    if isinstance(targets, list):
        modules = dict(model.named_modules())
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in modules)]
        if missing:
            weights = {n.rsplit(".", 1)[-1] for n, m in modules.items()
                       if getattr(m, "weight", None) is not None and m.weight.dim() == 2}
            raise KdpipeError(f"--lora-target-modules: {cfg.model} has no module named {', '.join(missing)}; "
                              f"its weight matrices: {', '.join(sorted(weights))}")
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, lora)
    except ValueError as e:
        raise KdpipeError(f"LoRA setup failed for {cfg.model}: {first_line(e)} "
                          "(check --lora-target-modules)") from None


def merge_lora(adapter: str | Path, output: str | Path, echo: Callable[[str], None] = print) -> Path:
    """Merge a LoRA adapter folder into its base model (peft `merge_and_unload`); save it with its
    tokenizer. Atomic: the model is written into a temp folder beside `output` and renamed, so a killed or
    failed merge leaves no half-written folder (a rerun removes its temp folder); a folder torn by an
    older, non-atomic merge (model config without weights) is recognised and replaced."""
    adapter, output = Path(adapter), Path(output)
    config_file = adapter / "adapter_config.json"
    if not config_file.is_file():
        raise KdpipeError(f"{adapter} is not a LoRA adapter folder (no adapter_config.json)")
    Store.open(str(output)).check_writable("--output")  # before the base model loads
    torn = _torn_model_folder(output)
    if output.exists() and not torn and (not output.is_dir() or any(output.iterdir())):
        raise KdpipeError(f"output folder {output} is not empty; choose another --output")
    from peft import AutoPeftModelForCausalLM

    from kdpipe.models import load_tokenizer

    base = json.loads(config_file.read_text()).get("base_model_name_or_path")
    try:
        model = AutoPeftModelForCausalLM.from_pretrained(str(adapter), dtype="auto")
    except Exception as e:
        raise KdpipeError(f"could not load the adapter {adapter} on its base model {base}: "
                          f"{first_line(e)}") from None
    has_tokenizer = any((adapter / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = load_tokenizer(str(adapter) if has_tokenizer else base)
    merged = model.merge_and_unload()
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.merging")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a merge that was killed
    try:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        honour_umask(tmp)  # transformers writes the weights 0600
    except (OSError, RuntimeError) as e:  # a full disk is a bare RuntimeError from safetensors' writer
        shutil.rmtree(tmp, ignore_errors=True)
        reason = getattr(e, "strerror", None) or first_line(e)
        raise KdpipeError(f"could not write the merged model to {output} ({reason}); nothing was left there: "
                          "free some space and rerun the same command") from None
    if torn:
        echo(f"{output} held a torn merge (a model config without weights, from an interrupted merge-lora); "
             "replacing it")
    if output.exists():
        shutil.rmtree(output) if output.is_dir() else output.unlink()
    os.replace(tmp, output)  # killed before this: the temp folder (removed by the rerun), never a torn output
    return output


def _torn_model_folder(folder: Path) -> bool:
    """A folder an interrupted merge left behind: a model's config.json without any weight file."""
    if not folder.is_dir() or not (folder / "config.json").is_file():
        return False
    weights = [p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") or p.name.endswith(
        ".safetensors.index.json")]
    return not weights and not (folder / "adapter_config.json").exists()
