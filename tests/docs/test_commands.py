"""The shell commands of README.md and docs/, run as written against tiny models (no hub, no GPU).

Every ```bash / ```console block of the README and of every page under docs/ is collected. A block that
cannot run here is marked on the line before its fence, with the reason: `<!-- not run: needs a GPU -->`.
Every other block runs, its commands in order, in one scratch folder shared by all pages (copies of
configs/ and examples/, the data files below); the README's quickstart runs first, as a reader would,
and the guides build on its `cache/mine` and `runs/mine`. Two more markers:

- `<!-- file: PATH -->` before a block (a template, a config) writes that block to PATH first;
- `<!-- output: ... -->` before a plain ``` block: it is what the last command before it prints, exactly.

The documented hub ids become tiny models built here, through MODELS (also inside written files):
`Qwen/Qwen3-4B` is the teacher, `Qwen/Qwen3-0.6B` a smaller student with the teacher's tokenizer. Short
names (`Qwen3-4B`) are left alone: `kdpipe plan` reads their shipped configs offline. The data files the
docs name are written by DATA. `kdpipe ...` runs in-process (click's runner: no torch import per command),
anything else as a subprocess in the scratch folder (`python` is this interpreter).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import student_kwargs, texts, write_jsonl

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").rglob("*.md") if "_notes" not in p.parts)]
SHELLS = ("bash", "console", "sh", "shell")
MARKER = re.compile(r"<!--\s*(not run|file|output)\s*:?\s*(.*?)\s*-->")
MODELS = {"Qwen/Qwen3-4B": "teacher", "Qwen/Qwen3-0.6B": "student"}  # documented hub id -> tiny model here


def alpaca(n: int, start: int = 0) -> list[dict]:
    return [{"instruction": f"Add {i} and {i + 3}.", "input": "", "output": f"{i} + {i + 3} = {2 * i + 3}."}
            for i in range(start, start + n)]


DATA = {
    "data/train.jsonl": alpaca(24),
    "data/test.jsonl": alpaca(12, start=100),
    "data/qa.jsonl": [{"question": f"What is {i} plus one?", "answer": str(i + 1)} for i in range(12)],
}


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    marker: str | None  # "not run", "file", "output" or None
    note: str  # the reason, the file path, or the output's note

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    lines = page.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        fence = re.match(r"\s*```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip().startswith("```"))
        before = next((line.strip() for line in reversed(lines[:i]) if line.strip()), "")
        mark = MARKER.fullmatch(before)
        found.append(Block(page, i + 1, fence.group(1), "\n".join(lines[i + 1:end]),
                           mark.group(1) if mark else None, mark.group(2) if mark else ""))
        i = end + 1
    return found


def commands(block: Block) -> list[list[str]]:
    """The block's commands as argument lists: continuations joined, comments dropped; in a console
    block only the `$ ` lines."""
    text = re.sub(r"\\\n\s*", " ", block.text)
    lines = text.splitlines()
    if block.lang == "console":
        lines = [line[2:] for line in lines if line.startswith("$ ")]
    return [words for line in lines if (words := shlex.split(line, comments=True))]


def substitute(text: str, models: dict[str, Path]) -> str:
    for name, path in models.items():
        text = text.replace(name, str(path))
    return text


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The scratch folder, with the tiny models, the data files, configs/ and examples/; the README's
    blocks have run in it (the guides build on them)."""
    from kdpipe import tiny

    root = tmp_path_factory.mktemp("docs")
    tok = tiny.train_tokenizer(texts(600) + [json.dumps(r) for rows in DATA.values() for r in rows], vocab_size=320)
    models = {}
    for seed, (name, kind) in enumerate(MODELS.items()):
        models[name] = root / "models" / kind
        tiny.init_model(models[name], tok, seed=seed, **(student_kwargs() if kind == "student" else {}))
    work = root / "work"
    for path, rows in DATA.items():
        (work / path).parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(work / path, rows)
    for folder in ("configs", "examples"):  # what the docs' commands read from the repository
        shutil.copytree(ROOT / folder, work / folder)
    state = {"work": work, "models": models, "ran": {}}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        run_page(ROOT / "README.md", state)
    return state


