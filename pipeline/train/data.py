"""Stage two's data: the cache as a torch dataset, a deterministic shuffle, and the batch collators.

`CacheDataset` is map-style over an index of the cache's Parquet row groups: it decodes one row group
when a row of it is asked for and keeps only the last few decoded (memory-mapped reads), so a large
cache is never loaded whole. `BlockShuffleSampler` visits the row groups in a seeded random order and
shuffles the rows of `window` consecutive groups together (a bounded shuffle buffer), so reads stay
local. Its order is a pure function of (seed, epoch): Trainer's resume, which skips the batches
already trained, sees exactly the batches of the interrupted run, and every process of a multi-GPU
run (accelerate shards the batch sampler) agrees on it. In a multi-process run the row groups are
dealt out to one lane per process, so each process reads its own part of the shards (see `lanes`).

`DistillCollator` right-pads (or packs: `kdpipe.train.packing`) the tokens and flattens the sparse
targets of a batch to its N target positions (``target_rows``/``target_cols`` index the [B, L]
batch; ``labels`` [N] are the actual next tokens; ``topk_ids``/``topk_logprobs`` [N, k];
``tail_mass`` [N]). A sampled cache comes out the same way with k = its N draws: the distinct
sampled ids, log p̂ (-inf at padding) and a tail of 0; the loss is told by
``DistillLossConfig(sampled=True)`` to use p̂ as is.

Teacher vocabulary padded larger than the student's (e.g. Qwen checkpoints with 151936 vs 152064
embedding rows over the same tokenizer): a cached id the student's head cannot produce
(id >= student vocab size) is masked out like padding (log-prob -inf, id 0) and its probability is
added to the tail mass, so the bucket tail keeps the teacher's total mass and renorm drops it.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from kdpipe.cache.format import CachedExample
from kdpipe.cache.reader import Cache, RowGroup
from kdpipe.data.tokenize import TokenizedExample
from kdpipe.train.packing import token_batch


class CacheDataset(torch.utils.data.Dataset):
    """Rows of a cache by global index (shard order, then row order), read a row group at a time."""

    def __init__(self, cache: Cache, keep_groups: int = 2):
        self.cache, self.path = cache, cache.path
        self.keep_groups = max(1, keep_groups)
        self.groups: list[RowGroup] = cache.row_groups()
        self.sizes = [g.rows for g in self.groups]
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64).tolist()
        self._cache: OrderedDict[int, list[CachedExample]] = OrderedDict()

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, index: int) -> CachedExample:
        if not 0 <= index < len(self):
            raise IndexError(index)
        g = bisect.bisect_right(self.starts, index) - 1
        return self._group(g)[index - self.starts[g]]

    def _group(self, g: int) -> list[CachedExample]:
        if g in self._cache:
            self._cache.move_to_end(g)
            return self._cache[g]
        rows = self.cache.read_row_group(self.groups[g])
        self._cache[g] = rows
        while len(self._cache) > self.keep_groups:
            self._cache.popitem(last=False)
        return rows


class BlockShuffleSampler(torch.utils.data.Sampler[int]):
    """Blocks (row groups) in a random order; the rows of `window` consecutive blocks shuffled together.

    A pure function of (seed, epoch); `shuffle=False` gives the stored order.

    With `lanes` L > 1 (a multi-process run: L = number of processes), the blocks are dealt out to L
    lanes (block j of the epoch's order to lane j mod L), each lane makes its own window-shuffled
    stream, and the order takes `stripe` rows from each lane in turn. With ``stripe`` = the per-device
    batch, accelerate's batch-sampler sharding hands process r the batches r, r + L, r + 2L, ...: all
    from lane r, so each process reads only its own row groups (until the shorter lanes run out near
    the end of an epoch, when the rest comes round-robin from the lanes left). One process with
    ``lanes=L`` and ``stripe`` = its batch / L sees exactly the same global batches.

    With ``lengths`` (tokens per row; ``--batching grouped``), each window's rows are sorted by length
    (ties in their shuffled order), cut into runs of ``stripe`` rows and the runs shuffled: a batch holds
    rows of similar length, so it pads little, and the order is still a pure function of (seed, epoch).
    """

    def __init__(self, block_sizes: Sequence[int], seed: int, window: int = 1, shuffle: bool = True,
                 lanes: int = 1, stripe: int = 1, lengths: Sequence[int] | None = None):
        self.lengths = None if lengths is None else np.asarray(lengths, np.int64)
        self.sizes = list(block_sizes)
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.seed, self.window, self.shuffle = seed, max(1, window), shuffle
        self.lanes, self.stripe = max(1, lanes), max(1, stripe)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def order(self, epoch: int | None = None) -> np.ndarray:
        """Every row index once, in this epoch's order."""
        epoch = self.epoch if epoch is None else epoch
        rng = np.random.default_rng([self.seed, epoch]) if self.shuffle else None
        blocks = rng.permutation(len(self.sizes)) if rng is not None else np.arange(len(self.sizes))
        streams = []
        for lane in range(self.lanes):
            mine, parts = blocks[lane :: self.lanes], []
            for i in range(0, len(mine), self.window):
                group = mine[i : i + self.window]
                rows = np.concatenate([np.arange(self.starts[b], self.starts[b + 1]) for b in group])
                rows = rng.permutation(rows) if rng is not None else rows
                parts.append(rows if self.lengths is None else self._grouped(rows, rng))
            streams.append(np.concatenate(parts) if parts else np.zeros(0, np.int64))
        return streams[0] if self.lanes == 1 else _interleave(streams, self.stripe)

    def _grouped(self, rows: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        """The window's rows by length, in runs of `stripe` rows, the runs in a random order."""
        rows = rows[np.argsort(self.lengths[rows], kind="stable")]
        runs = [rows[i : i + self.stripe] for i in range(0, len(rows), self.stripe)]
        order = rng.permutation(len(runs)) if rng is not None else range(len(runs))
        return np.concatenate([runs[i] for i in order])

    def block_of(self, rows: np.ndarray) -> np.ndarray:
        """The block (row group) each row index lives in."""
        return np.searchsorted(self.starts, rows, side="right") - 1

    def __iter__(self) -> Iterator[int]:
        return iter(self.order().tolist())


def _interleave(streams: list[np.ndarray], stripe: int) -> np.ndarray:
    """`stripe` rows from each stream in turn, skipping the streams that ran out."""
    chunks, pos = [], [0] * len(streams)
    while True:
        taken = False
        for lane, stream in enumerate(streams):
            if pos[lane] < len(stream):
                chunks.append(stream[pos[lane] : pos[lane] + stripe])
                pos[lane] += stripe
                taken = True
        if not taken:
            return np.concatenate(chunks) if chunks else np.zeros(0, np.int64)


class DistillCollator:
    """Cached rows -> a padded or packed token batch plus the flattened sparse targets (see the module doc
    and `kdpipe.train.packing.token_batch`)."""

    def __init__(self, pad_id: int, student_vocab: int, k: int, packed: bool = False,
                 pack_length: int | None = None):
        self.pad_id, self.student_vocab, self.k = pad_id, student_vocab, k
        self.packed, self.pack_length = packed, pack_length

    def tokens(self, rows: Sequence[Any]) -> dict[str, torch.Tensor]:
        return token_batch([r.input_ids for r in rows], [r.positions for r in rows], self.pad_id,
                           self.packed, self.pack_length)

    def __call__(self, rows: Sequence[CachedExample]) -> dict[str, torch.Tensor]:
        batch = self.tokens(rows)
        labels = np.concatenate([r.input_ids[r.positions + 1] for r in rows]).astype(np.int64)
        ids = np.concatenate([r.targets.topk_ids for r in rows]).astype(np.int64).reshape(-1, self.k)
        logprobs = np.concatenate([r.targets.topk_logprobs for r in rows]).astype(np.float32)
        logprobs = logprobs.reshape(-1, self.k)
        tail = np.concatenate([r.targets.tail_mass for r in rows]).astype(np.float32)
        ids, logprobs, tail = mask_out_of_vocab(ids, logprobs, tail, self.student_vocab)
        return {
            **batch,
            "labels": torch.from_numpy(labels),
            "topk_ids": torch.from_numpy(ids),
            "topk_logprobs": torch.from_numpy(logprobs),
            "tail_mass": torch.from_numpy(tail),
        }


def mask_out_of_vocab(ids: np.ndarray, logprobs: np.ndarray, tail: np.ndarray,
                      vocab: int) -> tuple[np.ndarray, ...]:
    """Cached ids the student cannot produce (>= `vocab`): id 0, log-prob -inf, their mass added to the
    tail."""
    outside = ids >= vocab
    if not outside.any():
        return ids, logprobs, tail
    ids, logprobs = ids.copy(), logprobs.copy()
    moved = np.where(outside & np.isfinite(logprobs), np.exp(logprobs.astype(np.float64)), 0.0).sum(-1)
    tail = (tail.astype(np.float64) + moved).astype(np.float32)
    ids[outside] = 0
    logprobs[outside] = -np.inf
    return ids, logprobs, tail


class TokenizedDataset(torch.utils.data.Dataset):
    """Tokenized examples in memory (fine-tuning data)."""

    def __init__(self, examples: Sequence[TokenizedExample]):
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> TokenizedExample:
        return self.examples[index]


class SFTCollator(DistillCollator):
    """Tokenized examples -> `DistillCollator`'s batch with no teacher: the trained positions as targets,
    ``labels`` [N] their next tokens, one empty sparse slot per position (log-prob -inf, tail 0).

    With ``DistillLossConfig(alpha=0)`` the fused head + cross-entropy path trains on it: the same loss
    as ``train-student --alpha 0``, without full-vocabulary logits at every position.
    """

    def __init__(self, pad_id: int, packed: bool = False, pack_length: int | None = None):
        super().__init__(pad_id, 0, 1, packed, pack_length)

    def __call__(self, rows: Sequence[Any]) -> dict[str, torch.Tensor]:
        batch = self.tokens(rows)
        labels = np.concatenate([r.input_ids[r.positions + 1] for r in rows]).astype(np.int64)
        labels = torch.from_numpy(labels)
        n = len(labels)
        return {**batch, "labels": labels, "topk_ids": torch.zeros((n, 1), dtype=torch.long),
                "topk_logprobs": torch.full((n, 1), -torch.inf), "tail_mass": torch.zeros(n)}
