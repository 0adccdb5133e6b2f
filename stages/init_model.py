"""`kdpipe init-model`: a randomly initialised Qwen3-architecture model (a custom student, or the offline
demo's teacher), with a given tokenizer or one trained on a dataset's rendered examples.

The one definition of the stage: the CLI command and `kdpipe run`'s `teacher_init` / `student_init`
steps share `InitModelConfig` and `run`, and both write ``kdpipe_init.json`` (the options the model
was built with), by which a rerun with the same options is skipped. Torch is imported only inside
`run` (through `kdpipe.tiny`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdpipe.config import option, to_dict
from kdpipe.errors import KdpipeError
from kdpipe.run_folder import INIT_FILE, read_json, write_json
from kdpipe.stages.base import Echo, Stage


@dataclass
class InitModelConfig:
    """Options of `kdpipe init-model` (a randomly initialised Qwen3-architecture model)."""

    output: str | None = option(None, "Folder for the new model and its tokenizer (in `kdpipe run`: default "
                                      "runs/NAME/STEP).")
    tokenizer: str | None = option(None, "Use this model's tokenizer (hub id or path) ...")
    train_tokenizer_on: str | None = option(
        None, "... or train a byte-level BPE on this dataset's rendered examples (e.g. kdpipe:arithmetic).")
    template: str = option("auto", "Template used to render the tokenizer corpus.")
    vocab_size: int = option(512, "Vocabulary of a trained tokenizer: 256 bytes + 2 special tokens + merges "
                                  "(at least 258).")
    char_level: bool = option(False, "Train no merges: one token per byte (per character of ASCII text).")
    hidden_size: int = option(64, "Hidden size.")
    layers: int = option(2, "Decoder layers.")
    heads: int = option(4, "Attention heads.")
    kv_heads: int = option(2, "Key/value heads.")
    head_dim: int = option(32, "Head dimension (>= 32 for vLLM's CPU kernels).")
    intermediate_size: int | None = option(None, "MLP size (default 4 x hidden size).")
    seed: int = option(0, "Seed of the initialisation.")

    def __post_init__(self) -> None:
        if self.tokenizer and self.train_tokenizer_on:
            raise ValueError("give exactly one of tokenizer or train_tokenizer_on, not both")
        for name in ("vocab_size", "hidden_size", "layers", "heads", "kv_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.intermediate_size is not None and self.intermediate_size < 1:
            raise ValueError(f"intermediate_size must be at least 1, not {self.intermediate_size}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")


def run(cfg: InitModelConfig, command: str = "", echo: Echo = print) -> Any:
    """Build and save the model and its tokenizer into `cfg.output`; record the options; return the model."""
    from kdpipe import tiny
    from kdpipe.models import load_tokenizer

    if not cfg.output:
        raise KdpipeError("no output folder given: pass --output (or 'output:' in the config file)")
    if not cfg.tokenizer and not cfg.train_tokenizer_on:
        raise KdpipeError(f"init-model {cfg.output}: pass exactly one of --tokenizer or --train-tokenizer-on")
    if cfg.tokenizer:
        tok = load_tokenizer(cfg.tokenizer)
    else:
        corpus = _corpus(cfg.train_tokenizer_on, cfg.template)
        tok = tiny.train_tokenizer(corpus, cfg.vocab_size, cfg.char_level)
        note = tiny.vocabulary_note(tok, cfg.vocab_size, cfg.char_level)
        if note:
            echo(note)
    model = tiny.init_model(cfg.output, tok, cfg.hidden_size, cfg.layers, cfg.heads, cfg.kv_heads,
                            cfg.head_dim, intermediate_size=cfg.intermediate_size, seed=cfg.seed)
    record = {"kind": "init-model", "options": to_dict(cfg)}
    if command:
        record["command"] = command
    write_json(Path(cfg.output) / INIT_FILE, record)
    return model


def _corpus(dataset: str, template_name: str) -> list[str]:
    from kdpipe.data.sources import DataConfig, load_examples
    from kdpipe.data.templates import get_template

    data = DataConfig(dataset=dataset, template=template_name)
    template = get_template(data.resolved_template(), data.label_names)
    return ["".join(s.text for s in template.render(e.fields, e.id)) for e in load_examples(data).examples]


def state(cfg: InitModelConfig, command: str, anything_ran: bool) -> tuple[str, str]:
    """Skip a folder that holds a model built with the same options (an option added since: its default)."""
    out = Path(cfg.output)
    record = read_json(out / INIT_FILE)
    if record is not None and (out / "config.json").is_file():
        # `output` names the folder, not the model: a folder that was moved or built by path is the same model
        before = {**to_dict(InitModelConfig()), **(record.get("options") or {}), "output": cfg.output}
        if before == to_dict(cfg):
            return "skip", f"{out} holds this model"
        raise KdpipeError(f"{out} holds a model initialised with other options "
                          f"({changed(record.get('options'), to_dict(cfg))}); remove it or choose another "
                          "output")
    if out.exists() and any(out.iterdir()):
        raise KdpipeError(f"{out} already holds other files; remove it or choose another output")
    return "run", ""


def changed(before: Any, now: dict[str, Any]) -> str:
    """`key: old -> new` for the first keys that differ (for "holds other settings" messages)."""
    before = before or {}
    keys = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    return ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in keys[:6])


def _runner(cfg: InitModelConfig, command: str, echo: Echo, state: str) -> Any:
    return run(cfg, command, echo)


def summary(model: Any, cfg: InitModelConfig) -> str:
    return f"initialised a {sum(p.numel() for p in model.parameters()):,}-parameter model -> {cfg.output}"


STAGE = Stage(
    name="init-model",
    config=InitModelConfig,
    runner=_runner,
    help="Build a randomly initialised Qwen3-architecture model (a custom student, or the offline demo's "
         "teacher).\n\n\b\nExample:\n  kdpipe init-model --output runs/student-init --tokenizer runs/teacher "
         "--hidden-size 32 --layers 1",
    state=state,
    summary=summary,
    short_options={"output": "-o"},
)
