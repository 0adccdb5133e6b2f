"""The stage interface (issue 13): one Stage per stage behind the CLI and `kdpipe run`, one command-line
rebuilder whose commands replay, init-model defined once, KdpipeError a plain exception."""

from __future__ import annotations

import dataclasses
import json
import shlex
import textwrap
import typing

import click
import pytest
from helpers import expect_error, run_cli

from kdpipe.config import load_config
from kdpipe.errors import KdpipeError
from kdpipe.stages.base import command_line
from kdpipe.stages.registry import STAGES


def parse(command: str):
    """The config the CLI builds from `command` (parsed by click as `kdpipe` would, nothing run)."""
    from kdpipe.cli import main

    words = shlex.split(command)
    assert words[0] == "kdpipe"
    stage = next(s for s in STAGES if s.name == words[1])
    ctx = main.commands[stage.name].make_context(stage.name, words[2:])
    options = dict(ctx.params)
    config_file = options.pop("config_file")
    for name in stage.repeatable:
        options[name] = [v for value in options.get(name) or () for v in value.split(",") if v.strip()]
        options[name] = options[name] or None
    return load_config(stage.config, config_file, options)


def other_values(f: dataclasses.Field, hint: typing.Any, default: typing.Any) -> list[typing.Any]:
    """Values other than the default a field can take (tried one at a time; the config may refuse some)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        return [not default]
    if set(args) == {bool, type(None)}:  # a switch whose default is decided later (evaluate --plot)
        return [v for v in (True, False) if v != default]
    if origin is typing.Literal:
        return [a for a in args if a != default]
    plain = [a for a in args if a is not type(None)] if origin not in (dict, list) and args else [hint]
    kind = typing.get_origin(plain[0]) or plain[0]
    if kind is int:
        return [(default or 0) + 3, 7]
    if kind is float:
        return [0.25, 3.0, (default or 0) + 0.5]
    if kind is list:
        return [["a"], ["a", "b"]]
    if kind is dict:
        return [{"a": "b"}]
    return ["x", "path/to/x.jsonl"]


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_every_option_of_every_stage_replays_through_the_cli(stage):
    """What `kdpipe run --dry-run` prints and every output records is a command the CLI accepts and that
    builds the same config (before: init-model's --intermediate-size was rejected, --full came out as
    --no-lora)."""
    hints = typing.get_type_hints(stage.config)
    defaults = stage.config()
    tried = 0
    for f in dataclasses.fields(stage.config):
        for value in other_values(f, hints[f.name], getattr(defaults, f.name)):
            try:
                cfg = stage.config(**{f.name: value})
            except (ValueError, TypeError):
                continue  # refused by the config itself (e.g. merge without lora)
            command = command_line(stage, cfg)
            assert parse(command) == cfg, command
            tried += 1
    assert tried >= len(dataclasses.fields(stage.config))


def test_full_is_recorded_as_full_and_the_recorded_command_replays(world, tmp_path):
    out = tmp_path / "run"
    run_cli("train-student", "--cache", world.cache, "--model", world.student, "--output", out, "--full",
            "--max-steps", 1, "--lr", "0.001")
    record = json.loads((out / "kdpipe_run.json").read_text())
    words = shlex.split(record["command"])
    assert "--full" in words and "--no-lora" not in words, record["command"]
    replayed = parse(record["command"])
    assert replayed.lora is False and replayed.max_steps == 1 and replayed.lr == 0.001
    assert replayed.cache == str(world.cache) and replayed.output == str(out)


def test_init_model_options_are_the_run_steps_options():
    from kdpipe.cli import main
    from kdpipe.stages.experiment import STEPS
    from kdpipe.stages.init_model import InitModelConfig

    cli = {p.name for p in main.commands["init-model"].params} - {"config_file"}
    for step in STEPS:
        if step.stage.name == "init-model":
            assert step.cls is InitModelConfig
    assert cli == {f.name for f in dataclasses.fields(InitModelConfig)}
    assert "intermediate_size" in cli


def test_a_folder_made_by_kdpipe_init_model_is_accepted_by_kdpipe_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_cli("init-model", "-o", "runs/c/student-init", "--train-tokenizer-on", "kdpipe:arithmetic",
            "--vocab-size", 300, "--hidden-size", 32, "--layers", 1, "--heads", 2, "--kv-heads", 1,
            "--intermediate-size", 48)
    (tmp_path / "c.yaml").write_text(textwrap.dedent("""\
        student_init:
          train_tokenizer_on: kdpipe:arithmetic
          vocab_size: 300
          hidden_size: 32
          layers: 1
          heads: 2
          kv_heads: 1
          intermediate_size: 48
        """))
    out = run_cli("run", "c.yaml").output
    assert "student_init: skipped (runs/c/student-init holds this model)" in out, out
    config = json.loads((tmp_path / "runs/c/student-init/config.json").read_text())
    assert config["intermediate_size"] == 48
    config = (tmp_path / "c.yaml").read_text()
    (tmp_path / "c.yaml").write_text(config.replace("hidden_size: 32", "hidden_size: 64"))
    expect_error("run", "c.yaml", match="holds a model initialised with other options (hidden_size: 32 -> 64")


def test_kdpipe_error_is_a_plain_exception_the_cli_turns_into_its_message_and_exit_code(tmp_path):
    assert not issubclass(KdpipeError, click.ClickException)
    assert str(KdpipeError("the message")) == "the message" and KdpipeError("m").exit_code == 2
    result = expect_error("cache", "verify", tmp_path / "none", match="Error: ")
    assert result.exit_code == 2
    result = expect_error("init-model", "-o", tmp_path / "m", match="pass exactly one of --tokenizer or "
                          "--train-tokenizer-on")
    assert result.exit_code == 2 and "Traceback" not in result.output
