"""`kdpipe generate --output` that is, or resolves to, one of its inputs is refused whatever the flags (issue 29,
item 3). Before the fix `--output F --dataset F --overwrite` emptied the input and wrote 8 rows into it."""

from __future__ import annotations

import os

import pytest
from helpers import expect_error, write_jsonl

from kdpipe.data import arithmetic


@pytest.fixture
def dataset(tmp_path):
    rows = [{"id": f"r{i}", **r} for i, r in enumerate(arithmetic.generate("train")[:20])]
    (tmp_path / "data").mkdir()
    return write_jsonl(tmp_path / "data" / "prompts.jsonl", rows)


def spellings(dataset):
    """The same file named five ways: itself, through `..`, relative, a symlink, a hard link."""
    (dataset.parent / "sub").mkdir()
    (dataset.parent / "link.jsonl").symlink_to(dataset)
    os.link(dataset, dataset.parent / "hard.jsonl")
    return [dataset, dataset.parent / "sub" / ".." / dataset.name, os.path.relpath(dataset),
            dataset.parent / "link.jsonl", dataset.parent / "hard.jsonl"]


def test_output_that_is_the_dataset_is_refused_whatever_the_flags(tiny_model_dir, dataset):
    before = dataset.read_bytes()
    for output in spellings(dataset):
        for flags in ([], ["--overwrite"]):
            expect_error("generate", "--model", tiny_model_dir, "--dataset", dataset, "--template", "arithmetic",
                         "--output", output, "--max-new-tokens", 4, "--device", "cpu", *flags,
                         match=f"--output {output} would write over the input --dataset {dataset} (the same file)")
    assert dataset.read_bytes() == before


def test_a_template_file_is_an_input_too(tiny_model_dir, dataset, tmp_path):
    template = tmp_path / "template.jsonl"  # a template file named like an output: still an input
    template.write_text("prompt: '{instruction}'\n")
    expect_error("generate", "--model", tiny_model_dir, "--dataset", dataset, "--template", template,
                 "--output", template, "--overwrite", "--device", "cpu",
                 match=f"would write over the input --template {template}")
    assert template.read_text() == "prompt: '{instruction}'\n"
