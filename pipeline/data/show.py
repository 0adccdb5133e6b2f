"""`kdpipe show-example`: one example as a template renders it, its token ids, and which tokens are
trained (distilled or fine-tuned: predicted from the token before them), exactly as every stage
tokenizes it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kdpipe.config import option
from kdpipe.data.sources import DataConfig
from kdpipe.errors import KdpipeError


@dataclass
class ShowExampleConfig(DataConfig):
    model: str | None = option(None, "The model whose tokenizer renders it: a folder, a .gguf file, a hub "
                                     "id.")
    revision: str | None = option(None, "Hub revision of the model.")
    row: int = option(0, "Which example (0-based, after --part and --limit are applied).")


def show_example(cfg: ShowExampleConfig) -> str:
    from kdpipe.data.sources import load_examples
    from kdpipe.data.templates import get_template
    from kdpipe.data.tokenize import tokenize_examples
    from kdpipe.models import load_tokenizer

    if not cfg.model:
        raise KdpipeError("no model given: pass --model (its tokenizer renders the example)")
    tokenizer = load_tokenizer(cfg.model, cfg.revision)
    template = get_template(cfg.resolved_template(), cfg.label_names)
    examples = load_examples(cfg).examples
    if not 0 <= cfg.row < len(examples):
        raise KdpipeError(f"--row {cfg.row}: the selection has {len(examples)} examples (rows 0 to "
                          f"{len(examples) - 1})")
    example = examples[cfg.row]
    [tokenized], _report = tokenize_examples([example], template, tokenizer, cfg)
    targets = {int(p) + 1 for p in tokenized.positions}  # position p predicts token p + 1
    ids = [int(i) for i in tokenized.input_ids]
    lines = [f"model     {cfg.model}", f"template  {template.name}",
             f"row       {cfg.row} (id {example.id})",
             f"tokens    {len(ids)}, trained {len(targets)} (marked *: predicted from the token before)",
             "", "rendered:", tokenizer.decode(ids), "", f"{'pos':>5} {'id':>7}  trained  token"]
    for pos, token in enumerate(ids):
        lines.append(f"{pos:>5} {token:>7}  {'*' if pos in targets else ' ':^7}  {_shown(tokenizer, token)}")
    return "\n".join(lines)


def _shown(tokenizer: Any, token: int) -> str:
    return repr(tokenizer.decode([token]))
