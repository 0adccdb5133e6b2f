"""A finished generated file edited afterwards (issue 29 item 10): `generate` said "already complete" and
cache-teacher recorded `"matches": false` without a word. Both now say the file changed and refuse; removing
the sidecar (an edit on purpose) caches it as a plain dataset."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import expect_error, run_cli


def test_an_edited_generated_file_is_refused_by_generate_and_cache_teacher(world, tmp_path):
    data = tmp_path / "gen.jsonl"
    command = ("generate", "--model", world.teacher, "--dataset", "kdpipe:arithmetic", "--limit", 3,
               "--max-new-tokens", 4, "--device", "cpu", "--output", data)
    run_cli(*command)
    lines = data.read_text().splitlines()
    row = json.loads(lines[1])
    row["output"] = "42"  # a hand-corrected completion: same ids, same line count
    data.write_text("\n".join([lines[0], json.dumps(row), *lines[2:]]) + "\n")

    result = expect_error(*command, match=f"--output {data} was changed after kdpipe generate finished it (sha256 ")
    assert "3 lines, 3 rows recorded in gen.jsonl.kdpipe-generate.json); pass --overwrite to generate it again" \
        in result.output
    cache = ("cache-teacher", "--model", world.teacher, "--dataset", data, "--top-k", 4, "--device", "cpu",
             "--template", "arithmetic", "--cache", tmp_path / "c")
    result = expect_error(*cache, match=f"--dataset {data} was changed after kdpipe generate finished it")
    assert ("so the generation settings beside it no longer describe its text. Generate it again (kdpipe generate "
            "... --overwrite), or, if the edit is on purpose, remove gen.jsonl.kdpipe-generate.json to cache it as "
            "a plain dataset") in result.output
    assert not (tmp_path / "c").exists()

    Path(str(data) + ".kdpipe-generate.json").unlink()  # the way out for an edit on purpose
    run_cli(*cache)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest.get("generated") is None and manifest["dataset"]["examples"] == 3
