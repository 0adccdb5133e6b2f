"""Which route train-student takes for the student's vocabulary, and the collator that goes with it.

* identical tokenizers (same vocabulary hash): today's route, nothing is remapped;
* another tokenizer over the same tokens (a shared BPE whose special tokens sit at other ids, heads
  padded differently): the cached ids are mapped by token string (`kdpipe.vocab.map`), provided the
  coverage reaches ``--min-coverage`` (else a refusal naming ``--cross-tokenizer``);
* ``--cross-tokenizer``: the student tokenizes the text itself; teacher and student tokens are aligned by
  character offsets (`kdpipe.vocab.cross_tokenizer`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe.cache.format import CachedExample, Targets
from kdpipe.errors import KdpipeError
from kdpipe.vocab import map as vm

log = logging.getLogger(__name__)

COVERAGE_ROWS = 2000  # rows checked before training: enough for a share to 0.1 %, seconds to tokenize


@dataclass
class StudentVocab:
    """The route: "mapped" or "cross" (None from `choose` means identical tokenizers)."""

    route: str
    vmap: vm.VocabMap
    teacher_tokenizer: Any
    coverage: dict[str, Any]

    def record(self) -> dict[str, Any]:
        return {"route": self.route, "map": self.vmap.summary(), "coverage": self.coverage}


def choose(cfg: Any, cache: Any, tokenizer: Any) -> StudentVocab | None:
    """None for identical tokenizers (unless --cross-tokenizer); else the mapped or the cross route."""
    from kdpipe.models import vocab_hash

    manifest = cache.manifest
    same = vocab_hash(tokenizer) == manifest.tokenizer.vocab_hash
    if same and not cfg.cross_tokenizer:
        return None
    teacher = vm.load_teacher_tokenizer(manifest, cfg.teacher_tokenizer, cache.path)
    vmap = vm.build_map(teacher, tokenizer, manifest.teacher.vocab_size)
    if cfg.cross_tokenizer:
        from kdpipe.vocab import cross_tokenizer

        found = cross_tokenizer.coverage(cache, vmap, teacher, tokenizer, COVERAGE_ROWS)
        echo_coverage("cross-tokenizer", vmap, found)
        return StudentVocab("cross", vmap, teacher, found)
    found = vm.coverage(cache.iter_examples(), vmap, teacher, tokenizer, COVERAGE_ROWS)
    echo_coverage("vocabulary map", vmap, found)
    vm.check_coverage(found, cfg.min_coverage, cfg.model, manifest.tokenizer.name)
    return StudentVocab("mapped", vmap, teacher, found)


def echo_coverage(what: str, vmap: vm.VocabMap, found: dict[str, Any]) -> None:
    line = (f"{what}: {vmap.mapped} of {vmap.teacher_tokens} teacher tokens have a student counterpart; "
            f"{found['mass']:.2%} of the cached teacher mass is on them")
    if "aligned" in found:
        line += (f"; {found['aligned']:.2%} of the student's target positions align with a teacher position "
                 f"({found['rows_checked']} rows checked)")
    else:
        line += f"; {found['rows']:.2%} of {found['rows_checked']} rows tokenize identically"
    log.info(line)


def save(choice: StudentVocab, out: Path) -> None:
    """The map into the run folder and the route and coverage into its run record."""
    import json
    import os

    from kdpipe.models import vocab_hash
    from kdpipe.run_folder import RUN_FILE

    if int(os.environ.get("RANK", "0")) != 0:  # the main process records the run
        return
    choice.vmap.save(out, {"teacher_tokenizer": getattr(choice.teacher_tokenizer, "name_or_path", None),
                           "teacher_vocab_hash": vocab_hash(choice.teacher_tokenizer)})
    path = out / RUN_FILE
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    record["student_vocab"] = choice.record()
    from kdpipe.cache.storage import write_atomic

    write_atomic(path, (json.dumps(record, indent=2, default=str) + "\n").encode())


class RemapCollator:
    """`DistillCollator` on rows remapped to the student's ids; unmapped top-k ids join the tail."""

    def __init__(self, inner: Any, vmap: vm.VocabMap, student: Any, teacher: Any):
        self.inner, self.vmap = inner, vmap
        self.fallback = vm.fallback_id(student)
        self.added = vm.added_ids(teacher)

    def __call__(self, rows: Any) -> Any:
        return self.inner([self.remap(r) for r in rows])

    def remap(self, row: CachedExample) -> CachedExample:
        r = vm.remap_example(row, self.vmap, self.fallback, self.added)
        t = row.targets
        outside = self.inner.student_vocab  # an id the head cannot produce: masked, its mass to the tail
        ids = np.where(r.topk_ids < 0, outside, r.topk_ids)
        targets = Targets(ids, t.topk_logprobs[r.keep], t.target_logprob[r.keep], t.tail_mass[r.keep],
                          None if t.sample_counts is None else t.sample_counts[r.keep])
        return CachedExample(row.id, r.input_ids.astype(np.int64), r.positions.astype(np.int32), targets)


