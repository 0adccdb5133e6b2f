"""Small helpers shared by the tests."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner, Result


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def kdpipe(*args: str, ok: bool = True) -> Result:
    """Run the `kdpipe` CLI in-process; with ok=True, fail the test on a non-zero exit."""
    from kdpipe.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result
