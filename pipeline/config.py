"""Stage configs: dataclasses filled from a YAML file and CLI options (the CLI wins), validated.

Each stage declares one dataclass. Its fields are the YAML keys and, with dashes, the CLI options,
so a key and its option can never drift apart. `field_help` attaches the ``--help`` text.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from kdpipe.errors import KdpipeError

C = TypeVar("C")


def option(default: Any, help: str, flag: str | None = None, hf: str | None = None) -> Any:
    """A config field with its ``--help`` text; `flag` overrides the option spelling (e.g.
    "--lora/--full"); `hf` names the `transformers.TrainingArguments` field it is passed to."""
    factory = isinstance(default, (dict, list))
    kwargs = {"default_factory": (lambda d=default: type(d)(d))} if factory else {"default": default}
    return dataclasses.field(metadata={"help": help, "flag": flag, "hf": hf}, **kwargs)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from `path`, with a clear error for a missing file or bad YAML."""
    path = Path(path)
    if not path.is_file():
        raise KdpipeError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise KdpipeError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise KdpipeError(f"config file {path} must hold a mapping of keys to values, "
                          f"not {type(data).__name__}")
    return data


def build_config(cls: type[C], values: dict[str, Any], source: str = "config") -> C:
    """Instantiate dataclass `cls` from `values`, checking key names and value types."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in fields:
            raise KdpipeError(f"{source}: unknown key '{key}'{_unknown_key_hint(name, value, fields)}")
        kwargs[name] = _coerce(value, hints[name], f"{source}: '{key}'")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise KdpipeError(f"{source}: {e}") from None


def _unknown_key_hint(name: str, value: Any, fields: dict[str, dataclasses.Field]) -> str:
    """The way out of an unknown key: the YAML spelling of a CLI off-switch (`full: true` is `lora: false`,
    from ``--lora/--full``), else the closest key, else every key."""
    for field in fields.values():
        on, _, off = (field.metadata.get("flag") or "").partition("/")
        if off and off.lstrip("-").replace("-", "_") == name:
            yes = value if isinstance(value, bool) else True
            return (f"; '{off}' is the command line's switch for '{field.name}': write "
                    f"'{field.name}: {str(not yes).lower()}' in a config file")
    close = difflib.get_close_matches(name, fields, n=1)
    return f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(sorted(fields))}"


def load_config(cls: type[C], config_file: str | Path | None, cli_values: dict[str, Any]) -> C:
    """Merge a YAML file with CLI options (options left unset are None and do not override)."""
    values = read_yaml(config_file) if config_file else {}
    values.update({k: v for k, v in cli_values.items() if v is not None})
    return build_config(cls, values, source=str(config_file) if config_file else "options")


def to_dict(config: Any) -> dict[str, Any]:
    """A config as a plain dict (for manifests and logs)."""
    return dataclasses.asdict(config)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except KdpipeError as e:
                errors.append(str(e))
        raise KdpipeError(errors[0])
    if origin is Literal:
        if value not in args:
            raise KdpipeError(f"{where} must be one of {', '.join(map(str, args))}, not {value!r}")
        return value
    if origin is dict:
        if isinstance(value, str):  # CLI form: "a=b,c=d"
            value = _parse_pairs(value, where)
        if not isinstance(value, dict):
            raise KdpipeError(f"{where} must be a mapping, not {value!r}")
        return {str(k): str(v) for k, v in value.items()}
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise KdpipeError(f"{where} must be a list, not {value!r}")
        return [_coerce(v, args[0], where) for v in value] if args else list(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise KdpipeError(f"{where} must be true or false, not {value!r}")
    if hint in (int, float):
        if isinstance(value, bool) or (hint is int and isinstance(value, float) and not value.is_integer()):
            raise KdpipeError(f"{where} must be {'an integer' if hint is int else 'a number'}, not {value!r}")
        try:
            number = hint(value)
        except (TypeError, ValueError):
            raise KdpipeError(f"{where} must be {'an integer' if hint is int else 'a number'}, "
                              f"not {value!r}") from None
        if not math.isfinite(number):  # nan passes every range check (all comparisons are false), inf most
            raise KdpipeError(f"{where} must be a finite number, not {value!r}")
        return number
    if hint is str:
        if isinstance(value, (dict, list)):
            raise KdpipeError(f"{where} must be a string, not {value!r}")
        return str(value)
    return value


def _parse_pairs(text: str, where: str) -> dict[str, str]:
    pairs = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise KdpipeError(f"{where}: expected name=value pairs separated by commas, got {item!r}")
        pairs[key.strip()] = value.strip()
    return pairs


def progress_disabled() -> bool:
    """Progress bars off (``KDPIPE_NO_PROGRESS=1``: logs, CI, benchmarks)."""
    return os.environ.get("KDPIPE_NO_PROGRESS") == "1"
