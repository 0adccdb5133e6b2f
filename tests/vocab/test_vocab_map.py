"""A student whose tokenizer shares the teacher's BPE but not its ids (issue 16, part 1): the map by token
string, the remapped sparse loss against an independent reference, coverage and the refusal below it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from helpers import expect_error, run_cli, student_kwargs


def moved_specials(tokenizer, extra=("<|im_start|>", "<|im_end|>"), rename=None):
    """The same BPE (same tokens and merges) with its special tokens moved to the end and two more added."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    data = json.loads(tokenizer.backend_tokenizer.to_str())
    specials = [t["content"] for t in data["added_tokens"]]
    ordinary = sorted((i, t) for t, i in data["model"]["vocab"].items() if t not in specials)
    specials = [(rename or {}).get(t, t) for t in specials]
    vocab = {t: n for n, (_, t) in enumerate(ordinary)}
    for s in (*extra, *specials):
        vocab[s] = len(vocab)
    data["model"]["vocab"] = vocab
    flags = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
    data["added_tokens"] = [{"id": vocab[s], "content": s, **flags} for s in (*extra, *specials)]
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)),
                                   eos_token=specials[0], pad_token="<|pad|>")


@pytest.fixture(scope="module")
def shifted(world):
    """A student over the teacher's BPE, other special-token ids, head padded by 40 (the teacher's by 16)."""
    from kdpipe import tiny

    tok = moved_specials(world.tokenizer)
    path = world.root / "models" / "shifted"
    if not path.exists():
        tiny.init_model(path, tok, vocab_size=len(tok) + 40, seed=5, **student_kwargs())
    return tok, path


def test_the_map_is_exact_and_padded_rows_map_to_nothing(world, shifted):
    from kdpipe.vocab.map import build_map

    tok, _ = shifted
    teacher = world.tokenizer
    assert tok.convert_tokens_to_ids("<|endoftext|>") != teacher.convert_tokens_to_ids("<|endoftext|>")
    vmap = build_map(teacher, tok, len(teacher) + 16)
    expected = [tok.convert_tokens_to_ids(teacher.convert_ids_to_tokens(i)) for i in range(len(teacher))]
    assert vmap.ids[: len(teacher)].tolist() == expected
    assert (vmap.ids[len(teacher):] == -1).all() and len(vmap.ids) == len(teacher) + 16
    assert vmap.mapped == len(teacher) and vmap.unmapped == {"ordinary": 0, "added": 0}


def test_an_eos_of_other_content_stands_for_the_students_eos(world):
    from kdpipe.vocab.map import build_map

    teacher = world.tokenizer
    student = moved_specials(teacher, extra=(), rename={"<|endoftext|>": "<|im_end|>"})
    vmap = build_map(teacher, student)
    assert vmap.ids[teacher.eos_token_id] == student.convert_tokens_to_ids("<|im_end|>")
    assert vmap.ids[teacher.pad_token_id] == student.pad_token_id and vmap.unmapped["added"] == 0


def reference_batch(rows, teacher, student, student_vocab):
    """Independently remapped targets: ids through the token strings; padded ids masked, mass to the tail."""
    def to_student(i):
        if i >= len(teacher):
            return None
        return student.convert_tokens_to_ids(teacher.convert_ids_to_tokens(int(i)))

    ids_out, lp_out, tail_out, labels, inputs = [], [], [], [], []
    for r in rows:
        inputs.append([to_student(i) for i in r.input_ids])
        labels += [to_student(r.input_ids[p + 1]) for p in r.positions]
        for ids, lp, tail in zip(r.targets.topk_ids, r.targets.topk_logprobs, r.targets.tail_mass):
            mapped = [to_student(i) for i in ids]
            moved = sum(math.exp(float(v)) for m, v in zip(mapped, lp) if m is None)
            ids_out.append([0 if m is None else m for m in mapped])
            lp_out.append([-math.inf if m is None else float(v) for m, v in zip(mapped, lp)])
            tail_out.append(float(tail) + moved)
    return inputs, labels, ids_out, lp_out, tail_out


