"""`kdpipe --help`, a command's --help and its option errors import neither torch nor transformers
(issue 18: start-up), checked in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "transformers", "peft", "datasets", "pyarrow", "numpy")

PROBE = """
import json, sys
from kdpipe.cli import main
codes = []
for args in json.loads(sys.argv[1]):
    try:
        main(args, prog_name="kdpipe")
    except SystemExit as e:
        codes.append(e.code)
print(json.dumps({"codes": codes, "loaded": [m for m in json.loads(sys.argv[2]) if m in sys.modules]}))
"""


def probe(*invocations: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(invocations), json.dumps(HEAVY)],
                         capture_output=True, text=True, check=True, timeout=120).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_help_and_option_errors_import_no_torch_or_transformers():
    from kdpipe.stages.registry import STAGES

    helps = [["--help"], ["run", "--help"], ["plan", "--help"], ["cache", "--help"]]
    helps += [[s.name, "--help"] for s in STAGES]
    errors = [["train-student", "--no-such-option"], ["cache-teacher", "--top-k", "many"],
              ["evaluate", "--dtype", "fp64"], ["init-model", "--layers"], ["finetune", "--lora-r", "1.5"],
              ["no-such-command"]]
    result = probe(*helps, *errors)
    assert result["codes"] == [0] * len(helps) + [2] * len(errors), result
    assert result["loaded"] == [], f"imported by --help or an option error: {result['loaded']}"
