"""Small helpers shared by the tests."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner, Result


def dense_reference(model_dir: Path, input_ids):
    """Full-vocabulary log-softmax of the whole model forward, float64: the independent reference."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor(input_ids, dtype=torch.long)[None]).logits[0]
    return torch.log_softmax(logits.double(), dim=-1)


def read_only_folder(folder: Path) -> list[str]:
    """Make `folder` read-only; the command prefix under which a subprocess cannot write it even as root
    (setpriv drops root's override capability), or skip the test where that cannot be simulated."""
    import os
    import shutil

    import pytest

    folder.mkdir()
    folder.chmod(0o555)
    prefix = ["setpriv", "--inh-caps=-dac_override", "--bounding-set=-dac_override"] if os.geteuid() == 0 else []
    if prefix and not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: a read-only folder cannot be simulated")
    return prefix


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def kdpipe(*args: object, ok: bool = True) -> Result:
    """`run_cli` letting exceptions through: a traceback fails the test where it happens."""
    return run_cli(*args, ok=ok, catch_exceptions=False)


def student_kwargs() -> dict:
    return {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "head_dim": 32}


def texts(n: int) -> list[str]:
    from kdpipe.data import arithmetic
    from kdpipe.data.templates import ARITHMETIC

    return [ARITHMETIC.format(instruction=r["instruction"]) + " " + r["output"] for r in arithmetic.generate("train")[:n]]


def run_cli(*args: object, ok: bool = True, catch_exceptions: bool = True) -> Result:
    """`kdpipe ARGS` in-process; with ok=True, fail the test on a non-zero exit."""
    from kdpipe.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=catch_exceptions)
    if ok:
        assert result.exit_code == 0, (result.output, result.exception)
    return result


def dry_run_refuses(folder: Path, config: str, edit: tuple[str, str], words: list[str]) -> None:
    """`kdpipe run --dry-run` on `config` with one edit (old, new) fails naming each of `words`."""
    old, new = edit
    assert old in config
    (folder / "bad.yaml").write_text(config.replace(old, new, 1))
    result = kdpipe("run", folder / "bad.yaml", "--dry-run", ok=False)
    assert result.exit_code != 0
    for word in words:
        assert word in result.output, result.output


def expect_error(*args: object, match: str):
    """`kdpipe ARGS` must fail with a message (not a traceback) containing `match`."""
    result = run_cli(*args, ok=False)
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # a message, not a traceback
    assert match in result.output, result.output
    return result
