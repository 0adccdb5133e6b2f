"""Student batches without padding: examples packed into shared rows, and which batching a model can take.

``--batching packed`` (the default) keeps the examples of each micro-batch exactly as the sampler deals
them (so the data order, resume and multi-process lanes are unchanged) and lays them side by side into
as few rows as fit: rows as long as the batch's longest example (or ``--pack-length``), filled first-fit
by decreasing length. ``position_ids`` restart at 0 for every example and no 2D attention mask is
passed: transformers (5.x, `masking_utils.find_packed_sequence_indices`) then reads the restarts as
sequence boundaries and builds a block-diagonal causal mask for the sdpa, eager and flex
implementations, and flash-attention takes its variable-length path from the same position ids (in a
one-row batch only, so there each micro-batch becomes one row: `pack_length_for`); each
example attends only to itself, so its hidden states, loss and gradients are those of the padded
batch. The sparse targets are indexed into the packed rows (``target_rows``/``target_cols``); their
flattened order is the padded batch's, so the loss sums in the same order.

Not every model reads packed rows this way (absolute position embeddings computed from a padding mask,
custom attention code), so `packing_supported` runs the model once on two short examples, packed and
apart, and compares; where they differ, the run falls back to ``grouped`` with a note.

``--batching grouped``: padded batches of similar lengths (`BlockShuffleSampler` with ``lengths``).
``--batching padded``: the plain block-shuffled order, each batch right-padded to its longest example.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

BATCHINGS = ("packed", "grouped", "padded")

log = logging.getLogger(__name__)


def first_fit(lengths: Sequence[int], capacity: int) -> list[int]:
    """The row of each example: first-fit by decreasing length into rows of `capacity` tokens.

    An example longer than `capacity` gets a row of its own. Ties keep the examples' order, so the
    layout is a pure function of the lengths.
    """
    rows_of, free = [0] * len(lengths), []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, room in enumerate(free) if room >= lengths[i]), None)
        if row is None:
            free.append(capacity)
            row = len(free) - 1
        free[row] -= lengths[i]
        rows_of[i] = row
    return rows_of


def token_batch(tokens: Sequence[np.ndarray], positions: Sequence[np.ndarray], pad_id: int,
                packed: bool = False, pack_length: int | None = None) -> dict[str, torch.Tensor]:
    """Token rows and target indices of one micro-batch.

    Padded: ``input_ids`` and ``attention_mask`` [B, L] (right padding), example b in row b. Packed:
    ``input_ids`` and ``position_ids`` [R, L'] with R <= B (no attention mask), pad tokens only at the
    rows' ends (their positions restart too, so they form a segment of their own), ``num_tokens`` the real
    tokens. Both: the targets
    ``target_rows``/``target_cols`` [N], example by example, ``positions`` shifted to where each
    example sits.
    """
    lengths = [len(t) for t in tokens]
    longest = max(lengths)
    if packed:
        rows_of = first_fit(lengths, max(longest, pack_length or 0))
        offsets, fill = [0] * len(tokens), [0] * (max(rows_of) + 1)
        for i, row in enumerate(rows_of):
            offsets[i], fill[row] = fill[row], fill[row] + lengths[i]
        width = max(fill)
    else:
        rows_of, offsets, fill, width = list(range(len(tokens))), [0] * len(tokens), lengths, longest
    ids = torch.full((len(fill), width), pad_id, dtype=torch.long)
    for i, t in enumerate(tokens):
        ids[rows_of[i], offsets[i] : offsets[i] + lengths[i]] = torch.from_numpy(np.asarray(t, np.int64))
    counts = torch.tensor([len(p) for p in positions])
    batch = {
        "input_ids": ids,
        "target_rows": torch.repeat_interleave(torch.tensor(rows_of, dtype=torch.long), counts),
        "target_cols": torch.from_numpy(np.concatenate(
            [np.asarray(p, np.int64) + o for p, o in zip(positions, offsets, strict=True)])),
    }
    if packed:
        pos = torch.zeros_like(ids)
        for i, row in enumerate(rows_of):
            pos[row, offsets[i] : offsets[i] + lengths[i]] = torch.arange(lengths[i])
        for row, used in enumerate(fill):
            pos[row, used:] = torch.arange(width - used)
        batch["position_ids"] = pos
        batch["num_tokens"] = torch.tensor(sum(lengths))  # the real tokens (no mask to count them from)
    else:
        mask = torch.zeros_like(ids)
        for i, n in enumerate(lengths):
            mask[i, :n] = 1
        batch["attention_mask"] = mask
    return batch


def model_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """The model's keyword arguments of a `token_batch`: the attention mask or, packed, the position ids."""
    if "position_ids" in inputs:
        return {"input_ids": inputs["input_ids"], "position_ids": inputs["position_ids"]}
    return {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}


def one_row(model: Any) -> bool:
    """flash-attention takes packed sequences from the position ids only in a batch of ONE row (transformers'
    `_is_packed_sequence`); with more rows it would attend across the examples of a row. There each
    micro-batch is packed into a single row: no padding at all, the variable-length kernel's best case."""
    from kdpipe.models import causal_lm

    return "flash" in (getattr(causal_lm(model).config, "_attn_implementation", None) or "")


def pack_length_for(model: Any, pack_length: int | None) -> int | None:
    """The row length the collator packs to: `pack_length`, or everything in one row for flash-attention."""
    return 1 << 40 if one_row(model) else pack_length


def real_tokens(inputs: dict[str, Any]) -> float:
    """Tokens of a `token_batch`, padding excluded."""
    return float(inputs["num_tokens"] if "num_tokens" in inputs else inputs["attention_mask"].sum())


def packing_supported(model: Any) -> bool:
    """Whether the model keeps packed examples apart: the last hidden states of four short examples packed
    as the collator will pack them (two rows, or one for flash-attention) equal those of each run alone
    (a few tokens through the real model)."""
    from kdpipe.models import causal_lm

    lm = causal_lm(model)
    body, vocab = lm.base_model, lm.config.get_text_config().vocab_size
    gen = torch.Generator().manual_seed(0)
    examples = [torch.randint(0, vocab, (n,), generator=gen).numpy() for n in (5, 4, 3, 4)]
    batch = token_batch(examples, [np.arange(len(e)) for e in examples], 0, packed=True,
                        pack_length=pack_length_for(model, 9))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            apart = [body(input_ids=torch.from_numpy(e).long()[None].to(device), use_cache=False)[0][0]
                     for e in examples]
            packed = body(**{k: v.to(device) for k, v in model_inputs(batch).items()}, use_cache=False)[0]
    except (TypeError, ValueError, RuntimeError):
        return False
    finally:
        model.train(was_training)
    want = torch.cat(apart).float()
    got = packed[batch["target_rows"].to(device), batch["target_cols"].to(device)].float()
    return bool((got - want).abs().max() <= 1e-2 * (want.abs().max() + 1e-6))


def choose_batching(wanted: str, model: Any, why_not: str | None = None) -> str:
    """`wanted`, or ``grouped`` with a note when packing was asked for but cannot apply."""
    if wanted != "packed":
        return wanted
    if why_not is None and not packing_supported(model):
        why_not = (f"{type(model).__name__} does not keep packed examples apart (its outputs with restarting "
                   "position ids differ from the examples run one by one)")
    if why_not is None:
        return "packed"
    log.info(f"note: --batching packed does not apply: {why_not}; training with --batching grouped "
             "(padded batches of similar lengths) instead")
    return "grouped"
