"""The `kdpipe` command line. One command per stage of `kdpipe.stages.registry.STAGES`, its options generated
from the stage's config dataclass; the other commands (cache info/verify/merge, merge-lora, plan, run) are
written here. Nothing imported at module level imports torch: `kdpipe --help` and option errors stay fast."""

from __future__ import annotations

import dataclasses
import inspect
import json
import typing
from collections.abc import Callable
from typing import Any, Literal

import click

import kdpipe
from kdpipe.config import load_config
from kdpipe.errors import KdpipeError
from kdpipe.stages.base import Stage, flag_spelling
from kdpipe.stages.registry import STAGES

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def config_options(cls: type, stage: Stage | None = None) -> Decorator:
    """Add one click option per field of `cls` (``top_k`` -> ``--top-k``), plus ``--config FILE``.

    Every option defaults to None, so only what the user typed overrides the config file. A `stage`'s
    repeatable fields are given once per value, its short options are aliases (``-o``).
    """
    hints = typing.get_type_hints(cls)
    repeatable = stage.repeatable if stage else ()
    short = stage.short_options if stage else {}

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        for f in reversed(dataclasses.fields(cls)):
            fn = _field_option(f, hints[f.name], f.name in repeatable, short.get(f.name))(fn)
        return click.option("--config", "config_file", type=click.Path(dir_okay=False),
                            help="YAML file with any of these options as keys (options given here win).")(fn)

    return decorate


def _field_option(f: dataclasses.Field, hint: Any, multiple: bool = False,
                  short: str | None = None) -> Decorator:
    name = f.name.replace("_", "-")
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    help_text = f.metadata.get("help", "")
    if default not in (None, [], {}, "") and not isinstance(default, bool):
        shown = ",".join(default) if isinstance(default, list) else default
        help_text += f"  [default: {shown}]"
    if hint is bool:
        on, off = flag_spelling(f)
        return click.option(f"{on}/{off}", f.name, default=None, help=help_text)
    decls = [f"--{name}", *([short] if short else [])]
    args = typing.get_args(hint)
    if typing.get_origin(hint) is Literal:
        choice = click.Choice([str(a) for a in args])
        return click.option(*decls, f.name, type=choice, default=None, help=help_text)
    plain = [a for a in args if a is not type(None)] if args and typing.get_origin(hint) is not dict \
        else [hint]
    kind = {int: click.INT, float: click.FLOAT}.get(plain[0] if len(plain) == 1 else None, click.STRING)
    return click.option(*decls, f.name, type=kind, default=None, multiple=multiple, help=help_text)


class _CliError(click.ClickException):
    """A KdpipeError as click prints it: ``Error: MESSAGE`` and the error's exit code."""

    def __init__(self, error: KdpipeError) -> None:
        super().__init__(error.message)
        self.exit_code = error.exit_code


