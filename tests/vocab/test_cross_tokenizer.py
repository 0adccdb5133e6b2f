"""`--cross-tokenizer` (issue 16, part 2): alignment by character offsets against hand-checked strings,
projected targets, a distilled student closer to the teacher than untrained and SFT-only, bad input."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from helpers import expect_error, run_cli, student_kwargs

SPECIALS = ["<|endoftext|>", "<|pad|>"]


def bpe(merges: list[tuple[str, str]], specials_first: bool):
    """A byte-level BPE over the 256 byte characters with exactly these merges (hand-checkable)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + [a + b for a, b in merges]
    tokens = SPECIALS + tokens if specials_first else tokens + SPECIALS
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIALS[0], pad_token=SPECIALS[1])


TEACHER_MERGES = [("Ġ", "h"), ("Ġh", "e"), ("Ġhe", "l"), ("l", "o"), ("Ġ", "w"), ("o", "r"), ("Ġw", "or"),
                  ("l", "d"), ("Ġwor", "ld")]
STUDENT_MERGES = [("Ġ", "h"), ("Ġh", "e"), ("Ġhe", "l"), ("l", "o"), ("Ġ", "w"), ("o", "r"), ("or", "l"),
                  ("orl", "d")]


def example(teacher, k=3):
    """'Q:' (prompt) + ' hello world' (trained) + EOS, tokenized by the teacher as the cache does it."""
    from kdpipe.cache.format import CachedExample, Targets

    prompt = teacher("Q:", add_special_tokens=False)["input_ids"]
    answer = teacher(" hello world", add_special_tokens=False)["input_ids"]
    ids = np.array(prompt + answer + [teacher.eos_token_id], np.int32)
    positions = np.arange(len(prompt) - 1, len(ids) - 1, dtype=np.int32)
    top = [teacher.convert_tokens_to_ids(t) for t in ("Ġhel", "Ġworld", "lo")]
    topk = np.array([top[i % 3:] + top[: i % 3] for i in range(len(positions))], np.int32)[:, :k]
    logprobs = np.log(np.array([[0.5, 0.3, 0.1]] * len(positions), np.float32))
    targets = Targets(topk, logprobs, logprobs[:, 0].copy(), np.full(len(positions), 0.1, np.float32))
    return CachedExample("ex", ids, positions, targets)


def test_alignment_and_projection_on_hand_checked_strings():
    from kdpipe.vocab.cross_tokenizer import CrossCollator, align
    from kdpipe.vocab.map import added_ids, build_map

    teacher, student = bpe(TEACHER_MERGES, True), bpe(STUDENT_MERGES, False)
    e = example(teacher)
    eos = SPECIALS[0]
    assert teacher.convert_ids_to_tokens(e.input_ids.tolist()) == ["Q", ":", "Ġhel", "lo", "Ġworld", eos]
    vmap = build_map(teacher, student)
    a = align(e, teacher, student, vmap, added_ids(teacher))
    assert student.convert_ids_to_tokens(a.input_ids.tolist()) == ["Q", ":", "Ġhel", "lo", "Ġw", "orld", eos]
    # character axis: Q [0,1) : [1,2) | Ġhel [2,6) lo [6,8) Ġworld [8,14) | EOS [14,15) (one unit)
    # student:                          Ġhel [2,6) lo [6,8) Ġw [8,10) orld [10,14) | EOS [14,15)
    assert a.ce_positions.tolist() == [1, 2, 3, 4, 5]  # positions predicting Ġhel, lo, Ġw, orld, EOS
    assert a.kd.tolist() == [0, 1, -1, -1, 3]  # Ġhel, lo and EOS coincide with teacher tokens 2, 3, 5
    assert a.pair.tolist() == [0, 1, 2, 2, 3]  # Ġw and orld start inside the teacher's Ġworld
    batch = CrossCollator(vmap, teacher, student, len(student))([e])
    assert batch["kd_index"].tolist() == [0, 1, 4]
    s = student.convert_tokens_to_ids
    # teacher top-3 at cached positions 0, 1, 3: rotations of (Ġhel, Ġworld, lo); Ġworld has no student token
    expected = [[s("Ġhel"), 0, s("lo")], [0, s("lo"), s("Ġhel")], [s("Ġhel"), 0, s("lo")]]
    assert batch["topk_ids"].tolist() == expected
    lp = batch["topk_logprobs"]
    assert lp[0, 1] == -math.inf and lp[1, 0] == -math.inf and torch.isfinite(lp[2, 0])
    torch.testing.assert_close(batch["tail_mass"], torch.tensor([0.4, 0.6, 0.4]))
    assert batch["labels"].tolist() == [s(t) for t in ("Ġhel", "lo", "Ġw", "orld")] + [student.eos_token_id]
    assert batch["uld_index"].tolist() == [0, 1, 2, 3, 4]


