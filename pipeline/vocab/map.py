"""Teacher and student vocabularies matched by token strings, not by ids or hashes.

`build_map` gives every teacher id the student id of the same token: byte-level BPE tokens are
compared as the bytes they stand for, other tokens as their strings, added (special) tokens by their
content, and the teacher's EOS/BOS/PAD whose content the student lacks stand for the student's own
(DeepSeek's <｜end▁of▁sentence｜> becomes Qwen3's EOS). Teacher ids without a counterpart (and the
rows of a head padded past the tokenizer) map to -1; in training they join the tail, as padded ids
always did (`kdpipe.train.data.mask_out_of_vocab`).

The cached rows then need the student's ids (`remap_example`): input ids, top-k ids and positions.
Leading teacher special tokens the student lacks (a BOS such as DeepSeek's) are dropped with the
position that predicts from them; another unmapped input token becomes the student's unk/eos token.

`coverage` measures whether the remapped cache is what the student would see: the share of the
teacher's cached top-k mass on mapped ids (ids past the teacher's tokenizer, i.e. head padding, are not
tokens and are left out), and the share of rows whose remapped ids equal the student's own
tokenization of the row's text (the text is rebuilt from the teacher's tokens, see `text_pieces`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kdpipe.errors import KdpipeError

if TYPE_CHECKING:
    from kdpipe.cache.manifest import Manifest

MAP_FILE = "vocab_map.json"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet of byte-level BPE tokens."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_BYTE_OF = {c: b for b, c in bytes_to_unicode().items()}


def is_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    return "ByteLevel" in json.dumps(json.loads(backend.to_str()).get("decoder") or {})


def token_keys(tokenizer: Any) -> dict[int, tuple[str, Any]]:
    """id -> what the token is: ("added", content), ("bytes", b"...") or ("text", string)."""
    added = {i: t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    byte_level = is_byte_level(tokenizer)
    keys: dict[int, tuple[str, Any]] = {}
    for token, i in tokenizer.get_vocab().items():
        if i in added:
            keys[i] = ("added", added[i])
        elif byte_level and all(c in _BYTE_OF for c in token):
            keys[i] = ("bytes", bytes(_BYTE_OF[c] for c in token))
        else:
            keys[i] = ("text", token)
    return keys


@dataclass
class VocabMap:
    """teacher id -> student id (-1: no counterpart); `ids` has one entry per teacher head row."""

    ids: np.ndarray
    teacher_tokens: int  # tokens of the teacher's tokenizer (head rows past it are padding)
    student_tokens: int
    unmapped: dict[str, int] = field(default_factory=dict)  # by kind: ordinary / added
    unmapped_examples: list[str] = field(default_factory=list)

    @property
    def mapped(self) -> int:
        return int((self.ids[: self.teacher_tokens] >= 0).sum())

    def summary(self) -> dict[str, Any]:
        return {"teacher_tokens": self.teacher_tokens, "student_tokens": self.student_tokens,
                "mapped": self.mapped, "unmapped": self.unmapped, "unmapped_examples": self.unmapped_examples}

    def save(self, folder: Path, extra: dict[str, Any]) -> Path:
        """The map as JSON in the run folder (``vocab_map.json``), with what it was built from."""
        path = Path(folder) / MAP_FILE
        record = {**extra, **self.summary(), "teacher_to_student": self.ids.tolist()}
        path.write_text(json.dumps(record) + "\n")
        return path


def build_map(teacher: Any, student: Any, teacher_rows: int | None = None) -> VocabMap:
    """The map from `teacher`'s ids to `student`'s by token (see the module doc)."""
    t_keys, s_keys = token_keys(teacher), token_keys(student)
    by_key = {k: i for i, k in s_keys.items()}
    tokens = max(t_keys) + 1 if t_keys else 0
    ids = np.full(max(tokens, teacher_rows or 0), -1, np.int64)
    unmapped = {"ordinary": 0, "added": 0}
    examples = []
    for i, key in t_keys.items():
        j = by_key.get(key)
        if j is None:
            unmapped["added" if key[0] == "added" else "ordinary"] += 1
            if len(examples) < 8:
                examples.append(repr(key[1])[:40])
        else:
            ids[i] = j
    for role in ("eos_token_id", "bos_token_id", "pad_token_id"):
        # a template's EOS (BOS, PAD) is the teacher's own: the student's own one stands for it
        t, s = getattr(teacher, role, None), getattr(student, role, None)
        if t is not None and s is not None and t < len(ids) and ids[t] < 0 and s not in set(ids.tolist()):
            ids[t] = s
            unmapped["added" if t_keys[t][0] == "added" else "ordinary"] -= 1
            if repr(t_keys[t][1])[:40] in examples:
                examples.remove(repr(t_keys[t][1])[:40])
    return VocabMap(ids, tokens, len(student), unmapped, examples)


# ---------------------------------------------------------------- rows


@dataclass
class Piece:
    """A run of teacher tokens [start, stop): ordinary text tokenized together, or one added token."""

    start: int
    stop: int
    trained: bool
    text: str | None  # None: an added token (by id)


def trained_flags(example: Any) -> np.ndarray:
    """Per token: is it a distilled target (its position is cached)?"""
    flags = np.zeros(len(example.input_ids), bool)
    flags[np.asarray(example.positions, np.int64) + 1] = True
    return flags


def text_pieces(ids: np.ndarray, flags: np.ndarray, tokenizer: Any, added: set[int]) -> list[Piece]:
    """The row as pieces: added tokens alone, the rest split where the trained flag changes (the template's
    segments, tokenized one by one when cached); each ordinary piece decoded to its text."""
    pieces: list[Piece] = []
    start = 0
    n = len(ids)
    while start < n:
        if int(ids[start]) in added:
            pieces.append(Piece(start, start + 1, bool(flags[start]), None))
            start += 1
            continue
        stop = start + 1
        while stop < n and int(ids[stop]) not in added and flags[stop] == flags[start]:
            stop += 1
        text = tokenizer.decode([int(i) for i in ids[start:stop]], clean_up_tokenization_spaces=False)
        pieces.append(Piece(start, stop, bool(flags[start]), text))
        start = stop
    return pieces


def added_ids(tokenizer: Any) -> set[int]:
    """The ids that are tokens, never text: added tokens and the special ones (EOS/BOS/PAD/...), also when
    a tokenizer keeps a special token in its base vocabulary (decoded, it would be literal text)."""
    special = getattr(tokenizer, "all_special_ids", [])
    return set(getattr(tokenizer, "added_tokens_decoder", {})) | set(special)


def student_encoding(pieces: list[Piece], teacher_ids: np.ndarray, student: Any, vmap: VocabMap) -> list[int]:
    """The student's own tokenization of the pieces: text by the student's tokenizer, special tokens as tokens
    through the map (the teacher's EOS/BOS/PAD stand for the student's own; -1 where it has none). A leading
    special token the student lacks (DeepSeek's BOS before a Qwen3 student) is left out, as the student adds
    no such token and `remap_example` drops it."""
    texts = [p.text for p in pieces if p.text is not None]
    encoded = iter(student(texts, add_special_tokens=False)["input_ids"] if texts else [])
    out: list[int] = []
    for p in pieces:
        if p.text is not None:
            out += next(encoded)
            continue
        mapped = int(vmap.ids[int(teacher_ids[p.start])])
        if mapped >= 0 or out:
            out.append(mapped)
    return out


@dataclass
class Remapped:
    input_ids: np.ndarray
    positions: np.ndarray
    topk_ids: np.ndarray  # -1 where the teacher id has no student counterpart
    keep: np.ndarray  # which cached positions survive (bool [P])


def remap_example(example: Any, vmap: VocabMap, fallback_id: int, added: set[int]) -> Remapped:
    """The cached row in the student's ids (see the module doc)."""
    ids = vmap.ids[np.asarray(example.input_ids, np.int64)]
    drop = 0
    while drop < len(ids) - 1 and ids[drop] < 0 and int(example.input_ids[drop]) in added:
        drop += 1  # a leading special token (BOS) the student has no counterpart of
    ids = np.where(ids[drop:] < 0, fallback_id, ids[drop:])
    positions = np.asarray(example.positions, np.int64) - drop
    keep = positions >= 0
    t = example.targets.topk_ids.astype(np.int64)
    mapped = np.where(t < len(vmap.ids), vmap.ids[np.minimum(t, len(vmap.ids) - 1)], -1)
    return Remapped(ids, positions[keep], mapped[keep], keep)


# ---------------------------------------------------------------- coverage


def coverage(examples: Any, vmap: VocabMap, teacher: Any, student: Any, limit: int = 0) -> dict[str, Any]:
    """Mass on mapped ids and identically tokenized rows over the cache's first `limit` rows (0: all)."""
    added = added_ids(teacher)
    fallback = fallback_id(student)
    prefix = leading_special(student)
    mapped_total = token_total = 0.0
    rows = same = 0
    first_diff: str | None = None
    for e in examples:
        on_mapped, on_tokens = mapped_mass(e, vmap)
        mapped_total, token_total = mapped_total + on_mapped, token_total + on_tokens
        pieces = text_pieces(e.input_ids, trained_flags(e), teacher, added)
        own = student_encoding(pieces, e.input_ids, student, vmap)
        remapped = remap_example(e, vmap, fallback, added)
        if own == remapped.input_ids.tolist() or prefix + own == remapped.input_ids.tolist():
            same += 1
        elif first_diff is None:
            first_diff = e.id
        rows += 1
        if limit and rows >= limit:
            break
    return {"mass": mapped_total / token_total if token_total > 0 else 1.0,
            "rows": same / rows if rows else 1.0, "rows_checked": rows, "rows_identical": same,
            "first_differing_row": first_diff}


def mapped_mass(example: Any, vmap: VocabMap) -> tuple[float, float]:
    """The row's cached top-k mass on ids with a student counterpart, and on real tokens (not head
    padding)."""
    lp = example.targets.topk_logprobs.astype(np.float64)
    t = example.targets.topk_ids.astype(np.int64)
    real = np.isfinite(lp) & (t < vmap.teacher_tokens)
    p = np.where(real, np.exp(np.where(real, lp, 0.0)), 0.0)
    return float(p[real & (vmap.ids[np.where(real, t, 0)] >= 0)].sum()), float(p.sum())


def leading_special(tokenizer: Any) -> list[int]:
    from kdpipe.data.tokenize import special_prefix

    return special_prefix(tokenizer)


def fallback_id(student: Any) -> int:
    """What an input token without a student counterpart becomes."""
    for i in (getattr(student, "unk_token_id", None), student.eos_token_id, student.pad_token_id):
        if i is not None:
            return int(i)
    return 0


def load_teacher_tokenizer(manifest: Manifest, override: str | None, cache_path: Any) -> Any:
    """The cache's teacher tokenizer (manifest tokenizer.name, or --teacher-tokenizer)."""
    from kdpipe.models import load_tokenizer, vocab_hash

    name = override or manifest.tokenizer.name
    try:
        tokenizer = load_tokenizer(name)
    except KdpipeError as e:
        raise KdpipeError(
            f"the student has another tokenizer than the cache's teacher, and matching the two needs the "
            f"teacher's tokenizer, which cannot be loaded: {e}. Pass --teacher-tokenizer PATH (a folder "
            f"or hub id with the tokenizer the cache {cache_path} was made with)") from None
    if vocab_hash(tokenizer) != manifest.tokenizer.vocab_hash:
        what = f"--teacher-tokenizer {name}" if override else f"the manifest's teacher tokenizer {name}"
        raise KdpipeError(f"{what} is not the tokenizer the cache {cache_path} was made with (its vocabulary "
                          "hash differs from the manifest's); pass --teacher-tokenizer PATH with that one")
    return tokenizer


def check_coverage(found: dict[str, Any], threshold: float, student_name: str, teacher_name: str) -> None:
    """Refuse a remapped cache below `threshold` of the mass or of the rows, naming --cross-tokenizer."""
    if found["mass"] >= threshold and found["rows"] >= threshold:
        return
    raise KdpipeError(
        f"the student {student_name} has another tokenizer than the cache's teacher ({teacher_name}) and the "
        f"two do not match well enough to reuse the cached ids: {found['mass']:.2%} of the teacher's cached "
        f"probability mass is on tokens the student has, and {found['rows']:.2%} of {found['rows_checked']} "
        f"rows tokenize identically (both must be at least --min-coverage {threshold:g}; first differing "
        f"row: {found['first_differing_row']}). Use --cross-tokenizer to align the two tokenizations by "
        "character offsets instead, or pick a student of the teacher's family"
    )