class _Main(click.Group):
    """The `kdpipe` group: turns a KdpipeError raised anywhere below into its message and exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KdpipeError as e:
            raise _CliError(e) from None


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(kdpipe.__version__, prog_name="kdpipe")
def main() -> None:
    """kdpipe: offline knowledge distillation for LLMs.

    \b
    1. cache-teacher  run the teacher once, cache its sparse distributions (Parquet)
    2. train-student  train a student (LoRA or full) against the cache
    3. evaluate       task metrics, fidelity to the teacher, benchmarks
    """


@main.group("cache")
def cache_group() -> None:
    """Inspect, check and join caches."""


@cache_group.command("info")
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def cache_info_cmd(path: str, as_json: bool) -> None:
    """Summarise a cache: teacher, data, k, encoding, sizes, bytes per target token."""
    from kdpipe.cache.tools import info

    summary = info(path)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    width = max(map(len, summary))
    for key, value in summary.items():
        click.echo(f"{key:<{width}}  {value:,}" if isinstance(value, int) and not isinstance(value, bool)
                   else f"{key:<{width}}  {value}")


@cache_group.command("verify")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--no-values", is_flag=True, help="Skip the decoded-value sanity checks (checksums, schema and "
                                                "counts only).")
def cache_verify_cmd(paths: tuple[str, ...], no_values: bool) -> None:
    """Check checksums, schema, row counts and value sanity; non-zero exit naming what is broken."""
    from kdpipe.cache.tools import verify

    failed = False
    for path in paths:
        problems = verify(path, values=not no_values)
        for problem in problems:
            click.echo(f"FAIL {problem}", err=True)
        if not problems:
            click.echo(f"ok   {path}")
        failed |= bool(problems)
    if failed:
        raise KdpipeError("cache verification failed (see above)")


@cache_group.command("merge")
@click.argument("parts", nargs=-1, required=True, type=click.Path())
@click.option("--output", "-o", required=True, type=click.Path(), help="New folder for the merged cache.")
def cache_merge_cmd(parts: tuple[str, ...], output: str) -> None:
    """Join the caches written with --num-shards/--shard-index into one."""
    from kdpipe.cache.tools import merge

    merged, written = merge(list(parts), output)
    click.echo(f"{'merged' if written else 'already merged (nothing to do)'} {len(parts)} part(s): "
               f"{merged.totals.rows} examples in {merged.totals.shards} shards -> {output}")


@main.command("merge-lora")
@click.argument("adapter", type=click.Path())
@click.option("--output", "-o", required=True, type=click.Path(), help="New folder for the merged model and "
                                                                       "its tokenizer.")
def merge_lora_cmd(adapter: str, output: str) -> None:
    """Merge a LoRA adapter folder into its base model (loadable by AutoModelForCausalLM)."""
    from kdpipe.train.lora import merge_lora

    click.echo(f"merged {adapter} -> {merge_lora(adapter, output, echo=click.echo)}")


# ---- the stages: one command per entry of kdpipe.stages.registry.STAGES ----


def stage_command(stage: Stage) -> click.Command:
    """The CLI command of `stage`: its config's options, its run, its report."""

    def callback(config_file: str | None, **options: Any) -> None:
        for name in stage.repeatable:  # each value may also be a comma-separated list
            values = [v for value in options.get(name) or () for v in value.split(",") if v.strip()]
            options[name] = values or None
        cfg = load_config(stage.config, config_file, options)
        result = stage.run(cfg, echo=lambda m: click.echo(m, err=True))
        text = stage.final_report(result, cfg)
        if text:
            click.echo(text)

    command = click.command(stage.name, help=inspect.cleandoc(stage.help))
    return command(config_options(stage.config, stage)(callback))


# ---- plan: will it fit, how long, how big (config.json only; imports no torch) ----
@main.command("plan")
@click.option("--teacher", default=None, help="Teacher: short name (Qwen3-4B), hub id, local folder or "
                                              "config.json.")
@click.option("--student", default=None, help="Student, as --teacher.")
@click.option("--gpu", default=None, help="t4, l4, a10g, 4090, a100-40, a100-80, h100, h200 or cpu.")
@click.option("--gpu-memory-gb", type=float, default=None, help="The device's usable memory (overrides the "
                                                                "table's).")
@click.option("--dataset", default=None, help="A known hub dataset (imdb, ...) or a local file: its number "
                                              "of examples.")
@click.option("--limit", type=int, default=None, help="Examples (as cache-teacher --limit).")
@click.option("--tokens", type=float, default=None, help="Total tokens of the data (instead of examples x "
                                                         "--mean-length).")
@click.option("--mean-length", type=float, default=None, help="Tokens per example  [default: --max-length]")
@click.option("--targets-per-example", type=float, default=None,
              help="Distilled tokens per example (completions only: the completion's length)  [default: "
                   "every token]")
@click.option("--max-length", type=int, default=512, show_default=True)
@click.option("--top-k", type=int, default=32, show_default=True)
@click.option("--encoding", type=click.Choice(["plain", "compact", "compact16"]), default="compact",
              show_default=True)
@click.option("--sparse-mode", type=click.Choice(["topk", "sampled"]), default="topk", show_default=True)
@click.option("--samples", type=int, default=12, show_default=True, help="Sampled mode: draws per position.")
@click.option("--lora/--full", default=True, help="LoRA (default) or every weight of the student.")
@click.option("--lora-r", type=int, default=16, show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True, help="The student's micro-batch.")
@click.option("--gradient-checkpointing", is_flag=True,
              help="The student recomputes activations in backward.")
@click.option("--backend", type=click.Choice(["hf", "vllm"]), default="hf", show_default=True)
@click.option("--vllm-gpu-memory-utilization", type=float, default=0.9, show_default=True)
@click.option("--vllm-max-num-batched-tokens", type=int, default=8192, show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto",
              show_default=True, help="Teacher dtype (auto: fp16 below compute capability 8, bf16 from 8, "
                                      "fp32 on CPU).")
