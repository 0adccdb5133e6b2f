"""Exact-match checkers: checker(fields, answer, reference) -> bool from a --checker value.

arithmetic (the arithmetic task's own check), exact (equal to the reference, stripped),
regex:PATTERN ({field} inserts an example's field, escaped) or path/to/file.py:function, a
function of (fields, answer). The default is the template's (`Template.checker`).
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kdpipe.data import arithmetic
from kdpipe.data.templates import Template
from kdpipe.errors import KdpipeError, first_line

Checker = Callable[[dict[str, Any], str, str], bool]
FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def make_checker(spec: str | None, template: Template) -> Checker:
    """checker(fields, answer, reference) -> bool from a --checker value (see EvaluateConfig.checker)."""
    spec = spec or template.checker
    if spec in ("arithmetic", "builtin:arithmetic", "kdpipe.data.arithmetic.check"):
        return _arithmetic
    if spec == "exact":
        return lambda _f, answer, ref: answer.strip() == ref.strip()
    if spec.startswith("regex:"):
        return _regex(spec[len("regex:"):])
    file, sep, name = spec.rpartition(":")
    if sep and file.endswith(".py"):
        fn = _load_function(Path(file), name)
        return lambda fields, answer, _ref: bool(fn(fields, answer))
    raise KdpipeError(f"unknown --checker {spec!r}; use arithmetic, exact, regex:PATTERN or "
                      "path/to/file.py:function")


def _arithmetic(fields: dict[str, Any], answer: str, _ref: str) -> bool:
    if "instruction" not in fields:
        raise KdpipeError("the arithmetic checker needs an 'instruction' field (the number)")
    return arithmetic.check(str(fields["instruction"]), answer)


def _regex(pattern: str) -> Checker:
    def bad(e: re.error) -> KdpipeError:
        return KdpipeError(f"--checker regex:{pattern} is not a valid regular expression: {e}")

    try:  # refused before any model loads, with a placeholder for each field
        re.compile(FIELD.sub("x", pattern))
    except re.error as e:
        raise bad(e) from None

    def check(fields: dict[str, Any], answer: str, _ref: str) -> bool:
        def field_value(m: re.Match[str]) -> str:
            return re.escape(str(fields[m.group(1)])) if m.group(1) in fields else m.group(0)

        try:
            return re.fullmatch(FIELD.sub(field_value, pattern), answer.strip()) is not None
        except re.error as e:
            raise bad(e) from None

    return check


def _load_function(path: Path, name: str) -> Callable[..., Any]:
    if not path.is_file():
        raise KdpipeError(f"checker file {path} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"kdpipe_checker_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)  # type: ignore[union-attr]
    except Exception as e:
        raise KdpipeError(f"checker file {path} failed to import: {first_line(e)}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise KdpipeError(f"checker file {path} has no function {name!r}")
    return fn
