"""`kdpipe generate`: seeded, batch-independent, resumable after SIGKILL; its provenance in a cache;
train-student on two caches mixed; bad input refused with a message naming the option."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import expect_error, run_cli

from kdpipe.data.generated import file_sha256

DATA = ["--dataset", "kdpipe:arithmetic", "--max-new-tokens", "10"]


def gen(world, out: Path, *args: object, ok: bool = True):
    return run_cli("generate", "--model", world.teacher, *DATA, "--output", out, "--device", "cpu", *args, ok=ok)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory) -> Path:
    """12 prompts x 2 samples, batches of 5, seed 3: the file every other run of these settings must equal."""
    out = tmp_path_factory.mktemp("gen") / "ref.jsonl"
    gen(world, out, "--limit", 12, "--samples", 2, "--batch-size", 5, "--seed", 3)
    return out


def test_rows_fields_and_sidecar(world, reference):
    got = rows(reference)
    assert [r["id"] for r in got[:3]] == ["arith-train-00000", "arith-train-00000#1", "arith-train-00001"]
    assert set(got[0]) == {"id", "instruction", "output", "kdpipe_generate"}
    assert got[1]["kdpipe_generate"]["source_id"] == "arith-train-00000" and got[1]["kdpipe_generate"]["sample"] == 1
    assert all(r["kdpipe_generate"]["new_tokens"] <= 10 for r in got)
    side = json.loads(Path(str(reference) + ".kdpipe-generate.json").read_text())
    assert side["complete"] and side["rows"] == 24
    assert side["settings"]["model"] == str(Path(world.teacher).resolve())
    assert side["settings"]["sampling"] == {"samples": 2, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 10,
                                            "seed": 3}
    assert gen(world, reference, "--limit", 12, "--samples", 2, "--seed", 3).output.count("already complete")


def test_same_seed_same_file_whatever_the_batches(world, reference, tmp_path):
    gen(world, tmp_path / "b3.jsonl", "--limit", 12, "--samples", 2, "--batch-size", 3, "--seed", 3)
    assert (tmp_path / "b3.jsonl").read_bytes() == reference.read_bytes()
    gen(world, tmp_path / "s4.jsonl", "--limit", 12, "--samples", 2, "--batch-size", 5, "--seed", 4)
    assert [r["output"] for r in rows(tmp_path / "s4.jsonl")] != [r["output"] for r in rows(reference)]


def test_greedy_and_top_p(world, tmp_path):
    gen(world, tmp_path / "greedy.jsonl", "--limit", 3, "--samples", 2, "--temperature", 0)
    outputs = [r["output"] for r in rows(tmp_path / "greedy.jsonl")]
    assert outputs[0::2] == outputs[1::2]  # greedy: every sample of a prompt is the same
    gen(world, tmp_path / "top.jsonl", "--limit", 3, "--samples", 2, "--top-p", 1e-6)
    top = [r["output"] for r in rows(tmp_path / "top.jsonl")]
    assert top == outputs  # a vanishing nucleus keeps the most likely token only


def test_resume_after_sigkill_gives_the_same_file(world, reference, tmp_path):
    """The run is frozen in the middle of its 4th batch's write (half of it on disk), then SIGKILLed."""
    out = tmp_path / "killed.jsonl"
    args = ["generate", "--model", world.teacher, *DATA, "--output", out, "--device", "cpu", "--limit", 12,
            "--samples", 2, "--batch-size", 2, "--seed", 3]
    env = {**os.environ, "KDPIPE_NO_PROGRESS": "1", "KDPIPE_FAULT": f"mid-write:{out.name}:4:STOP"}
    proc = subprocess.Popen([sys.executable, "-m", "kdpipe.cli", *map(str, args)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if Path(f"/proc/{proc.pid}/stat").read_text().split(") ")[1].startswith("T"):  # stopped
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    finally:
        proc.kill()  # SIGKILL
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    data = out.read_bytes()
    complete = data.count(b"\n")
    assert complete in (6, 7) and not data.endswith(b"\n")  # 3 batches and half of the 4th
    assert reference.read_bytes().startswith(data)
    result = run_cli(*args)
    assert f"generated {24 - complete} completions" in result.output, result.output
    assert out.read_bytes() == reference.read_bytes()
    ids = [r["id"] for r in rows(out)]
    assert len(ids) == len(set(ids)) == 24


def test_resume_with_other_settings_is_refused(world, reference, tmp_path):
    out = tmp_path / "other.jsonl"
    out.write_bytes(reference.read_bytes())
    Path(str(out) + ".kdpipe-generate.json").write_bytes(Path(str(reference) + ".kdpipe-generate.json").read_bytes())
    result = gen(world, out, "--limit", 12, "--samples", 2, "--seed", 3, "--temperature", 0.5, ok=False)
    assert result.exit_code != 0 and "sampling.temperature: 1.0 -> 0.5" in result.output, result.output
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text('{"a": 1}\n')
    expect_error("generate", "--model", world.teacher, *DATA, "--output", foreign, match="not written by kdpipe generate")
    gen(world, foreign, "--limit", 2, "--overwrite")
    assert len(rows(foreign)) == 2


def test_cache_of_generated_text_records_its_source_and_mixes(world, tmp_path):
    data = tmp_path / "teacher-gen.jsonl"
    gen(world, data, "--limit", 16, "--temperature", 0.8, "--seed", 1)
    cache = tmp_path / "cache-gen"
    run_cli("cache-teacher", "--model", world.teacher, "--dataset", data, "--top-k", 8, "--cache", cache,
            "--device", "cpu")  # template auto: the one the file was generated with (arithmetic)
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["template"]["name"] == "arithmetic"
    source = manifest["generated"]
    assert source["model"] == str(Path(world.teacher).resolve()) and source["matches"]
    assert source["sampling"]["temperature"] == 0.8 and source["rows"] == 16

    out = tmp_path / "mixed"
    run_cli("train-student", "--cache", world.cache, "--cache", cache, "--model", world.student, "--output", out,
            "--max-steps", 2, "--batch-size", 4, "--full")
    record = json.loads((out / "kdpipe_run.json").read_text())
    hashes = [json.loads((c / "manifest.json").read_text())["settings_hash"] for c in (world.cache, cache)]
    assert record["identity"]["cache"] == hashes and record["config"]["cache"] == [str(world.cache), str(cache)]
    assert f"--cache {world.cache} --cache {cache}" in record["command"]

    run_cli("evaluate", "--model", out, "--dataset", "kdpipe:arithmetic", "--split", "test", "--limit", 4,
            "--task", "exact-match", "--cache", cache, "--output", tmp_path / "eval", "--no-plot")
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["models"][0]["metrics"]["fidelity/kl"] >= 0

    from kdpipe.cache.reader import open_cache
    from kdpipe.train.mix import MixedCacheDataset

    mixed = MixedCacheDataset([open_cache(world.cache), open_cache(cache)])
    assert len(mixed) == 64 + 16 and len(mixed.sizes) == len(mixed.parts[0].sizes) + len(mixed.parts[1].sizes)
    assert mixed[64].id == "arith-train-00000" and mixed[63].id == "arith-train-00063"


def test_caches_that_cannot_be_mixed(world, tmp_path):
    k4 = tmp_path / "k4"
    run_cli("cache-teacher", "--model", world.teacher, "--dataset", "kdpipe:arithmetic", "--limit", 8, "--top-k", 4,
            "--cache", k4, "--device", "cpu")
    expect_error("train-student", "--cache", world.cache, "--cache", k4, "--model", world.student,
                 "--output", tmp_path / "r1", match="cannot be mixed: their sparse settings differ")
    expect_error("train-student", "--cache", world.cache, "--cache", world.padded_cache, "--model", world.student,
                 "--output", tmp_path / "r2", match="cannot be mixed: their teacher differ")
    expect_error("train-student", "--cache", world.cache, "--cache", world.cache, "--model", world.student,
                 "--output", tmp_path / "r3", match="lists a cache twice")


@pytest.mark.parametrize("option, value, match", [
    ("--temperature", "-1", "--temperature must be a finite number >= 0"),
    ("--temperature", "nan", "'temperature' must be a finite number"),
    ("--temperature", "inf", "'temperature' must be a finite number"),
    ("--top-p", "0", "--top-p must be in (0, 1]"),
    ("--top-p", "1.5", "--top-p must be in (0, 1]"),
    ("--samples", "0", "--samples must be at least 1"),
    ("--max-new-tokens", "0", "--max-new-tokens must be at least 1"),
])
def test_bad_sampling_options(world, tmp_path, option, value, match):
    expect_error("generate", "--model", world.teacher, *DATA, "--output", tmp_path / "x.jsonl", option, value,
                 match=match)


def test_models_that_cannot_generate(world, tmp_path):
    from transformers import AutoConfig, Qwen3Model, T5Config

    base = tmp_path / "base"  # the decoder without its LM head
    Qwen3Model(AutoConfig.from_pretrained(world.teacher)).save_pretrained(base)
    world.tokenizer.save_pretrained(base)
    expect_error("generate", "--model", base, *DATA, "--output", tmp_path / "a.jsonl", "--device", "cpu",
                 match="has no LM head")
    t5 = tmp_path / "t5"  # an encoder-decoder: not a causal LM
    T5Config(vocab_size=len(world.tokenizer), d_model=32, num_layers=1, num_heads=2).save_pretrained(t5)
    world.tokenizer.save_pretrained(t5)
    expect_error("generate", "--model", t5, *DATA, "--output", tmp_path / "b.jsonl", match="is not a causal LM")
    assert not (tmp_path / "a.jsonl").exists() and not (tmp_path / "b.jsonl").exists()


def test_other_bad_input(world, tmp_path):
    expect_error("generate", "--model", world.teacher, *DATA, match="pass --output")
    expect_error("generate", "--model", world.teacher, *DATA, "--output", tmp_path / "x.csv", match="*.jsonl")
    expect_error("generate", *DATA, "--output", tmp_path / "x.jsonl", match="no model given")
    reviews = tmp_path / "reviews.jsonl"
    reviews.write_text('{"text": "great", "label": 1}\n')
    expect_error("generate", "--model", world.teacher, "--dataset", reviews, "--template", "sentiment",
                 "--output", tmp_path / "y.jsonl", match="no single output field")


def test_vllm_backend_is_seeded_per_row(world, tmp_path):
    pytest.importorskip("vllm")
    for name, batch in (("a", 6), ("b", 4)):
        run_cli("generate", "--model", world.teacher, *DATA, "--limit", 6, "--samples", 2, "--batch-size", batch,
                "--backend", "vllm", "--output", tmp_path / f"{name}.jsonl", "--device", "cpu")
    a, b = rows(tmp_path / "a.jsonl"), rows(tmp_path / "b.jsonl")
    assert a == b and len(a) == 12 and len({r["output"] for r in a}) > 1


def test_arithmetic_long_task():
    from kdpipe.data import arithmetic
    from kdpipe.data.sources import DataConfig, load_examples

    train, test = arithmetic.generate_long("train"), arithmetic.generate_long("test")
    assert (len(train), len(test)) == (arithmetic.TRAIN_SIZE, arithmetic.TEST_SIZE)
    assert train == arithmetic.generate_long("train")  # deterministic
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in test}
    assert {len(r["instruction"]) for r in train} == set(arithmetic.LONG_WIDTHS)
    assert all(arithmetic.check(r["instruction"], r["output"]) for r in train + test)
    cfg = DataConfig(dataset="kdpipe:arithmetic-long", split="test")
    assert cfg.resolved_template() == "arithmetic" and len(load_examples(cfg).examples) == arithmetic.TEST_SIZE
    assert arithmetic.generate("train")[0] == {"id": "arith-train-00000", "instruction": "8420",
                                               "output": arithmetic.generate("train")[0]["output"]}


def test_chat_template_column_mapping_and_template_file(world, tmp_path):
    """The completion goes where the template's output field is read from: a mapped column, a chat
    assistant turn (without the template's end-of-turn text), a template file's one field."""
    import shutil

    chat = tmp_path / "chat-teacher"
    shutil.copytree(world.teacher, chat)
    tok = world.tokenizer.__class__(tokenizer_object=world.tokenizer.backend_tokenizer, eos_token="<|endoftext|>",
                                    pad_token="<|pad|>")
    tok.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}<|endoftext|>{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    tok.save_pretrained(chat)
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"q": f"What is {i}?", "response": "x", "n": i}) + "\n" for i in range(3)))
    out = tmp_path / "chat-gen.jsonl"
    run_cli("generate", "--model", chat, "--dataset", data, "--template", "chat", "--columns",
            "instruction=q,output=response", "--max-new-tokens", 6, "--output", out, "--device", "cpu")
    got = rows(out)
    assert [set(r) for r in got] == [{"q", "response", "n", "id", "kdpipe_generate"}] * 3
    assert [r["id"] for r in got] == ["train-0", "train-1", "train-2"] and got[2]["n"] == 2
    assert all("<|endoftext|>" not in r["response"] for r in got)
    run_cli("cache-teacher", "--model", chat, "--dataset", out, "--columns", "instruction=q,output=response",
            "--top-k", 4, "--cache", tmp_path / "cache-chat", "--device", "cpu")
    assert json.loads((tmp_path / "cache-chat" / "manifest.json").read_text())["template"]["name"] == "chat"

    template = tmp_path / "qa.yaml"
    template.write_text('prompt: "Q: {q}\\nA:"\ncompletion: " {answer}"\n')
    out = tmp_path / "file-gen.jsonl"
    run_cli("generate", "--model", world.teacher, "--dataset", data, "--template", template, "--max-new-tokens", 4,
            "--output", out, "--device", "cpu")
    assert all("answer" in r and r["response"] == "x" for r in rows(out))


def test_empty_generations_are_left_out_of_the_cache(world, tmp_path):
    """A barely trained student can stop at once: cache-teacher (and so a round) skips those rows, says so."""
    data = tmp_path / "student-gen.jsonl"
    gen(world, data, "--limit", 6, "--seed", 2)
    lines = rows(data)
    lines[1]["output"] = lines[4]["output"] = ""
    data.write_text("".join(json.dumps(r) + "\n" for r in lines))
    side = Path(str(data) + ".kdpipe-generate.json")  # as generate itself wrote them: an edit is refused
    side.write_text(json.dumps({**json.loads(side.read_text()), "sha256": file_sha256(data)}))
    cache = tmp_path / "cache"
    out = run_cli("cache-teacher", "--model", world.teacher, "--dataset", data, "--top-k", 8, "--cache", cache,
                  "--device", "cpu")
    assert "2 of the 6 generated rows" in out.output and "left out" in out.output
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["totals"]["rows"] == 4

