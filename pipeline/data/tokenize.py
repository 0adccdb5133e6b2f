"""Examples -> token ids and the positions whose next token is distilled (the loss mask).

Segments are tokenized one by one and concatenated, so the prompt/completion boundary is exact;
the tokenizer's own special prefix (a BOS, where it adds one) comes first and EOS last.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kdpipe.data.sources import DataConfig, Example
from kdpipe.data.templates import Template
from kdpipe.errors import KdpipeError


@dataclass
class TokenizedExample:
    """`positions` are the indices t whose next token ``input_ids[t + 1]`` is distilled."""

    id: str
    input_ids: np.ndarray  # int32 [L]
    positions: np.ndarray  # int32 [P]


@dataclass
class TokenizeReport:
    """What happened to over-long or target-less examples: counted, never silent."""

    examples: int = 0
    counts: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        parts = [f"{n} {what}" for what, n in sorted(self.counts.items()) if n]
        return f"{self.examples} examples" + (f" ({', '.join(parts)})" if parts else "")


def tokenize_examples(
    examples: Sequence[Example], template: Template, tokenizer: Any, cfg: DataConfig
) -> tuple[list[TokenizedExample], TokenizeReport]:
    """Render and tokenize every example, applying the truncation policy of `cfg`."""
    rendered = [template.render(e.fields, e.id, tokenizer) for e in examples]
    texts = [s.text for segments in rendered for s in segments]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    prefix = special_prefix(tokenizer) if template.special_prefix else []
    eos = [tokenizer.eos_token_id] if template.add_eos and tokenizer.eos_token_id is not None else []
    out, report, cursor = [], TokenizeReport(), 0
    for example, segments in zip(examples, rendered):
        pieces = ids[cursor : cursor + len(segments)]
        cursor += len(segments)
        tokens, trained = list(prefix), [False] * len(prefix)
        for segment, piece in zip(segments, pieces):
            tokens += piece
            trained += [segment.trained] * len(piece)
        if eos:
            tokens += eos
            trained.append(True)
        item = _fit(example.id, tokens, trained, cfg, report)
        if item is not None:
            out.append(item)
    report.examples = len(out)
    if not out:
        raise KdpipeError(f"no example is left to distill ({report.summary()}); check max_length and the "
                          "template")
    return out, report


def prompt_ids(tokenizer: Any, texts: list[str], template: Template) -> list[int]:
    """A prompt's segments tokenized one by one and joined after the template's special prefix: exactly as
    `tokenize_examples` does for training."""
    ids = list(special_prefix(tokenizer)) if template.special_prefix else []
    for piece in tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []:
        ids += piece
    return ids


def special_prefix(tokenizer: Any) -> list[int]:
    """The tokens the tokenizer adds before any text (e.g. Llama's BOS; none for Qwen)."""
    with_special = tokenizer("x", add_special_tokens=True)["input_ids"]
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    cut = len(with_special) - len(plain)
    return with_special[:cut] if cut > 0 and with_special[cut:] == plain else []


def _fit(
    example_id: str, tokens: list[int], trained: list[bool], cfg: DataConfig, report: TokenizeReport
) -> TokenizedExample | None:
    if len(tokens) > cfg.max_length:
        if cfg.truncation == "error":
            raise KdpipeError(
                f"example '{example_id}' has {len(tokens)} tokens, more than max_length={cfg.max_length}; "
                "raise max_length (up to the model's context) or set truncation to skip, truncate or "
                "truncate-prompt"
            )
        if cfg.truncation == "skip":
            report.counts["skipped (too long)"] += 1
            return None
        if cfg.truncation == "truncate-prompt":
            prompt_len = trained.index(True) if True in trained else len(trained)
            drop = min(len(tokens) - cfg.max_length, prompt_len)
            tokens, trained = tokens[drop:], trained[drop:]
        tokens, trained = tokens[: cfg.max_length], trained[: cfg.max_length]
        truncated = True
    else:
        truncated = False
    mask = np.ones(len(tokens) - 1, bool) if cfg.distill_prompt else np.asarray(trained[1:], bool)
    positions = np.flatnonzero(mask).astype(np.int32)
    if positions.size == 0:
        reason = "completion truncated away" if truncated else "no target token"
        report.counts[f"skipped ({reason})"] += 1
        return None
    if truncated:
        report.counts["truncated"] += 1
    return TokenizedExample(example_id, np.asarray(tokens, np.int32), positions)
