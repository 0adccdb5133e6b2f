"""Cross-tokenizer distillation on a cache (``--cross-tokenizer``): alignment by character offsets,
projection of the teacher's top-k through the string map, and the ULD term.

Per cached row (docs/guides/other-tokenizers.md):

1. The row is cut into pieces (`kdpipe.vocab.map.text_pieces`): added tokens alone, the rest where the
   trained flag changes (the template's segments); each ordinary piece is decoded to text with the
   teacher's tokenizer. The teacher's character offsets are recomputed by tokenizing that text again
   with offsets; the cached ids must come back (else the row has no recoverable text).
2. The student tokenizes each piece itself (added tokens through the map; the teacher's EOS becomes the
   student's EOS). Both token sequences live on one axis: the characters of the ordinary pieces, one
   unit per added token.
3. A student position t (predicting token t + 1, which is a trained token) is *aligned* with teacher
   position u when student token t + 1 and teacher token u + 1 cover exactly the same characters and
   both are whole (a token holding part of a character split into bytes is not). The same prefix is then
   seen by both, and the teacher's cached top-k over its next token is projected onto the student's
   vocabulary id by id (`VocabMap`): ids without a counterpart join the tail bucket. The chosen
   divergence is taken there.
4. Every trained student position gets cross-entropy. With ``--uld-weight`` every trained student
   position is also *paired* with the teacher position whose next token covers the first character of
   its own next token, and the ULD term (Boizard et al. 2024: the L1 distance between the two sorted
   probability vectors) is added: it needs no common vocabulary, so it also sees the unmapped mass.
   With a top-k cache the ranks past k are unknown: they are compared as one bucket (tail vs tail),
   a lower bound of the exact sorted distance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kdpipe.errors import KdpipeError
from kdpipe.vocab import map as vm


@dataclass
class Alignment:
    """One row in the student's ids.

    input_ids [Ls]; ce_positions [N] (t with a trained next token); kd [N] the cached-position index
    (into the row's `positions`) aligned with each, -1 if none; pair [N] the one ULD compares it with.
    """

    input_ids: np.ndarray
    ce_positions: np.ndarray
    kd: np.ndarray
    pair: np.ndarray


def require_offsets(tokenizer: Any, role: str) -> None:
    if not getattr(tokenizer, "is_fast", False):
        name = getattr(tokenizer, "name_or_path", "?")
        raise KdpipeError(
            f"--cross-tokenizer aligns tokens by character offsets, but the {role}'s tokenizer {name} gives "
            f"none (a slow {type(tokenizer).__name__}, no tokenizer.json): save it as a fast tokenizer "
            "(AutoTokenizer.from_pretrained(..., use_fast=True).save_pretrained(DIR)) and pass that folder")


def encode(tokenizer: Any, texts: list[str]) -> tuple[list[list[int]], list[list[int]]]:
    """Ids and character end offsets of each text (no special tokens added)."""
    if not texts:
        return [], []
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], [[e for _, e in offs] for offs in enc["offset_mapping"]]


def spans(ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start, whole) of tokens with the given end offsets on the common axis.

    A token starts where the previous one ended; it is whole when it covers at least one unit and the
    next token ends later (two tokens with one end split one character into bytes: neither is whole).
    """
    starts = np.concatenate([[0], ends[:-1]]) if len(ends) else ends
    nxt = np.concatenate([ends[1:], [np.iinfo(np.int64).max]]) if len(ends) else ends
    return starts, (ends > starts) & (nxt > ends)


class RowWithoutText(Exception):
    """The cached ids do not come back from their decoded text: nothing to align the row by."""


def align(example: Any, teacher: Any, student: Any, vmap: vm.VocabMap, added: set[int]) -> Alignment:
    """The `Alignment` of one cached row (see the module doc); `RowWithoutText` when it cannot be rebuilt."""
    ids = np.asarray(example.input_ids, np.int64)
    flags = vm.trained_flags(example)
    pieces = vm.text_pieces(ids, flags, teacher, added)
    texts = [p.text for p in pieces if p.text is not None]
    t_ids, t_ends = encode(teacher, texts)
    s_ids, s_ends = encode(student, texts)
    teacher_end = np.zeros(len(ids), np.int64)
    s_tokens: list[int] = list(vm.leading_special(student))
    s_end: list[int] = [0] * len(s_tokens)
    s_trained: list[bool] = [False] * len(s_tokens)
    base, k = 0, 0
    for p in pieces:
        if p.text is None:
            base += 1
            teacher_end[p.start] = base
            j = int(vmap.ids[int(ids[p.start])])
            if j < 0 and int(ids[p.start]) == teacher.eos_token_id:
                j = student.eos_token_id
            if j is not None and j >= 0:
                s_tokens.append(j)
                s_end.append(base)
                s_trained.append(p.trained)
            continue
        if t_ids[k] != ids[p.start : p.stop].tolist():
            raise RowWithoutText(example.id)
        teacher_end[p.start : p.stop] = base + np.asarray(t_ends[k], np.int64)
        s_tokens += s_ids[k]
        s_end += [base + e for e in s_ends[k]]
        s_trained += [p.trained] * len(s_ids[k])
        base += len(p.text)
        k += 1
    s_end_a = np.asarray(s_end, np.int64)
    t_start, t_whole = spans(teacher_end)
    s_start, s_whole = spans(s_end_a)
    cached = {int(u): i for i, u in enumerate(example.positions)}
    by_span = {(int(t_start[j]), int(teacher_end[j])): j for j in range(len(ids)) if t_whole[j]}
    ce = np.flatnonzero(np.asarray(s_trained[1:], bool)).astype(np.int64)
    kd = np.full(len(ce), -1, np.int64)
    pair = np.full(len(ce), -1, np.int64)
    for n, t in enumerate(ce):
        s = t + 1
        if s_whole[s]:
            j = by_span.get((int(s_start[s]), int(s_end_a[s])))
            if j is not None and j - 1 in cached:
                kd[n] = cached[j - 1]
        # the teacher token holding the first character of student token s: the first ending after its start
        covering = int(np.searchsorted(teacher_end, s_start[s], side="right"))
        if 0 < covering < len(ids) and covering - 1 in cached:
            pair[n] = cached[covering - 1]
    return Alignment(np.asarray(s_tokens, np.int64), ce, kd, pair)


def coverage(cache: Any, vmap: vm.VocabMap, teacher: Any, student: Any, limit: int) -> dict[str, Any]:
    """Aligned share of the student's target positions and mapped mass over the first `limit` rows;
    refuses a cache whose rows cannot be rebuilt, or tokenizers that share (almost) nothing."""
    require_offsets(teacher, "teacher")
    require_offsets(student, "student")
    added = vm.added_ids(teacher)
    rows = without_text = 0
    positions = aligned = 0
    mass = total = 0.0
    for e in cache.iter_examples():
        if rows >= limit:
            break
        rows += 1
        try:
            a = align(e, teacher, student, vmap, added)
        except RowWithoutText:
            without_text += 1
            continue
        positions += len(a.ce_positions)
        aligned += int((a.kd >= 0).sum())
        on_mapped, on_tokens = vm.mapped_mass(e, vmap)
        mass, total = mass + on_mapped, total + on_tokens
    from kdpipe.cache.manifest import as_manifest

    name = as_manifest(cache.manifest).tokenizer.name  # a Manifest (or its JSON, as a test's stand-in has)
    if without_text > 0.01 * rows:
        raise KdpipeError(
            f"cache {cache.path} holds no example text, and for {without_text} of {rows} rows the text "
            f"decoded from the cached ids with the teacher's tokenizer ({name}) does not tokenize back to "
            "those ids: the text needed to align the student's tokens is missing. Cache the data again with "
            "the teacher's own tokenizer, or pass --teacher-tokenizer with the one the cache was made with")
    found = {"mass": mass / total if total > 0 else 1.0, "aligned": aligned / positions if positions else 0.0,
             "positions": positions, "aligned_positions": aligned, "rows_checked": rows,
             "rows_without_text": without_text}
    if found["mass"] < 0.05 or found["aligned"] < 0.05:
        raise KdpipeError(
            f"--cross-tokenizer: the student shares almost nothing with the cache's teacher ({name}): "
            f"{vmap.mapped} of {vmap.teacher_tokens} teacher tokens have a student counterpart, "
            f"{found['mass']:.2%} of the cached mass is on them and {found['aligned']:.2%} of the student's "
            "target positions align with a teacher position; distilling would train on next to nothing. "
            "Pick a student whose tokens overlap the teacher's (same byte-level alphabet), or train it with "
            "`kdpipe finetune` instead")
    return found


class CrossCollator:
    """Cached rows -> the student's own tokens, CE targets at every trained position, projected teacher
    targets at the aligned ones (``kd_index``) and ULD pairs (``uld_index``)."""

    def __init__(self, vmap: vm.VocabMap, teacher: Any, student: Any, student_vocab: int,
                 packed: bool = False, pack_length: int | None = None):
        self.vmap, self.teacher, self.student, self.vocab = vmap, teacher, student, student_vocab
        self.packed, self.pack_length = packed, pack_length  # see kdpipe.train.packing
        self.added = vm.added_ids(teacher)
        self.pad = student.pad_token_id if student.pad_token_id is not None else 0

    def __call__(self, rows: Any) -> dict[str, torch.Tensor]:
        from kdpipe.train.data import mask_out_of_vocab
        from kdpipe.train.packing import token_batch

        aligned = []
        for r in rows:
            try:
                aligned.append((r, align(r, self.teacher, self.student, self.vmap, self.added)))
            except RowWithoutText:  # counted before training (under 1 %): the row is left out
                continue
        some = [a for _, a in aligned] or [Alignment(np.zeros(1, np.int64), *[np.zeros(0, np.int64)] * 3)]
        batch = token_batch([a.input_ids for a in some], [a.ce_positions for a in some], self.pad,
                            self.packed, self.pack_length)
        labels, kd_at, kd_src, pair_at, pair_src = [], [], [], [], []
        n = 0
        for r, a in aligned:
            labels += a.input_ids[a.ce_positions + 1].tolist()
            for i in np.flatnonzero(a.kd >= 0):
                kd_at.append(n + i)
                kd_src.append((r, int(a.kd[i])))
            for i in np.flatnonzero(a.pair >= 0):
                pair_at.append(n + i)
                pair_src.append((r, int(a.pair[i])))
            n += len(a.ce_positions)
        k = rows[0].targets.topk_ids.shape[-1] if rows else 1
        ids, lp, tail = self._targets(kd_src, k)
        ids = np.where(ids < 0, self.vocab, ids)
        ids, lp, tail = mask_out_of_vocab(ids, lp, tail, self.vocab)
        _, uld_lp, uld_tail = self._targets(pair_src, k)
        return {
            **batch,
            "labels": torch.tensor(labels, dtype=torch.long),
            "kd_index": torch.tensor(kd_at, dtype=torch.long), "topk_ids": torch.from_numpy(ids),
            "topk_logprobs": torch.from_numpy(lp), "tail_mass": torch.from_numpy(tail),
            "uld_index": torch.tensor(pair_at, dtype=torch.long), "uld_logprobs": torch.from_numpy(uld_lp),
            "uld_tail": torch.from_numpy(uld_tail),
        }

    def _targets(self, sources: list[tuple[Any, int]], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Projected ids (-1: no counterpart), log-probs and tail of the given cached positions."""
        if not sources:
            return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32), np.zeros(0, np.float32)
        t_ids = np.stack([r.targets.topk_ids[i] for r, i in sources]).astype(np.int64)
        lp = np.stack([r.targets.topk_logprobs[i] for r, i in sources]).astype(np.float32)
        tail = np.array([r.targets.tail_mass[i] for r, i in sources], np.float32)
        table = self.vmap.ids
        ids = np.where(t_ids < len(table), table[np.minimum(t_ids, len(table) - 1)], -1)
        return ids, lp, tail