def collator(choice: StudentVocab | None, inner: Any, student: Any, cfg: Any, model_vocab: int,
             **packing: Any) -> Any:
    """The batch collator of the route (`packing`: `DistillCollator`'s packed and pack_length)."""
    if choice is None:
        return inner
    if choice.route == "mapped":
        return RemapCollator(inner, choice.vmap, student, choice.teacher_tokenizer)
    from kdpipe.vocab import cross_tokenizer

    return cross_tokenizer.CrossCollator(choice.vmap, choice.teacher_tokenizer, student, model_vocab,
                                         **packing)


def check_options(cfg: Any) -> None:
    if not 0.0 <= cfg.min_coverage <= 1.0:
        raise KdpipeError(f"--min-coverage must be in [0, 1], not {cfg.min_coverage}")
    if cfg.uld_weight < 0:
        raise KdpipeError(f"--uld-weight must not be negative, not {cfg.uld_weight}")
    if cfg.uld_weight > 0 and not cfg.cross_tokenizer:
        raise KdpipeError("--uld-weight needs --cross-tokenizer (ULD pairs positions of two tokenizations)")


def fidelity_rows(cache: Any, student: Any, limit: int | None, min_coverage: float = 0.99,
                  teacher_tokenizer: str | None = None) -> tuple[list[CachedExample], str]:
    """The cache's first `limit` rows in the student's vocabulary, for `kdpipe evaluate`'s fidelity.

    Mapped route when the coverage reaches `min_coverage`; else the positions aligned by character
    offsets (`kdpipe.vocab.cross_tokenizer`), with the teacher's top-k projected onto the student's ids.
    Teacher ids without a counterpart get an id past any vocabulary, so fidelity counts them in the tail.
    Returns the rows and a note saying which route was taken.
    """
    from kdpipe.vocab import cross_tokenizer

    outside = np.iinfo(np.int32).max
    teacher = vm.load_teacher_tokenizer(cache.manifest, teacher_tokenizer, cache.path)
    vmap = vm.build_map(teacher, student, cache.manifest.teacher.vocab_size)
    rows = []
    for e in cache.iter_examples():
        if limit and len(rows) >= limit:
            break
        rows.append(e)
    found = vm.coverage(rows, vmap, teacher, student)
    if found["mass"] >= min_coverage and found["rows"] >= min_coverage:
        remap = RemapCollator(_Outside(outside), vmap, student, teacher).remap
        return [remap(e) for e in rows], (f"fidelity through the vocabulary map ({found['rows']:.2%} of rows "
                                          f"tokenize identically, {found['mass']:.2%} of the mass mapped)")
    cross_tokenizer.require_offsets(teacher, "teacher")
    cross_tokenizer.require_offsets(student, "student")
    added, out = vm.added_ids(teacher), []
    for e in rows:
        try:
            a = cross_tokenizer.align(e, teacher, student, vmap, added)
        except cross_tokenizer.RowWithoutText:
            continue
        keep = a.kd >= 0
        src = a.kd[keep]
        t = e.targets
        ids = t.topk_ids[src].astype(np.int64)
        ids = np.where(ids < len(vmap.ids), vmap.ids[np.minimum(ids, len(vmap.ids) - 1)], -1)
        targets = Targets(np.where(ids < 0, outside, ids), t.topk_logprobs[src], t.target_logprob[src],
                          t.tail_mass[src])
        out.append(CachedExample(e.id, a.input_ids, a.ce_positions[keep].astype(np.int32), targets))
    aligned = sum(len(r.positions) for r in out)
    return out, (f"fidelity on the {aligned} student positions aligned with the teacher's by character "
                 "offsets (its tokenizer differs from the cache's teacher)")


class _Outside:
    """What `RemapCollator.remap` needs of its inner collator: the id unmapped targets get."""

    def __init__(self, student_vocab: int):
        self.student_vocab = student_vocab
