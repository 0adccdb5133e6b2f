"""Batching mechanics shared by the teacher, evaluation scoring and the student's collators.

Each is written once here: grouping sequences by length so padding stays bounded, padding a batch
(right for scoring and training, left for generation), and running an LM head over selected
positions a chunk at a time, so full-vocabulary fp32 scores never exist for a whole batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch


def length_batches(lengths: Sequence[int], batch_size: int, max_batch_tokens: int) -> list[list[int]]:
    """Indices, longest first, in batches of at most `batch_size` rows and `max_batch_tokens` padded tokens
    (rows × the batch's longest row). A row longer than `max_batch_tokens` is a batch of its own."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        current = batches[-1] if batches else None
        # rows come longest first, so a batch's first row is its longest
        fits = current and (len(current) + 1) * lengths[current[0]] <= max_batch_tokens
        if fits and len(current) < batch_size:
            current.append(i)
        else:
            batches.append([i])
    return batches


def pad(rows: Sequence[Sequence[int] | np.ndarray], pad_id: int,
        left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L] int64 ids and attention mask of `rows`, padded with `pad_id` to the longest row.

    Right padding (the default) keeps every row's positions where they were, so positions read from
    a padded batch are the row's own; generation pads on the left, so every row ends where new
    tokens begin.
    """
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(longest - len(row), longest) if left else slice(0, len(row))
        ids[i, span] = torch.as_tensor(np.asarray(row, np.int64))
        mask[i, span] = 1
    return ids, mask


def chunk_slices(n: int, chunk_size: int) -> Iterator[slice]:
    """Consecutive slices of at most `chunk_size` covering range(n)."""
    for start in range(0, n, chunk_size):
        yield slice(start, min(start + chunk_size, n))


def head_chunks(selected: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
                chunk_size: int) -> Iterator[tuple[slice, torch.Tensor]]:
    """(slice, head(selected[slice])) for consecutive chunks of the [N, D] hidden states at the selected
    positions: the [C, V] logits of one chunk at a time, never [N, V]."""
    for sl in chunk_slices(len(selected), chunk_size):
        yield sl, head(selected[sl])