def test_a_character_split_into_bytes_aligns_only_as_a_whole():
    from kdpipe.vocab.cross_tokenizer import spans

    # "aé": a [0,1), then é's two bytes as two tokens both ending at 2: neither alone is whole
    starts, whole = spans(np.array([1, 2, 2, 3]))
    assert starts.tolist() == [0, 1, 2, 2] and whole.tolist() == [True, False, False, True]


def test_uld_is_the_sorted_probability_distance():
    from kdpipe.vocab.uld import uld_loss

    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0]])
    q = logits.softmax(-1)[0].sort(descending=True).values
    p = torch.tensor([0.6, 0.3])
    expected = (q[:2] - p).abs().sum() + ((1 - q[:2].sum()) - 0.1).abs()
    got = uld_loss(logits, lambda x: x, p.log().unsqueeze(0), torch.tensor([0.1]))
    torch.testing.assert_close(got, expected)


def test_cross_loss_is_kd_on_aligned_ce_on_all_and_uld_on_paired():
    from kdpipe.losses import DistillLossConfig
    from kdpipe.vocab.uld import cross_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, generator=g, dtype=torch.float64)
    labels = torch.tensor([1, 2, 3, 4, 5])
    kd = torch.tensor([0, 3])
    ids = torch.tensor([[1, 2], [4, 0]])
    lp = torch.log(torch.tensor([[0.5, 0.2], [0.6, 0.0]]))  # second row: one padded id (-inf)
    tail = torch.tensor([0.3, 0.4])
    uld = torch.tensor([1, 2])
    inputs = {"labels": labels, "kd_index": kd, "topk_ids": ids, "topk_logprobs": lp.float(),
              "tail_mass": tail,
              "uld_index": uld, "uld_logprobs": lp[:, :1].float(), "uld_tail": torch.tensor([0.5, 0.4])}
    cfg = DistillLossConfig(loss="fkl", alpha=0.25, fused=False)
    got = cross_loss(logits, lambda x: x, inputs, cfg, uld_weight=2.0)
    q = logits.softmax(-1)
    ce = -q.log()[torch.arange(5), labels].sum()
    div = 0.0
    for row, (i, ps, t) in enumerate(zip(kd.tolist(), lp.exp().tolist(), tail.tolist())):
        valid = [j for j, p in zip(ids[row].tolist(), ps) if p > 0]
        p_atoms = [p for p in ps if p > 0] + [t]
        q_atoms = [q[i, j] for j in valid] + [1 - sum(q[i, j] for j in valid)]
        div += sum(p * math.log(p / qa) for p, qa in zip(p_atoms, q_atoms))
    distance = 0.0
    for i, p, t in zip(uld.tolist(), lp[:, 0].exp().tolist(), [0.5, 0.4]):
        top = q[i].max()
        distance += abs(top - p) + abs((1 - top) - t)
    expected = (0.25 * div + 0.75 * ce + 2.0 * distance) / 5
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- training on a real cache


@pytest.fixture(scope="module")
def cross_world(world):
    """A peaked teacher (world's tokenizer) cached on 48 examples, and a student with another BPE."""
    from helpers import texts as _texts

    from kdpipe import tiny
    from kdpipe.stages import cache_teacher

    root = world.root / "cross"
    teacher, student = root / "teacher", root / "student"
    if not root.exists():
        model = tiny.init_model(teacher, world.tokenizer, seed=7)
        with torch.no_grad():
            model.lm_head.weight.mul_(12.0)  # a confident teacher: far from any untrained student
        model.save_pretrained(teacher)
        corpus = [t.replace("Answer:", "Answer is") for t in _texts(300)[::-1]]
        tiny.init_model(student, tiny.train_tokenizer(corpus, vocab_size=360), seed=8, **student_kwargs())
        cfg = cache_teacher.CacheTeacherConfig(model=str(teacher), dataset="kdpipe:arithmetic", limit=48,
                                               top_k=16, cache=str(root / "cache"), device="cpu")
        cache_teacher.run(cfg, "test")
    return teacher, student, root / "cache"


def byte_ends(tokenizer, ids):
    """End of each token on a byte axis (added tokens one unit), from the token strings alone."""
    from kdpipe.vocab.map import bytes_to_unicode

    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    added = set(tokenizer.added_tokens_decoder)
    ends, at = [], 0
    for i, token in zip(ids, tokenizer.convert_ids_to_tokens(list(ids))):
        at += 1 if i in added else len(bytes(byte_of[c] for c in token))
        ends.append(at)
    return ends