def run_page(page: Path, state: dict) -> list[str]:
    """Run the page's runnable blocks in order; returns what ran (for the assertions)."""
    from kdpipe.cli import main

    work, models, ran = state["work"], state["models"], []
    last_output = None
    for block in blocks(page):
        if block.marker == "file":
            (work / block.note).write_text(substitute(block.text, models) + "\n")
        elif block.marker == "output":
            assert last_output is not None, f"{block}: an output block with no command before it"
            assert last_output.rstrip() == block.text.rstrip(), f"{block}: the command printed\n{last_output}"
        elif block.lang in SHELLS and block.marker is None:
            for words in commands(block):
                words = [substitute(w, models) for w in words]
                if words[0] == "kdpipe":
                    result = CliRunner().invoke(main, words[1:], catch_exceptions=False)
                    assert result.exit_code == 0, f"{block}: {shlex.join(words)}\n{result.output[-3000:]}"
                    last_output = result.stdout
                else:
                    words = [sys.executable if w == "python" else w for w in words]  # this venv's python
                    done = subprocess.run(words, cwd=work, capture_output=True, text=True, timeout=120)
                    assert done.returncode == 0, f"{block}: {shlex.join(words)}\n{done.stdout}{done.stderr}"
                    last_output = done.stdout
                ran.append(shlex.join(words))
    state["ran"][page] = ran
    return ran


@pytest.fixture
def in_work(workspace, monkeypatch):
    monkeypatch.chdir(workspace["work"])
    return workspace


def test_every_block_not_run_says_why():
    """A marker without a reason, a misspelt marker, or a shell block marked as a file: all refused."""
    for page in PAGES:
        text = page.read_text()
        for comment in re.findall(r"<!--.*?-->", text, flags=re.S):
            if re.search(r"not\s*run|file:|output:", comment):
                mark = MARKER.fullmatch(comment.strip())
                assert mark and mark.group(2), f"{page.relative_to(ROOT)}: {comment!r} needs a reason / path"
        for block in blocks(page):
            if block.lang in SHELLS:
                assert block.marker in (None, "not run"), f"{block}: a shell block marked {block.marker}"


def test_readme_quickstart_ran(workspace):
    """The README's three steps ran (the fixture), and left what the README says they leave."""
    ran = workspace["ran"][ROOT / "README.md"]
    assert [c.split()[1] for c in ran] == ["cache-teacher", "cache-teacher", "train-student", "evaluate", "plan"]
    work = workspace["work"]
    assert json.loads((work / "cache/mine/manifest.json").read_text())["complete"]
    assert json.loads((work / "runs/mine/kdpipe_run.json").read_text())["status"] == "complete"
    models = json.loads((work / "runs/mine/eval/results.json").read_text())["models"]  # student, its base, teacher
    assert all(m["metrics"]["perplexity/perplexity"] > 1 for m in models), models  # alpaca's task
    kl = [m["metrics"]["fidelity/kl"] for m in models]  # against the teacher's own held-out cache (fp16 values)
    assert kl[2] < 1e-3 < min(kl[:2]), kl
    skipped = [b for b in blocks(ROOT / "README.md") if b.marker == "not run"]
    assert [b.text.split()[0] for b in skipped] == ["make", "pip", "make"]  # make demo / test, pip, make demo-real


GUIDES = [p for p in PAGES[1:] if any(b.lang in SHELLS and b.marker is None for b in blocks(p))]


@pytest.mark.parametrize("page", GUIDES, ids=[str(p.relative_to(ROOT)) for p in GUIDES])
def test_page_commands_run(page, in_work):
    assert run_page(page, in_work)


def test_the_commands_table_lists_every_command():
    """The README's table of commands against the CLI itself: a command added or renamed shows here."""
    from kdpipe.cli import main

    table = re.findall(r"^\| `kdpipe ([a-z-]+)", (ROOT / "README.md").read_text(), flags=re.M)
    assert sorted(table) == sorted(main.commands), table


def test_readme_links_exist():
    """mkdocs checks the site's links (`mkdocs build --strict` in `make test`); the README is outside the
    site, so its relative links are checked here, anchors of docs/ pages included."""
    text = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert len(links) > 20, links
    for link in links:
        if re.match(r"[a-z]+:", link):
            continue
        path, _, anchor = link.partition("#")
        target = ROOT / path
        assert target.exists(), f"README.md links to {link}: no such file"
        if anchor:
            slugs = {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-")
                     for h in re.findall(r"^#+ (.*)$", target.read_text(), flags=re.M)}
            assert anchor in slugs, f"README.md links to {link}: no such heading"
