"""The shared batching mechanics: length buckets within their limits, padding on either side, LM-head
chunks."""

from __future__ import annotations

import numpy as np
import torch

from kdpipe.batching import chunk_slices, head_chunks, length_batches, pad


def test_length_batches_bound_rows_and_padded_tokens():
    lengths = [5, 9, 3, 9, 1, 7, 2, 8]
    batches = length_batches(lengths, batch_size=3, max_batch_tokens=20)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))  # each index once
    order = [i for b in batches for i in b]
    assert [lengths[i] for i in order] == sorted(lengths, reverse=True)
    assert order[:2] == [1, 3]  # equal lengths in index order
    for b in batches:
        assert len(b) <= 3 and (len(b) == 1 or len(b) * lengths[b[0]] <= 20)
    assert length_batches([50, 4], batch_size=8, max_batch_tokens=10) == [[0], [1]]  # too long: alone


def test_pad_right_and_left():
    rows = [np.array([1, 2, 3]), [4]]
    ids, mask = pad(rows, pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad(rows, pad_id=9, left=True)
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == torch.long and mask.dtype == torch.long


def test_head_chunks_cover_every_position_once():
    assert list(chunk_slices(5, 2)) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    hidden, head = torch.randn(7, 4), torch.nn.Linear(4, 11)
    pieces = list(head_chunks(hidden, head, 3))
    assert [p.shape[0] for _, p in pieces] == [3, 3, 1]
    torch.testing.assert_close(torch.cat([p for _, p in pieces]), head(hidden))
