"""`kdpipe init-model`: a student cut from a model (`--from`: depth pruning, kdpipe.students), or a
randomly initialised model (a custom student, or the offline demo's teacher) of Qwen3's architecture or
another model's (`--like`), with a given tokenizer or one trained on a dataset's rendered examples.

The output is written aside (``.NAME.init-partial``) and renamed into place: never half a model. A
folder that holds anything else (a finished training run, the teacher) is refused unless --overwrite.

The one definition of the stage: the CLI command and `kdpipe run`'s `teacher_init` / `student_init`
steps share `InitModelConfig` and `run`, and both write ``kdpipe_init.json`` (the options the model
was built with), by which a rerun with the same options is skipped. Torch is imported only inside
`run` (through `kdpipe.tiny`).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdpipe.config import option, to_dict
from kdpipe.errors import KdpipeError
from kdpipe.filemode import honour_umask
from kdpipe.run_folder import INIT_FILE, RUN_FILE, holds_other_files, read_json, write_json
from kdpipe.stages.base import Echo, Stage

DEFAULT_LAYERS = 2  # a random init's decoder layers when --layers is not given


@dataclass
class InitModelConfig:
    """Options of `kdpipe init-model` (a random init, or a student cut from a model)."""

    output: str | None = option(None, "Folder for the new model and its tokenizer (in `kdpipe run`: default "
                                      "runs/NAME/STEP).")
    from_model: str | None = option(
        None, "Cut the student from this model (depth pruning): its embeddings, --layers N of its "
              "decoder layers (evenly spaced, first and last kept) or --layer-ids, its final norm, head and "
              "tokenizer.")
    layer_ids: list[int] | None = option(None, "With --from: the layers to keep, e.g. 0,5,9 (in this order).")
    tokenizer: str | None = option(None, "Random init: use this model's tokenizer (hub id or path) ...")
    train_tokenizer_on: str | None = option(
        None, "... or train a byte-level BPE on this dataset's rendered examples (e.g. kdpipe:arithmetic).")
    like: str | None = option(None, "Random init in this model's architecture (its config's model type, "
                                    "activation, norm, RoPE ...) with the sizes given here (default: Qwen3).")
    tie_embeddings: bool | None = option(
        None, "Tie the LM head to the embeddings (default: as the --like model, else the --tokenizer's model "
              "folder, does; untied otherwise; --from: as the model it is cut from).")
    template: str = option("auto", "Template used to render the tokenizer corpus.")
    vocab_size: int = option(512, "Vocabulary of a trained tokenizer: 256 bytes + 2 special tokens + merges "
                                  "(at least 258).")
    char_level: bool = option(False, "Train no merges: one token per byte (per character of ASCII text).")
    hidden_size: int = option(64, "Hidden size.")
    layers: int | None = option(None, f"Decoder layers (random init: default {DEFAULT_LAYERS}; --from: how "
                                      "many of the model's to keep).")
    heads: int = option(4, "Attention heads.")
    kv_heads: int = option(2, "Key/value heads.")
    head_dim: int = option(32, "Head dimension (>= 32 for vLLM's CPU kernels).")
    intermediate_size: int | None = option(None, "MLP size (default 4 x hidden size).")
    seed: int = option(0, "Seed of the initialisation.")
    overwrite: bool = option(False, "Replace what --output holds (a model, a training run, other files).")

    def __post_init__(self) -> None:
        if self.tokenizer and self.train_tokenizer_on:
            raise ValueError("give exactly one of tokenizer or train_tokenizer_on, not both")
        for name in ("vocab_size", "hidden_size", "layers", "heads", "kv_heads", "head_dim",
                     "intermediate_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, not {value}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.layer_ids is not None and not all(type(i) is int for i in self.layer_ids):
            raise ValueError(f"layer_ids must be layer numbers, not {self.layer_ids!r}")
        if self.tie_embeddings not in (None, True, False):
            raise ValueError(f"tie_embeddings must be true or false, not {self.tie_embeddings!r}")
        if self.from_model:
            if self.tokenizer or self.train_tokenizer_on or self.like:
                raise ValueError("--from keeps the model's own tokenizer and architecture: drop --tokenizer, "
                                 "--train-tokenizer-on and --like")
            sizes = ("hidden_size", "heads", "kv_heads", "head_dim", "intermediate_size", "seed")
            given = [n for n in sizes if getattr(self, n) != getattr(type(self), n, None)]
            if given:
                flag = "--" + given[0].replace("_", "-")
                raise ValueError(f"--from takes its sizes from the model it cuts; drop {flag} (keep --layers "
                                 "or --layer-ids)")
            if self.layers is None and self.layer_ids is None:
                raise ValueError("--from needs --layers N (evenly spaced) or --layer-ids 0,5,9")
        elif self.layer_ids is not None:
            raise ValueError("--layer-ids chooses the layers of --from MODEL; give --from")


def run(cfg: InitModelConfig, command: str = "", echo: Echo = print) -> Any:
    """Build and save the model and its tokenizer into `cfg.output` (written aside, then renamed: never a
    half-written folder); record the options; return the model (None: the folder already holds it)."""
    from kdpipe.models import load_tokenizer

    if not cfg.output:
        raise KdpipeError("no output folder given: pass --output (or 'output:' in the config file)")
    if not cfg.from_model and not cfg.tokenizer and not cfg.train_tokenizer_on:
        raise KdpipeError(f"init-model {cfg.output}: pass exactly one of --tokenizer or --train-tokenizer-on "
                          "(or --from MODEL to cut a student from it)")
    verdict, why = check_output(cfg)
    if verdict == "skip":
        echo(f"{why}: nothing to do (--overwrite builds it again)")
        return None
    out = Path(cfg.output)
    partial = out.parent / f".{out.name}.init-partial"  # ours: a crash leaves it here, the next run clears it
    shutil.rmtree(partial, ignore_errors=True)
    record: dict[str, Any] = {"kind": "init-model", "options": to_dict(cfg)}
    if cfg.from_model:
        model, tok, record["layer_ids"] = _cut(cfg, echo)
    else:
        tok = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else _trained_tokenizer(cfg, echo)
        model = _random_init(cfg, tok)
    if command:
        record["command"] = command
    partial.mkdir(parents=True)
    model.save_pretrained(partial)
    tok.save_pretrained(partial)
    write_json(partial / INIT_FILE, record)
    honour_umask(partial)  # transformers writes the weights 0600, as for a trained or merged model
    if out.exists():
        shutil.rmtree(out)  # empty, or --overwrite (check_output refused everything else)
    os.replace(partial, out)
    return model


def _trained_tokenizer(cfg: InitModelConfig, echo: Echo) -> Any:
    from kdpipe import tiny

    tok = tiny.train_tokenizer(_corpus(cfg.train_tokenizer_on, cfg.template), cfg.vocab_size, cfg.char_level)
    note = tiny.vocabulary_note(tok, cfg.vocab_size, cfg.char_level)
    if note:
        echo(note)
    return tok


def _random_init(cfg: InitModelConfig, tok: Any) -> Any:
    from transformers import AutoConfig

    from kdpipe import tiny
    from kdpipe.models import resolve_model_name

    like = None
    if cfg.like:
        try:
            like = AutoConfig.from_pretrained(resolve_model_name(cfg.like))
        except (OSError, ValueError) as e:
            raise KdpipeError(f"--like {cfg.like}: cannot read its config.json ({e})") from None
    tie = cfg.tie_embeddings
    if tie is None:  # as the model whose architecture or tokenizer the student takes
        source = like if like is not None else _local_config(cfg.tokenizer)
        tie = bool(getattr(source, "tie_word_embeddings", False))
    return tiny.init_model(None, tok, cfg.hidden_size, cfg.layers or DEFAULT_LAYERS, cfg.heads, cfg.kv_heads,
                           cfg.head_dim, intermediate_size=cfg.intermediate_size, seed=cfg.seed, tie=tie,
                           like=like)


def _local_config(name: str | None) -> Any:
    """The config of a local model folder (None for a hub id or a folder without config.json)."""
    from transformers import AutoConfig

    if not name or not (Path(name).expanduser() / "config.json").is_file():
        return None
    try:
        return AutoConfig.from_pretrained(Path(name).expanduser())
    except (OSError, ValueError):
        return None


def _cut(cfg: InitModelConfig, echo: Echo) -> tuple[Any, Any, list[int]]:
    from kdpipe import students
    from kdpipe.models import load_model, load_tokenizer

    config = _local_config(cfg.from_model)
    if config is not None and not students.is_causal_lm(config):
        raise KdpipeError(f"--from {cfg.from_model}: a {type(config).__name__} ({config.model_type}) is "
                          "not a causal language model (AutoModelForCausalLM has no class for it); cut a "
                          "decoder-only model such as Llama, Qwen or GPT-2")
    tok = load_tokenizer(cfg.from_model)
    teacher = load_model(cfg.from_model, dtype="auto", device="cpu")
    prefix, total = students.decoder_layers(teacher)
    ids = students.choose_layers(total, cfg.layers, cfg.layer_ids, cfg.from_model)
    if cfg.tie_embeddings is not None and cfg.tie_embeddings != students.is_tied(teacher):
        raise KdpipeError(f"--{'' if cfg.tie_embeddings else 'no-'}tie-embeddings: {cfg.from_model}'s head "
                          f"is {'its own matrix' if cfg.tie_embeddings else 'tied to its embeddings'}; a cut "
                          "student keeps it as it is (drop the option)")
    echo(f"cutting {cfg.from_model}: keeping {len(ids)} of its {total} decoder layers ({prefix}: "
         f"{', '.join(map(str, ids))})")
    return students.cut(teacher, ids), tok, ids


def _corpus(dataset: str, template_name: str) -> list[str]:
    from kdpipe.data.sources import DataConfig, load_examples
    from kdpipe.data.templates import get_template

    data = DataConfig(dataset=dataset, template=template_name)
    template = get_template(data.resolved_template(), data.label_names)
    return ["".join(s.text for s in template.render(e.fields, e.id)) for e in load_examples(data).examples]


def options(cfg_options: dict[str, Any]) -> dict[str, Any]:
    """The options that decide the model (an option added since a record was written: its default)."""
    values = {**to_dict(InitModelConfig()), **cfg_options}
    values.pop("overwrite", None)
    if values.get("layers") is None and not values.get("from_model"):
        values["layers"] = DEFAULT_LAYERS
    return values


def check_output(cfg: InitModelConfig) -> tuple[str, str]:
    """("skip", why) when --output holds this model already, ("run", "") when it may be written; a
    KdpipeError for anything else in it (a finished training run, a teacher, other files), unless
    --overwrite, and always for an output that is a file or one of the inputs."""
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise KdpipeError(f"--output {out} is a file, not a folder; init-model writes a model folder there "
                          "(choose another --output)")
    for key in ("from_model", "like", "tokenizer"):
        given = getattr(cfg, key)
        source = Path(given).expanduser() if given else None
        if source is not None and source.exists() and source.resolve() == out.resolve():
            flag = "--from" if key == "from_model" else f"--{key}"
            raise KdpipeError(f"--output {out} is the {flag} model itself; choose another --output (the new "
                              "model would replace the one it is made from)")
    record = read_json(out / INIT_FILE)
    if record is not None and (out / "config.json").is_file():
        # `output` names the folder, not the model: a folder that was moved or built by path is the same model
        before = {**options(record.get("options") or {}), "output": cfg.output}
        if before == options(to_dict(cfg)) and not cfg.overwrite:
            return "skip", f"{out} holds this model"
        if not cfg.overwrite:
            raise KdpipeError(f"{out} holds a model initialised with other options "
                              f"({changed(before, options(to_dict(cfg)))}); remove it, choose another output "
                              "or pass --overwrite")
        return "run", ""
    if holds_other_files(out) and not cfg.overwrite:
        raise KdpipeError(f"--output {out} already holds {_what(out)}; init-model refuses to replace it: "
                          "choose another --output, or pass --overwrite")
    return "run", ""


def _what(out: Path) -> str:
    """What a non-empty folder holds, in words."""
    run = read_json(out / RUN_FILE)
    if run is not None:
        return f"a `kdpipe {run.get('kind', '?')}` run (status {run.get('status', '?')})"
    if (out / "config.json").is_file():
        return "a model (config.json)"
    return "other files (" + ", ".join(sorted(p.name for p in out.iterdir())[:3]) + ")"


def state(cfg: InitModelConfig, command: str, anything_ran: bool) -> tuple[str, str]:
    """Skip a folder that holds a model built with the same options; refuse one that holds anything else."""
    return check_output(cfg)


def changed(before: Any, now: dict[str, Any]) -> str:
    """`key: old -> new` for the first keys that differ (for "holds other settings" messages)."""
    before = before or {}
    keys = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    return ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in keys[:6])


def _runner(cfg: InitModelConfig, command: str, echo: Echo, state: str) -> Any:
    return run(cfg, command, echo)


def summary(model: Any, cfg: InitModelConfig) -> str:
    if model is None:
        return f"{cfg.output} already holds this model"
    made = f"cut from {cfg.from_model}" if cfg.from_model else "initialised"
    return f"{made}: a {sum(p.numel() for p in model.parameters()):,}-parameter model -> {cfg.output}"


STAGE = Stage(
    name="init-model",
    config=InitModelConfig,
    runner=_runner,
    help="Build a student: cut from a model (--from), or randomly initialised (Qwen3, or --like a model's "
         "architecture).\n\n\b\nExamples:\n  kdpipe init-model --from runs/teacher --layers 6 --output "
         "runs/student-cut\n  kdpipe init-model --output runs/student-init --tokenizer runs/teacher "
         "--hidden-size 32 --layers 1\n  kdpipe init-model --tokenizer T --like T --layers 4 --hidden-size "
         "256 --output runs/student-like",
    state=state,
    summary=summary,
    short_options={"output": "-o", "from_model": "--from"},
)