@click.option("--precision", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto",
              show_default=True, help="Student mixed precision (same rule).")
@click.option("--efficiency", type=float, default=0.35, show_default=True, help="Fraction of peak FLOP/s "
                                                                                "reached.")
@click.option("--layers", type=int, default=None, help="Plan with this many layers (as bench_real_shapes "
                                                       "--layers).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def plan_cmd(teacher: str | None, student: str | None, gpu: str | None, gpu_memory_gb: float | None,
             dataset: str | None, limit: int | None, tokens: float | None, mean_length: float | None,
             targets_per_example: float | None, max_length: int, top_k: int, encoding: str, sparse_mode: str,
             samples: int, lora: bool, lora_r: int, batch_size: int, gradient_checkpointing: bool,
             backend: str, vllm_gpu_memory_utilization: float, vllm_max_num_batched_tokens: int, dtype: str,
             precision: str, efficiency: float, layers: int | None, as_json: bool) -> None:
    """Predict each stage's peak memory, whether it fits, the largest batch, its time and the cache's size.

    \b
    Example:
      kdpipe plan --teacher Qwen3-4B --student Qwen3-0.6B --gpu t4 --dataset imdb --mean-length 300 \\
        --targets-per-example 2
    From config.json only (no weights are loaded); stages: cache-teacher, train-student, and for
    comparison online KD with both models resident and the student's SFT alone.
    """
    from kdpipe.plan import estimate as plan

    if max_length < 1:
        raise KdpipeError(f"--max-length must be at least 1, not {max_length}")
    device = plan.get_device(gpu, gpu_memory_gb)
    examples = limit if limit is not None else plan.dataset_examples(dataset) if dataset else None
    if limit is not None and dataset:
        examples = min(limit, plan.dataset_examples(dataset))
    if tokens is not None and not tokens > 0:
        raise KdpipeError(f"--tokens must be positive, not {tokens:g}")
    if examples is None and tokens is None:
        raise KdpipeError("how much data? pass --dataset, --limit N (examples) or --tokens N")
    if examples is not None and examples < 1:
        raise KdpipeError(f"--limit must be at least 1, not {examples}")
    if mean_length is None:
        mean_length = tokens / examples if tokens and examples else float(max_length)
    if examples is None:
        examples = max(1, round(tokens / mean_length))
    w = plan.Workload(examples=examples, mean_length=mean_length,
                      targets_per_example=(targets_per_example if targets_per_example is not None
                                           else mean_length - 1),
                      max_length=max_length, top_k=top_k, encoding=encoding, sparse_mode=sparse_mode,
                      samples=samples,
                      backend=backend, lora=lora, lora_r=lora_r, batch_size=batch_size, efficiency=efficiency,
                      gradient_checkpointing=gradient_checkpointing,
                      vllm_gpu_memory_utilization=vllm_gpu_memory_utilization,
                      vllm_max_num_batched_tokens=vllm_max_num_batched_tokens,
                      teacher_dtype=dtype, precision=precision)
    result = plan.make_plan(teacher, student, device, w, layers)
    click.echo(json.dumps(result, indent=2) if as_json else plan.format_plan(result))


# ---- run: a whole experiment from one YAML file ----
@main.command("run")
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--dry-run", is_flag=True, help="Print the plan (each step, its equivalent command, run or "
                                              "skip) and stop.")
@click.option("--from", "start", default=None, help="Start at this step (earlier steps must be done).")
@click.option("--only", default=None, help="Run only this step.")
def run_cmd(config: str, dry_run: bool, start: str | None, only: str | None) -> None:
    """Run a whole experiment from one YAML file: teacher_init, finetune, cache, heldout_cache,
    student_init, train, baseline, evaluate (each section optional; keys = that stage's options).

    \b
    Example:
      kdpipe run configs/demo.yaml            # the offline demo
      kdpipe run configs/imdb-qwen3.yaml --dry-run
    A rerun skips every step whose output is complete with the same settings (resume after a crash).
    """
    from kdpipe.stages import run as pipeline_run

    if start and only:
        raise KdpipeError("pass --from or --only, not both")
    pipeline_run.run(config, start=start, only=only, dry_run=dry_run, echo=click.echo)


for _stage in STAGES:
    main.add_command(stage_command(_stage))


if __name__ == "__main__":
    main()
