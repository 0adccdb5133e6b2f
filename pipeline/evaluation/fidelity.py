"""Fidelity to the teacher on a held-out cache: KL over k+1 atoms, top-1 agreement, top-k recall and
calibration of each model against the teacher's cached top-k (the metrics are `kdpipe.evaluation.metrics`)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from kdpipe.errors import KdpipeError
from kdpipe.evaluation.runs import read_json, run_caches
from kdpipe.run_folder import RUN_FILE


def open_heldout(location: str, echo: Callable[[str], None] = print, specs: Sequence[Any] = (),
                 verify: str = "fast") -> Any:
    """The held-out cache (checked); a note when its examples are in a run's training cache (or, with no
    run to compare with, when nothing says it is held out)."""
    from kdpipe.cache.verified import open_checked

    cache = open_checked(location, verify)
    data = cache.manifest.dataset
    records = [read_json(s.run / RUN_FILE, quiet=True) for s in specs if s.run]
    trained = [t for t in {c for r in records for c in run_caches(r)} if t and _exists(t)]
    if trained:
        mine = example_hashes(cache)
        for other in sorted(trained):
            shared = len(mine & example_hashes(open_checked(other, verify)))
            if shared:
                echo(f"note: {shared} of the {len(mine)} examples of cache {location} are also in {other}, "
                     "the training cache of a run evaluated here; fidelity on training data flatters a "
                     "student")
    elif not (data.heldout or data.part == "heldout" or data.split != "train"):
        echo(f"note: cache {location} is of training data as far as its manifest says (split=train, "
             f"part={data.part}); fidelity on training data flatters a student. A separate test file: "
             "cache it with --heldout")
    return cache


def example_hashes(cache: Any) -> set[bytes]:
    """sha256 of each cached example's token ids (ids like train-0 repeat across files; the tokens do not)."""
    hashes = set()
    for ids in cache.iter_input_ids():  # through the cache's store: a folder or an object-storage URL
        hashes.add(hashlib.sha256(np.asarray(ids, np.int64).tobytes()).digest())
    return hashes


def _exists(location: str) -> bool:
    from kdpipe.cache.manifest import read_manifest

    try:
        return bool(read_manifest(location))
    except (KdpipeError, OSError):
        return False


def fidelity(model: Any, tokenizer: Any, cache: Any, cfg: Any, spec: Any) -> dict[str, float]:
    """KL(teacher‖student) over k+1 atoms, top-1 agreement, top-k recall, ECE on the cache
    (see kdpipe.evaluation.metrics)."""
    import torch

    from kdpipe.cache.sections import SparseMode
    from kdpipe.evaluation import metrics, scoring
    from kdpipe.models import vocab_hash

    manifest = cache.manifest
    if manifest.sparse.mode is not SparseMode.TOPK:
        mode = manifest.sparse.mode.value
        spec.notes.append(f"no fidelity: cache {cache.path} is {mode}; fidelity needs a top-k cache")
        return {}
    rows = []
    if vocab_hash(tokenizer) != manifest.tokenizer.vocab_hash:  # another tokenizer: by token string
        from kdpipe.errors import KdpipeError
        from kdpipe.vocab import routes as student_vocab

        try:
            rows, note = student_vocab.fidelity_rows(cache, tokenizer, cfg.cache_limit)
        except KdpipeError as e:
            spec.notes.append(f"no fidelity: {e.message}")
            return {}
        spec.notes.append(note)
        rows = [r for r in rows if len(r.positions)]
        if not rows:
            return {}
    for example in cache.iter_examples() if not rows else ():
        rows.append(example)
        if cfg.cache_limit and len(rows) >= cfg.cache_limit:
            break

    def column(values: list[np.ndarray], dtype: Any) -> torch.Tensor:
        return torch.as_tensor(np.concatenate(values).astype(dtype))

    ids = column([r.targets.topk_ids for r in rows], np.int64)
    logprobs = column([r.targets.topk_logprobs for r in rows], np.float32)
    tail = column([r.targets.tail_mass for r in rows], np.float32)
    labels = column([r.labels for r in rows], np.int64)

    def fn(logp: torch.Tensor, flat: slice) -> dict[str, torch.Tensor]:
        dev = logp.device
        return metrics.fidelity_stats(logp, ids[flat].to(dev), logprobs[flat].to(dev), tail[flat].to(dev),
                                      labels[flat].to(dev))

    stats = scoring.map_positions(model, [r.input_ids for r in rows], [r.positions for r in rows], fn,
                                  tokenizer.pad_token_id, cfg.batch_size, cfg.max_batch_tokens,
                                  desc=f"{spec.name}: fidelity")
    return metrics.summarize_fidelity(stats)
