"""Bad input to cache-teacher: a clear error naming the culprit, exit code 2, and nothing written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import kdpipe, write_jsonl

from kdpipe.data.sources import DataConfig, is_heldout, load_examples
from kdpipe.errors import KdpipeError
from kdpipe.models import resolve_model_name


def refused(*args, match: str, cache: Path) -> None:
    result = kdpipe("cache-teacher", *args, "--cache", cache, ok=False)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert re.search(match, result.output), result.output
    assert not cache.exists(), "nothing may be written on bad input"


@pytest.fixture
def data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "d.jsonl", [{"instruction": f"Say {i}", "output": f"{i}"} for i in range(4)])


def test_missing_column(tmp_path, tiny_model_dir, data):
    refused("--model", tiny_model_dir, "--dataset", data, "--columns", "output=answer",
            match="has no column 'answer' \\(mapped to field 'output'\\); columns: instruction, output", cache=tmp_path / "c")
    refused("--model", tiny_model_dir, "--dataset", data, "--template", "sentiment",
            match="field 'text' required by template sentiment is missing", cache=tmp_path / "c")


def test_empty_dataset(tmp_path, tiny_model_dir):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    refused("--model", tiny_model_dir, "--dataset", empty, match="empty", cache=tmp_path / "c")


def test_empty_text(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": ""}])
    refused("--model", tiny_model_dir, "--dataset", data, match="example 'train-1': field 'output' .* is empty", cache=tmp_path / "c")


def test_malformed_jsonl_names_the_line(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n')
    refused("--model", tiny_model_dir, "--dataset", bad, match="bad.jsonl, line 2: malformed JSON", cache=tmp_path / "c")


def test_top_k_larger_than_vocabulary(tmp_path, tiny_model_dir, data):
    refused("--model", tiny_model_dir, "--dataset", data, "--top-k", 100000,
            match="top_k=100000 is larger than the teacher's vocabulary \\(512 tokens\\)", cache=tmp_path / "c")
    refused("--model", tiny_model_dir, "--dataset", data, "--top-k", 0, match="top_k must be at least 1", cache=tmp_path / "c")


def test_unknown_template_field(tmp_path, tiny_model_dir, data):
    template = tmp_path / "t.yaml"
    template.write_text('prompt: "{instruction} {context}"\ncompletion: "{output}"\n')
    refused("--model", tiny_model_dir, "--dataset", data, "--template", template,
            match="field 'context' required by template .*t.yaml is missing", cache=tmp_path / "c")


def test_model_path_that_does_not_exist(tmp_path, data):
    refused("--model", tmp_path / "nope", "--dataset", data, match="model path .*nope does not exist", cache=tmp_path / "c")


def test_hub_model_offline_is_a_clear_error(tmp_path, data, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    refused("--model", "kdpipe-test/no-such-model", "--dataset", data,
            match="could not load the tokenizer kdpipe-test/no-such-model", cache=tmp_path / "c")


def test_cache_folder_holding_another_run(tmp_path, tiny_model_dir, data):
    cache = tmp_path / "c"
    kdpipe("cache-teacher", "--model", tiny_model_dir, "--dataset", data, "--top-k", 4, "--cache", cache)
    before = sorted(p.name for p in cache.iterdir())
    result = kdpipe("cache-teacher", "--model", tiny_model_dir, "--dataset", data, "--top-k", 8, "--cache", cache, ok=False)
    assert result.exit_code == 2 and "holds another run (different sparse" in result.output
    assert "--overwrite" in result.output and sorted(p.name for p in cache.iterdir()) == before
    kdpipe("cache-teacher", "--model", tiny_model_dir, "--dataset", data, "--top-k", 8, "--cache", cache, "--overwrite")
    from kdpipe.cache.manifest import read_manifest

    assert read_manifest(cache)["sparse"]["k"] == 8


def test_folder_with_other_files_is_refused(tmp_path, tiny_model_dir, data):
    cache = tmp_path / "c"
    cache.mkdir()
    (cache / "notes.txt").write_text("mine")
    result = kdpipe("cache-teacher", "--model", tiny_model_dir, "--dataset", data, "--cache", cache, ok=False)
    assert result.exit_code == 2 and "is not empty and holds no kdpipe cache" in result.output


def test_bad_config_values(tmp_path, tiny_model_dir, data):
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {tiny_model_dir}\ndataset: {data}\ntop_kk: 4\n")
    result = kdpipe("cache-teacher", "--config", config, ok=False)
    assert result.exit_code == 2 and "unknown key 'top_kk'; did you mean 'top_k'?" in result.output
    config.write_text(f"model: {tiny_model_dir}\ndataset: {data}\ntop_k: many\n")
    result = kdpipe("cache-teacher", "--config", config, ok=False)
    assert "'top_k' must be an integer, not 'many'" in result.output
    result = kdpipe("cache-teacher", "--config", config, "--dtype", "fp64", ok=False)
    assert result.exit_code == 2 and "fp64" in result.output
    config.write_text("- a list\n")
    assert "must hold a mapping" in kdpipe("cache-teacher", "--config", config, ok=False).output


def test_cli_options_override_the_config_file(tmp_path, tiny_model_dir, data):
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {tiny_model_dir}\ndataset: {data}\ntop_k: 4\ncache: {tmp_path / 'from-config'}\n")
    kdpipe("cache-teacher", "--config", config, "--top-k", 6, "--cache", tmp_path / "from-cli")
    from kdpipe.cache.manifest import read_manifest

    assert read_manifest(tmp_path / "from-cli")["sparse"]["k"] == 6 and not (tmp_path / "from-config").exists()


def test_shard_index_out_of_range(tmp_path, tiny_model_dir, data):
    refused("--model", tiny_model_dir, "--dataset", data, "--num-shards", 2, "--shard-index", 2,
            match="shard_index must be in \\[0, num_shards=2\\)", cache=tmp_path / "c")


def test_heldout_split_is_deterministic_and_disjoint():
    train = load_examples(DataConfig(dataset="kdpipe:arithmetic", part="train", heldout_fraction=0.1))
    held = load_examples(DataConfig(dataset="kdpipe:arithmetic", part="heldout", heldout_fraction=0.1))
    assert len(train.examples) + len(held.examples) == 2700 and 200 < len(held.examples) < 340
    assert not {e.id for e in train.examples} & {e.id for e in held.examples}
    limited = load_examples(DataConfig(dataset="kdpipe:arithmetic", part="heldout", heldout_fraction=0.1, limit=10))
    assert [e.id for e in limited.examples] == [e.id for e in held.examples[:10]]
    assert all(is_heldout(e.id, 0.1, 0) for e in limited.examples)
    assert held.fingerprint == load_examples(DataConfig(dataset="kdpipe:arithmetic", part="heldout", heldout_fraction=0.1)).fingerprint


def test_local_formats_and_column_mapping(tmp_path):
    import pandas as pd

    frame = pd.DataFrame({"question": ["a", "b"], "answer": ["x", "y"], "uid": ["u1", "u2"]})
    for path in (tmp_path / "d.csv", tmp_path / "d.parquet"):
        frame.to_csv(path, index=False) if path.suffix == ".csv" else frame.to_parquet(path)
        selection = load_examples(DataConfig(dataset=str(path), columns={"instruction": "question", "output": "answer"}, id_column="uid"))
        assert [(e.id, e.fields["instruction"], e.fields["output"]) for e in selection.examples] == [("u1", "a", "x"), ("u2", "b", "y")]
    with pytest.raises(KdpipeError, match="has no id column 'nope'"):
        load_examples(DataConfig(dataset=str(tmp_path / "d.csv"), id_column="nope"))
    with pytest.raises(KdpipeError, match="dataset file .*missing.jsonl does not exist"):
        load_examples(DataConfig(dataset=str(tmp_path / "missing.jsonl")))


def test_short_model_names():
    assert resolve_model_name("Qwen3-4B") == "Qwen/Qwen3-4B"
    assert resolve_model_name("qwen3-0.6b") == "Qwen/Qwen3-0.6B"
    assert resolve_model_name("Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"
    assert resolve_model_name("Qwen/Qwen3-4B") == "Qwen/Qwen3-4B"
    with pytest.raises(KdpipeError, match="model path ./missing does not exist"):
        resolve_model_name("./missing")


def test_field_of_the_wrong_type(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": ["x", "y"], "output": "d"}])
    refused("--model", tiny_model_dir, "--dataset", data, cache=tmp_path / "c",
            match=re.escape("example 'train-1': field 'instruction' required by template alpaca must be text or a number, "
                            "not a list (['x', 'y'])"))


def test_non_utf8_bytes_name_the_line(tmp_path, tiny_model_dir):
    data = tmp_path / "d.jsonl"
    data.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "d"}\n')
    refused("--model", tiny_model_dir, "--dataset", data, cache=tmp_path / "c",
            match=re.escape(f"dataset file {data}, line 2: not UTF-8 (invalid continuation byte at byte 20)"))


@pytest.fixture(scope="module")
def short_context_model(tmp_path_factory, tiny_tokenizer) -> Path:
    from kdpipe import tiny

    path = tmp_path_factory.mktemp("models") / "short"
    tiny.init_model(path, tiny_tokenizer, max_position_embeddings=64, seed=4)
    return path


def test_examples_longer_than_the_teachers_context(tmp_path, short_context_model, tiny_tokenizer):
    """max_length above the model's context is lowered to it (said on stderr); longer examples follow --truncation."""
    text = "the quick brown fox jumps over the lazy dog " * 12
    length = len(tiny_tokenizer(text, add_special_tokens=False)["input_ids"]) + 1  # + EOS
    assert length > 64
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": text}, {"text": "a short one"}])
    args = ("--model", short_context_model, "--dataset", data, "--template", "text", "--top-k", 4)
    note = "note: max_length=2048 is longer than the teacher's context (64 tokens); using max_length=64"
    refused(*args, "--truncation", "error", cache=tmp_path / "c",
            match="(?s)" + re.escape(f"{note} (longer examples: --truncation error)") + ".*"
            + re.escape(f"example 'train-0' has {length} tokens, more than max_length=64; raise max_length (up to the "
                        "model's context) or set truncation to skip, truncate or truncate-prompt"))
    result = kdpipe("cache-teacher", *args, "--cache", tmp_path / "c")
    assert f"{note} (longer examples: --truncation truncate)" in result.output
    assert "; 1 truncated" in result.output
    from kdpipe.cache import open_cache

    cache = open_cache(tmp_path / "c")
    assert cache.manifest["dataset"]["max_length"] == 64 and cache.manifest["dataset"]["report"] == {"truncated": 1}
    assert [len(e.input_ids) for e in cache.iter_examples()] == [64, len(tiny_tokenizer("a short one")["input_ids"]) + 1]
