"""`kdpipe init-model`: students cut from a teacher (--from: depth pruning) equal a hand-built reference,
random-init students in the teacher's architecture (--like) with a tied head and the tokenizer's ids, and
an --output that holds anything else (a finished run, the teacher, a file) is refused (issues 28, 29)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import expect_error, run_cli

CHAT = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|endoftext|>{% endfor %}"


def _tokenizer(tiny_tokenizer):
    tok = tiny_tokenizer.__class__(tokenizer_object=tiny_tokenizer.backend_tokenizer, eos_token="<|endoftext|>",
                                   pad_token="<|pad|>", bos_token="<|endoftext|>")
    tok.chat_template = CHAT
    return tok


@pytest.fixture(scope="module")
def teachers(tmp_path_factory, tiny_tokenizer):
    """A 6-layer Llama with a tied head and a 5-layer Qwen3 whose layers mix sliding and full attention
    (as layer_types), each with a BOS token and a chat template."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    root = tmp_path_factory.mktemp("teachers")
    tok = _tokenizer(tiny_tokenizer)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=6,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                         tie_word_embeddings=True, **ids))
    qwen = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=5,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                        use_sliding_window=True, sliding_window=64, max_window_layers=2,
                                        tie_word_embeddings=False, **ids))
    assert set(qwen.config.layer_types) == {"full_attention", "sliding_attention"}
    for name, model in (("llama", llama), ("qwen", qwen)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root


def _reference(teacher, layer_ids, input_ids):
    """The teacher's embeddings, the chosen layers in order, its final norm and head, run by hand."""
    inner = teacher.model
    positions = torch.arange(input_ids.shape[1])[None]
    hidden = inner.embed_tokens(input_ids)
    rope = inner.rotary_emb(hidden, positions)
    for i in layer_ids:
        out = inner.layers[i](hidden, attention_mask=None, position_ids=positions, position_embeddings=rope)
        hidden = out[0] if isinstance(out, tuple) else out
    return teacher.lm_head(inner.norm(hidden))


@pytest.mark.parametrize(("name", "args", "layer_ids"), [
    ("llama", ["--layers", "3"], [0, 2, 5]),            # evenly spaced, first and last kept
    ("qwen", ["--layer-ids", "1,4,2"], [1, 4, 2]),      # listed, in the order given
])
def test_a_cut_student_is_the_teachers_chosen_layers(teachers, tmp_path, tiny_tokenizer, name, args, layer_ids):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "cut"
    result = run_cli("init-model", "--from", teachers / name, *args, "--output", out)
    assert f"keeping {len(layer_ids)} of its {6 if name == 'llama' else 5} decoder layers" in result.output
    assert ", ".join(map(str, layer_ids)) in result.output
    umask = os.umask(0o022)
    os.umask(umask)  # read, and put back: the weights honour it as every other output (issue 29 item 11)
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in out.iterdir() if f.is_file()} == {
        f.name: oct(0o666 & ~umask) for f in out.iterdir() if f.is_file()}
    teacher = AutoModelForCausalLM.from_pretrained(teachers / name, dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(student) is type(teacher) and student.config.num_hidden_layers == len(layer_ids)
    if name == "qwen":  # each kept layer keeps its own attention type
        assert student.config.layer_types == [teacher.config.layer_types[i] for i in layer_ids]
    tied = lambda m: m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()  # noqa: E731
    assert tied(student) == tied(teacher) == (name == "llama")
    input_ids = torch.tensor([_tokenizer(tiny_tokenizer)("Write 8420 as a sum of two numbers.")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(student(input_ids).logits, _reference(teacher, layer_ids, input_ids))
        # each attention layer knows its new index: generation with the KV cache = without it
        cached = student.generate(input_ids, max_new_tokens=6, do_sample=False, use_cache=True)
        uncached = student.generate(input_ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    tok = AutoTokenizer.from_pretrained(out)  # the tokenizer and its chat template are the teacher's
    assert tok.chat_template == CHAT and tok.get_vocab() == AutoTokenizer.from_pretrained(teachers / name).get_vocab()
    assert json.loads((out / "kdpipe_init.json").read_text())["layer_ids"] == layer_ids


def test_bad_cuts_are_refused_before_anything_is_written(teachers, tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    llama, out = teachers / "llama", tmp_path / "cut"
    expect_error("init-model", "--from", llama, "--layers", 7, "-o", out, match="has 6 decoder layers; keep 1 to 6")
    expect_error("init-model", "--from", llama, "--layers", 0, "-o", out, match="layers must be at least 1")
    expect_error("init-model", "--from", llama, "--layer-ids", "0,6", "-o", out, match="layer 6 does not exist")
    expect_error("init-model", "--from", llama, "--layer-ids", "0,-1", "-o", out, match="layer -1 does not exist")
    expect_error("init-model", "--from", llama, "--layer-ids", "2,0,2", "-o", out, match="lists layer 2 twice")
    expect_error("init-model", "--from", llama, "--layer-ids", "0,5", "--layers", 3, "-o", out,
                 match="--layers 3 but --layer-ids lists 2 layers")
    expect_error("init-model", "--from", llama, "-o", out, match="--from needs --layers N")
    expect_error("init-model", "--from", llama, "--layers", 2, "--hidden-size", 32, "-o", out,
                 match="drop --hidden-size (keep")
    expect_error("init-model", "--from", llama, "--layers", 2, "--no-tie-embeddings", "-o", out,
                 match="tied to its embeddings")
    t5 = tmp_path / "t5"
    T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2)
                               ).save_pretrained(t5)
    expect_error("init-model", "--from", t5, "--layers", 1, "-o", out, match="is not a causal language model")
    assert not out.exists()


def test_like_takes_the_teachers_architecture_and_ties_its_head(teachers, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    llama = teachers / "llama"
    run_cli("init-model", "--tokenizer", llama, "--like", llama, "--layers", 2, "--hidden-size", 32, "--heads", 2,
            "--kv-heads", 1, "-o", tmp_path / "like")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "like")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 2
    assert model.config.hidden_size == 32 and model.config.num_key_value_heads == 1
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied: the teacher is
    run_cli("init-model", "--tokenizer", llama, "--like", llama, "--no-tie-embeddings", "-o", tmp_path / "untied")
    untied = AutoModelForCausalLM.from_pretrained(tmp_path / "untied")
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()
    # issue 29 item 14: the special ids are the tokenizer's, in the config and the generation config (else
    # transformers warns "the tokenizer has new PAD/BOS/EOS tokens" on every run)
    tok = AutoTokenizer.from_pretrained(llama)
    for folder in ("like", "untied"):
        for config in (json.loads((tmp_path / folder / f).read_text()) for f in ("config.json",
                                                                                  "generation_config.json")):
            assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (
                tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    # without --like: Qwen3, its BOS from the tokenizer too; tied when the tokenizer's model ties
    run_cli("init-model", "--tokenizer", llama, "-o", tmp_path / "qwen")
    qwen = json.loads((tmp_path / "qwen/config.json").read_text())
    assert qwen["model_type"] == "qwen3" and qwen["bos_token_id"] == tok.bos_token_id and qwen["tie_word_embeddings"]
    # what the Trainer checks (and warns about) before training: nothing to align
    assert _alignment_warnings(AutoModelForCausalLM.from_pretrained(tmp_path / "qwen"), tok) == []
    model.config.bos_token_id = model.generation_config.bos_token_id = None  # as init-model left it before
    assert "new PAD/BOS/EOS tokens" in " ".join(_alignment_warnings(model, tok))


def _alignment_warnings(model, tok) -> list[str]:
    import logging

    from transformers.trainer_utils import align_special_tokens

    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("transformers.trainer_utils")
    logger.addHandler(handler)
    try:
        align_special_tokens(model, tok)
    finally:
        logger.removeHandler(handler)
    return messages


def _digest(folder: Path) -> str:
    return hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in sorted(folder.rglob("*"))
                                   if p.is_file())).hexdigest()


def test_output_that_holds_something_else_is_refused(tiny_model_dir, tmp_path):
    """Issue 29 item 1: init-model used to overwrite a finished training run (its record still said complete)
    and the teacher's own folder."""
    run = tmp_path / "run"
    run_cli("finetune", "--model", tiny_model_dir, "--dataset", "kdpipe:arithmetic", "--limit", 8, "--full",
            "--max-steps", 1, "--batch-size", 4, "--output", run)
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_model_dir, teacher)
    before = {p: _digest(p) for p in (run, teacher)}
    expect_error("init-model", "--tokenizer", tiny_model_dir, "-o", run,
                 match=f"--output {run} already holds a `kdpipe finetune` run (status complete)")
    expect_error("init-model", "--tokenizer", tiny_model_dir, "-o", teacher, match="already holds a model")
    expect_error("init-model", "--from", teacher, "--layers", 1, "-o", teacher, match="is the --from model itself")
    expect_error("init-model", "--from", teacher, "--layers", 1, "--overwrite", "-o", teacher,
                 match="is the --from model itself")
    assert before == {p: _digest(p) for p in (run, teacher)}
    (tmp_path / "file").write_text("x")
    expect_error("init-model", "--tokenizer", tiny_model_dir, "-o", tmp_path / "file", match="is a file, not a folder")

    # its own output: the same options again are a no-op; other options are refused; --overwrite replaces
    out = tmp_path / "student"
    run_cli("init-model", "--tokenizer", tiny_model_dir, "-o", out)
    built = _digest(out)
    assert "holds this model: nothing to do" in run_cli("init-model", "--tokenizer", tiny_model_dir, "-o", out).output
    expect_error("init-model", "--tokenizer", tiny_model_dir, "--seed", 3, "-o", out, match="seed: 0 -> 3")
    assert _digest(out) == built
    run_cli("init-model", "--tokenizer", tiny_model_dir, "--seed", 3, "--overwrite", "-o", out)
    assert _digest(out) != built
    run_cli("init-model", "--tokenizer", tiny_model_dir, "--overwrite", "-o", run)  # asked for: replaced
    assert not (run / "kdpipe_run.json").exists() and (run / "kdpipe_init.json").exists()
    # a crash mid-write leaves only the aside folder, which the next run clears
    partial = tmp_path / ".fresh.init-partial"
    partial.mkdir()
    (partial / "config.json").write_text("{")
    run_cli("init-model", "--tokenizer", tiny_model_dir, "-o", tmp_path / "fresh")
    assert not partial.exists() and (tmp_path / "fresh/model.safetensors").is_file()


def test_a_run_step_cuts_its_student_from_the_teacher(teachers, tmp_path, monkeypatch):
    from helpers import kdpipe

    monkeypatch.chdir(tmp_path)
    (tmp_path / "cut.yaml").write_text(f"student_init:\n  from_model: {teachers / 'llama'}\n  layer_ids: [5, 0]\n")
    assert "kdpipe init-model --output runs/cut/student-init --from-model" in kdpipe("run", "cut.yaml").output
    assert json.loads((tmp_path / "runs/cut/student-init/config.json").read_text())["num_hidden_layers"] == 2
    assert "skipped (runs/cut/student-init holds this model)" in kdpipe("run", "cut.yaml").output