def aligned_kl(teacher_dir, student_dir, cache_dir, rows=24, with_count=False):
    """KL(teacher || student) over the mapped vocabulary at aligned positions, computed independently:
    the student's tokens from kdpipe.data.tokenize (as a cache of its own), spans from the token bytes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdpipe.cache.reader import open_cache
    from kdpipe.data.sources import load_examples
    from kdpipe.data.templates import get_template
    from kdpipe.data.tokenize import tokenize_examples
    from kdpipe.stages.cache_teacher import CacheTeacherConfig

    t_tok = AutoTokenizer.from_pretrained(str(teacher_dir))
    s_tok = AutoTokenizer.from_pretrained(str(student_dir))
    t_model = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32).eval()
    s_model = AutoModelForCausalLM.from_pretrained(str(student_dir), dtype=torch.float32).eval()
    t_strings, s_vocab = t_tok.convert_ids_to_tokens(list(range(len(t_tok)))), s_tok.get_vocab()
    pairs = [(i, s_vocab[t]) for i, t in enumerate(t_strings) if t in s_vocab]
    t_cols, s_cols = torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])
    cfg = CacheTeacherConfig(model=str(student_dir), dataset="kdpipe:arithmetic", limit=48)
    own, _ = tokenize_examples(load_examples(cfg).examples, get_template(cfg.resolved_template()), s_tok, cfg)
    own = {e.id: e for e in own}
    total, count = 0.0, 0
    for e in list(open_cache(cache_dir).iter_examples())[:rows]:
        s = own[e.id]
        t_ends, s_ends = byte_ends(t_tok, e.input_ids.tolist()), byte_ends(s_tok, s.input_ids.tolist())
        t_span = {(t_ends[j - 1], t_ends[j]): j for j in range(1, len(t_ends))}
        with torch.no_grad():
            t_lp = t_model(input_ids=torch.tensor([e.input_ids.tolist()])).logits[0].log_softmax(-1)
            s_lp = s_model(input_ids=torch.tensor([s.input_ids.tolist()])).logits[0].log_softmax(-1)
        cached = set(e.positions.tolist())
        for t in s.positions.tolist():
            j = t_span.get((s_ends[t], s_ends[t + 1]))
            if j is None or j - 1 not in cached:
                continue
            p = t_lp[j - 1, t_cols].log_softmax(-1)
            q = s_lp[t, s_cols].log_softmax(-1)
            total += float((p.exp() * (p - q)).sum())
            count += 1
    assert count > 50, count
    return (total / count, count) if with_count else total / count


def test_cross_tokenizer_student_gets_closer_to_the_teacher_than_untrained_and_sft(cross_world, tmp_path):
    teacher, student, cache = cross_world
    common = ("--model", student, "--max-steps", 40, "--batch-size", 8, "--full", "--lr", 3e-3,
              "--precision", "fp32", "--warmup", 0, "--save-steps", 1000)
    kd = run_cli("train-student", "--cache", cache, "--output", tmp_path / "kd", "--cross-tokenizer",
                 "--alpha", 1.0, *common)
    assert "align with a teacher position" in kd.output
    run_cli("train-student", "--cache", cache, "--output", tmp_path / "sft", "--cross-tokenizer",
            "--alpha", 0.0, *common)
    record = json.loads((tmp_path / "kd" / "kdpipe_run.json").read_text())
    assert record["student_vocab"]["route"] == "cross"
    assert record["student_vocab"]["coverage"]["aligned"] > 0.3
    untrained = aligned_kl(teacher, student, cache)
    distilled = aligned_kl(teacher, tmp_path / "kd", cache)
    sft = aligned_kl(teacher, tmp_path / "sft", cache)
    assert distilled < untrained and distilled < sft, (distilled, untrained, sft)


def test_evaluate_reports_fidelity_on_the_aligned_positions(cross_world, tmp_path):
    from kdpipe.stages import evaluate

    teacher, student, cache = cross_world
    cfg = evaluate.EvaluateConfig(model=[str(teacher), str(student)], cache=str(cache), cache_limit=24,
                                  device="cpu", dtype="fp32", output=str(tmp_path / "eval"))
    first, second = evaluate.run(cfg, echo=lambda *_: None)["models"]
    assert first["metrics"]["fidelity/kl"] < 1e-3
    _, aligned = aligned_kl(teacher, student, cache, with_count=True)
    assert second["metrics"]["fidelity/positions"] == aligned
    assert math.isfinite(second["metrics"]["fidelity/kl"])
    assert any("aligned with the teacher's by character offsets" in n for n in second["notes"])


def test_uld_weight_trains(cross_world, tmp_path):
    _, student, cache = cross_world
    run_cli("train-student", "--cache", cache, "--model", student, "--output", tmp_path / "uld",
            "--cross-tokenizer", "--uld-weight", 0.5, "--max-steps", 2, "--batch-size", 4, "--full",
            "--precision", "fp32")
    losses = [h["loss"] for h in json.loads((tmp_path / "uld" / "kdpipe_run.json").read_text())["log_history"]
              if "loss" in h]
    assert all(math.isfinite(v) for v in losses)


# ---------------------------------------------------------------- bad input


def test_a_student_sharing_almost_nothing_is_refused(world, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from kdpipe import tiny

    words = ["<unk>", "<eos>", "<pad>", "Write", "as", "a", "sum", "of", "two", "positive", "Answer"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")
    path = tmp_path / "words"
    tiny.init_model(path, fast, **student_kwargs())
    result = expect_error("train-student", "--cache", world.cache, "--model", path,
                          "--output", tmp_path / "r", "--cross-tokenizer", "--max-steps", 1,
                          match="shares almost nothing")
    assert "teacher tokens have a student counterpart" in " ".join(result.output.split())
    expect_error("train-student", "--cache", world.cache, "--model", path, "--output", tmp_path / "r",
                 "--max-steps", 1, match="--cross-tokenizer")


def test_a_tokenizer_without_offsets_is_named():
    from transformers.tokenization_python import PreTrainedTokenizer

    from kdpipe.errors import KdpipeError
    from kdpipe.vocab.cross_tokenizer import require_offsets

    class Chars(PreTrainedTokenizer):  # a Python ("slow") tokenizer: no character offsets
        vocab = {c: i for i, c in enumerate("abc ")}

        def get_vocab(self):
            return dict(self.vocab)

        @property
        def vocab_size(self):
            return len(self.vocab)

        def _tokenize(self, text, **kwargs):
            return list(text)

        def _convert_token_to_id(self, token):
            return self.vocab.get(token, 0)

        def _convert_id_to_token(self, index):
            return "abc "[index]

    with pytest.raises(KdpipeError, match="gives none .*no tokenizer.json"):
        require_offsets(Chars(name_or_path="chars"), "student")


def test_a_cache_whose_teacher_tokenizer_is_gone_names_the_option(world, tmp_path):
    from kdpipe.stages import cache_teacher

    teacher = tmp_path / "teacher"
    shutil.copytree(world.teacher, teacher)
    cfg = cache_teacher.CacheTeacherConfig(model=str(teacher), dataset="kdpipe:arithmetic", limit=8, top_k=4,
                                           cache=str(tmp_path / "c"), device="cpu")
    cache_teacher.run(cfg, "test")
    for f in teacher.glob("*token*"):
        f.unlink()
    student, out = world.other_student, tmp_path / "r"
    expect_error("train-student", "--cache", tmp_path / "c", "--model", student, "--output", out,
                 "--cross-tokenizer", "--max-steps", 1, match="--teacher-tokenizer")
    run_cli("train-student", "--cache", tmp_path / "c", "--model", student, "--output", out,
            "--cross-tokenizer", "--max-steps", 1, "--batch-size", 4, "--teacher-tokenizer", world.teacher)


def test_a_cache_without_recoverable_text_is_refused(world):
    from kdpipe.errors import KdpipeError
    from kdpipe.models import load_tokenizer
    from kdpipe.vocab.cross_tokenizer import coverage
    from kdpipe.vocab.map import build_map

    teacher = bpe(TEACHER_MERGES, True)
    e = example(teacher)
    spelled = [teacher.convert_tokens_to_ids(c) for c in ["Q", ":", "Ġ", "h", "e", "l", "l", "o"]]
    e.input_ids = np.array(spelled + [teacher.eos_token_id], np.int32)  # not the tokenizer's own tokenization
    e.positions = np.arange(1, len(e.input_ids) - 1, dtype=np.int32)
    n = len(e.positions)
    e.targets.topk_ids = e.targets.topk_ids[:1].repeat(n, 0)
    e.targets.topk_logprobs = e.targets.topk_logprobs[:1].repeat(n, 0)
    e.targets.tail_mass = np.full(n, 0.1, np.float32)

    class FakeCache:
        path, manifest = "cache/x", {"tokenizer": {"name": "teacher-x"}}

        def iter_examples(self):
            return iter([e])

    student = load_tokenizer(str(world.other_student))
    with pytest.raises(KdpipeError, match="text needed to align"):
        coverage(FakeCache(), build_map(teacher, student), teacher, student, 10)