def test_remapped_sparse_loss_equals_an_independent_reference(world, shifted):
    from kdpipe.cache.reader import open_cache
    from kdpipe.losses import DistillLossConfig, SparseTargets, distill_loss
    from kdpipe.train.data import DistillCollator
    from kdpipe.vocab.map import build_map
    from kdpipe.vocab.routes import RemapCollator

    tok, _ = shifted
    student_vocab = len(tok) + 40
    rows = list(open_cache(world.padded_cache).iter_examples())[:6]
    assert any((r.targets.topk_ids >= len(world.tokenizer)).any() for r in rows)  # padded ids are cached
    vmap = build_map(world.tokenizer, tok, len(world.tokenizer) + 16)
    inner = DistillCollator(tok.pad_token_id, student_vocab, 8)
    batch = RemapCollator(inner, vmap, tok, world.tokenizer)(rows)
    inputs, labels, ids, lp, tail = reference_batch(rows, world.tokenizer, tok, student_vocab)
    for b, row in enumerate(inputs):
        assert batch["input_ids"][b, : len(row)].tolist() == row
    assert batch["labels"].tolist() == labels
    assert batch["topk_ids"].tolist() == ids
    torch.testing.assert_close(batch["tail_mass"], torch.tensor(tail), rtol=1e-5, atol=1e-6)
    logits = torch.randn(len(labels), student_vocab, generator=torch.Generator().manual_seed(0))
    for loss in ("fkl", "rkl", "jsd"):
        cfg = DistillLossConfig(loss=loss, alpha=0.7, fused=False)
        mine = SparseTargets(batch["topk_ids"], batch["topk_logprobs"], batch["tail_mass"], batch["labels"])
        theirs = SparseTargets(torch.tensor(ids), torch.tensor(lp, dtype=torch.float32), torch.tensor(tail),
                               torch.tensor(labels))
        got = distill_loss(logits, lambda x: x, mine, cfg)
        ref = distill_loss(logits, lambda x: x, theirs, cfg)
        torch.testing.assert_close(got, ref)


def test_shared_bpe_trains_without_an_option_and_reports_full_coverage(world, shifted, tmp_path):
    _, student = shifted
    out = tmp_path / "run"
    result = run_cli("train-student", "--cache", world.padded_cache, "--model", student, "--output", out,
                     "--max-steps", 2, "--batch-size", 4, "--full", "--precision", "fp32")
    assert "100.00% of the cached teacher mass" in result.output
    assert "100.00% of 16 rows tokenize identically" in result.output
    record = json.loads((out / "kdpipe_run.json").read_text())
    assert record["status"] == "complete"
    cov = record["student_vocab"]["coverage"]
    assert record["student_vocab"]["route"] == "mapped" and cov["mass"] == 1.0 and cov["rows"] == 1.0
    saved = json.loads((out / "vocab_map.json").read_text())
    assert len(saved["teacher_to_student"]) == len(world.tokenizer) + 16
    assert saved["mapped"] == len(world.tokenizer)


def test_identical_tokenizers_take_no_remap_path(world, tmp_path, monkeypatch):
    from kdpipe.vocab import routes as student_vocab

    monkeypatch.setattr(student_vocab, "RemapCollator", None)  # would fail if the mapped route were taken
    out = tmp_path / "run"
    run_cli("train-student", "--cache", world.cache, "--model", world.student, "--output", out,
            "--max-steps", 1, "--batch-size", 4, "--full", "--precision", "fp32")
    record = json.loads((out / "kdpipe_run.json").read_text())
    assert "student_vocab" not in record and not (out / "vocab_map.json").exists()


def test_a_student_tokenizing_otherwise_is_refused_with_both_figures(world, tmp_path):
    result = expect_error("train-student", "--cache", world.cache, "--model", world.other_student,
                          "--output", tmp_path / "r", "--max-steps", 1, match="another tokenizer")
    text = " ".join(result.output.split())
    assert "--cross-tokenizer" in text and "of the teacher's cached probability mass" in text
    assert "rows tokenize identically" in text and "--min-coverage 0.99" in text
    assert not (tmp_path / "r").exists()


def test_rows_differ_when_the_student_merges_otherwise(world):
    from kdpipe.cache.reader import open_cache
    from kdpipe.models import load_tokenizer
    from kdpipe.vocab.map import build_map, coverage

    other = load_tokenizer(str(world.other_student))
    vmap = build_map(world.tokenizer, other, len(world.tokenizer))
    found = coverage(open_cache(world.cache).iter_examples(), vmap, world.tokenizer, other)
    assert found["rows_checked"] == 64 and found["rows"] < 0.99
    assert vmap.unmapped["ordinary"] == len(world.tokenizer) - len(other)
    assert np.isclose(found["mass"], found["mass"])  # a number


def test_evaluate_fidelity_goes_through_the_map(world, shifted, tmp_path):
    from kdpipe.cache.reader import open_cache
    from kdpipe.stages import evaluate

    _, student = shifted
    cfg = evaluate.EvaluateConfig(model=[str(student)], cache=str(world.padded_cache), device="cpu",
                                  dtype="fp32", output=str(tmp_path / "eval"))
    (result,) = evaluate.run(cfg, echo=lambda *_: None)["models"]
    positions = sum(len(e.positions) for e in open_cache(world.padded_cache).iter_examples())
    assert result["metrics"]["fidelity/positions"] == positions
    assert any("through the vocabulary map (100.00% of rows" in n for n in result["notes"])
