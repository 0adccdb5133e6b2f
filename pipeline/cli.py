"""The `kdpipe` command line. Each stage's options are generated from its config dataclass."""

from __future__ import annotations

import dataclasses
import json
import shlex
import typing
from collections.abc import Callable
from typing import Any, Literal

import click

import kdpipe
from kdpipe.config import load_config
from kdpipe.errors import KdpipeError


def config_options(cls: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add one click option per field of `cls` (``top_k`` -> ``--top-k``), plus ``--config FILE``.

    Every option defaults to None, so only what the user typed overrides the config file.
    """
    hints = typing.get_type_hints(cls)

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        for f in reversed(dataclasses.fields(cls)):
            fn = _field_option(f, hints[f.name])(fn)
        return click.option("--config", "config_file", type=click.Path(dir_okay=False),
                            help="YAML file with any of these options as keys (options given here win).")(fn)

    return decorate


def _field_option(f: dataclasses.Field, hint: Any) -> Callable[..., Any]:
    flag = f.metadata.get("flag")
    name = f.name.replace("_", "-")
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    help_text = f.metadata.get("help", "")
    if default not in (None, [], {}, "") and not isinstance(default, bool):
        shown = ",".join(default) if isinstance(default, list) else default
        help_text += f"  [default: {shown}]"
    if hint is bool:
        return click.option(flag or f"--{name}/--no-{name}", f.name, default=None, help=help_text)
    args = typing.get_args(hint)
    if typing.get_origin(hint) is Literal:
        return click.option(f"--{name}", f.name, type=click.Choice([str(a) for a in args]), default=None, help=help_text)
    plain = [a for a in args if a is not type(None)] if args and typing.get_origin(hint) is not dict else [hint]
    kind = {int: click.INT, float: click.FLOAT}.get(plain[0] if len(plain) == 1 else None, click.STRING)
    return click.option(f"--{name}", f.name, type=kind, default=None, help=help_text)


def command_line(config_file: str | None, options: dict[str, Any]) -> str:
    """The command as the user gave it, rebuilt from its parsed options (for the manifest)."""
    path = click.get_current_context().command_path.split()[1:]
    words = ["kdpipe", *path] + (["--config", config_file] if config_file else [])
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else f"--no-{name.replace('_', '-')}")
        elif isinstance(value, (list, tuple)):  # a repeatable option (train-student --cache A --cache B)
            words += [w for v in value for w in (flag, str(v))]
        elif value is not None:
            words += [flag, str(value)]
    return shlex.join(words)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(kdpipe.__version__, prog_name="kdpipe")
def main() -> None:
    """kdpipe: offline knowledge distillation for LLMs.

    \b
    1. cache-teacher  run the teacher once, cache its sparse distributions (Parquet)
    2. train-student  train a student (LoRA or full) against the cache
    3. evaluate       task metrics, fidelity to the teacher, benchmarks
    """


from kdpipe.stages.cache_teacher import CacheTeacherConfig  # noqa: E402


@main.command("cache-teacher")
@config_options(CacheTeacherConfig)
def cache_teacher_cmd(config_file: str | None, **options: Any) -> None:
    """Run the teacher once over a dataset and cache each target token's top-k distribution.

    \b
    Example:
      kdpipe cache-teacher --model Qwen3-4B --dataset imdb --top-k 32 --cache cache/imdb
    Rerunning the same command resumes after the last complete shard.
    """
    from kdpipe.stages import cache_teacher

    cfg = load_config(CacheTeacherConfig, config_file, options)
    manifest = cache_teacher.run(cfg, command_line(config_file, options))
    click.echo(f"cached {cache_teacher.summary(manifest)} -> {cfg.cache_folder()}")


from kdpipe.stages.generate import GenerateConfig  # noqa: E402


@main.command("generate")
@config_options(GenerateConfig)
def generate_cmd(config_file: str | None, **options: Any) -> None:
    """Write a model's completions of the template's prompts as a dataset (sequence-level or on-policy KD data).

    \b
    Example:
      kdpipe generate --model runs/demo/teacher --dataset kdpipe:arithmetic --output data/teacher-gen.jsonl
    Rerunning the same command continues after the last complete row.
    """
    from kdpipe.stages import generate

    cfg = load_config(GenerateConfig, config_file, options)
    click.echo(generate.summary(generate.run(cfg, command_line(config_file, options)), cfg.output))


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
        click.echo(f"{key:<{width}}  {value:,}" if isinstance(value, int) and not isinstance(value, bool) else f"{key:<{width}}  {value}")


@cache_group.command("verify")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--no-values", is_flag=True, help="Skip the decoded-value sanity checks (checksums, schema and counts only).")
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

    merged = merge(list(parts), output)
    click.echo(f"merged {len(parts)} part(s): {merged['totals']['rows']} examples in {merged['totals']['shards']} shards -> {output}")


@main.command("init-model")
@click.option("--output", "-o", required=True, type=click.Path(), help="Folder for the new model and tokenizer.")
@click.option("--tokenizer", default=None, help="Use this model's tokenizer (hub id or path) ...")
@click.option("--train-tokenizer-on", "corpus", default=None,
              help="... or train a byte-level BPE on this dataset's rendered examples (e.g. kdpipe:arithmetic).")
@click.option("--template", default="auto", show_default=True, help="Template used to render the tokenizer corpus.")
@click.option("--vocab-size", type=int, default=512, show_default=True,
              help="Vocabulary of a trained tokenizer: 256 bytes + 2 special tokens + merges (at least 258).")
@click.option("--char-level", is_flag=True,
              help="Train no merges: one token per byte (per character of ASCII text).")
@click.option("--hidden-size", type=int, default=64, show_default=True)
@click.option("--layers", type=int, default=2, show_default=True)
@click.option("--heads", type=int, default=4, show_default=True)
@click.option("--kv-heads", type=int, default=2, show_default=True)
@click.option("--head-dim", type=int, default=32, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def init_model_cmd(output: str, tokenizer: str | None, corpus: str | None, template: str, vocab_size: int,
                   char_level: bool, hidden_size: int, layers: int, heads: int, kv_heads: int, head_dim: int,
                   seed: int) -> None:
    """Build a randomly initialised Qwen3-architecture model (a custom student, or the offline demo's teacher)."""
    from kdpipe import tiny
    from kdpipe.models import load_tokenizer

    if bool(tokenizer) == bool(corpus):
        raise KdpipeError("pass exactly one of --tokenizer or --train-tokenizer-on")
    if tokenizer:
        tok = load_tokenizer(tokenizer)
    else:
        tok = tiny.train_tokenizer(_corpus(corpus, template), vocab_size, char_level)
        note = tiny.vocabulary_note(tok, vocab_size, char_level)
        if note:
            click.echo(note, err=True)
    if heads % kv_heads:
        raise KdpipeError(f"--heads ({heads}) must be a multiple of --kv-heads ({kv_heads})")
    model = tiny.init_model(output, tok, hidden_size, layers, heads, kv_heads, head_dim, seed=seed)
    click.echo(f"initialised a {sum(p.numel() for p in model.parameters()):,}-parameter model -> {output}")


def _corpus(dataset: str, template_name: str) -> list[str]:
    from kdpipe.data import DataConfig, load_examples
    from kdpipe.templates import get_template

    cfg = DataConfig(dataset=dataset, template=template_name)
    template = get_template(cfg.resolved_template(), cfg.label_names)
    return ["".join(s.text for s in template.render(e.fields, e.id)) for e in load_examples(cfg).examples]


# ---- stage two: train-student, finetune, merge-lora ----
from kdpipe.stages.finetune import FinetuneConfig  # noqa: E402
from kdpipe.stages.train_student import TrainStudentConfig  # noqa: E402


def _repeatable(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Make the generated option `name` repeatable (its value: a list, or None when not given)."""
    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        for param in fn.__click_params__:
            if param.name == name:
                param.multiple, param.default = True, None
        return fn

    return decorate


@main.command("train-student")
@_repeatable("cache")
@config_options(TrainStudentConfig)
def train_student_cmd(config_file: str | None, **options: Any) -> None:
    """Train a student (LoRA or full) against a teacher cache with a sparse distillation loss.

    \b
    Example:
      kdpipe train-student --cache cache/imdb --model Qwen3-0.6B --output runs/imdb-0.6b --loss fkl --alpha 0.5
    Multi-GPU: accelerate launch -m kdpipe.cli train-student ...   (or torchrun --nproc-per-node N -m kdpipe.cli ...)
    """
    from kdpipe.stages import train_student

    options["cache"] = list(options.get("cache") or ()) or None  # --cache A --cache B: both, mixed
    cfg = load_config(TrainStudentConfig, config_file, options)
    record = train_student.run(cfg, command_line(config_file, options))
    if record:
        click.echo(train_student.summary(record, cfg.output))


@main.command("finetune")
@config_options(FinetuneConfig)
def finetune_cmd(config_file: str | None, **options: Any) -> None:
    """Supervised fine-tuning (cross-entropy only, LoRA or full): a teacher before caching, or the SFT baseline.

    \b
    Example:
      kdpipe finetune --model Qwen3-4B --dataset imdb --lora --merge --output runs/imdb-teacher
    """
    from kdpipe.stages import finetune

    cfg = load_config(FinetuneConfig, config_file, options)
    record = finetune.run(cfg, command_line(config_file, options))
    if record:
        click.echo(finetune.summary(record, cfg.output))


@main.command("merge-lora")
@click.argument("adapter", type=click.Path())
@click.option("--output", "-o", required=True, type=click.Path(), help="New folder for the merged model and its tokenizer.")
def merge_lora_cmd(adapter: str, output: str) -> None:
    """Merge a LoRA adapter folder into its base model (loadable by AutoModelForCausalLM)."""
    from kdpipe.training import merge_lora

    click.echo(f"merged {adapter} -> {merge_lora(adapter, output)}")


# ---- evaluate ----
from kdpipe.stages.evaluate import EvaluateConfig  # noqa: E402


def _evaluate_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """EvaluateConfig's options, with --model repeatable (each also takes a comma-separated list)."""
    fn = config_options(EvaluateConfig)(fn)
    for param in fn.__click_params__:
        if param.name == "model":
            param.multiple, param.default = True, None
    return fn


@main.command("evaluate")
@_evaluate_options
def evaluate_cmd(config_file: str | None, **options: Any) -> None:
    """Evaluate models side by side: task metrics, fidelity to the teacher, lm-eval benchmarks.

    \b
    Examples:
      kdpipe evaluate                                   # latest finished run: student, base, teacher
      kdpipe evaluate --model runs/demo-student --model runs/demo/teacher --dataset kdpipe:arithmetic --split test
      kdpipe evaluate --model runs/imdb-0.6b --dataset imdb --split test --limit 500 --cache cache/imdb-heldout
    Writes results.json, results.csv, predictions.jsonl and metrics.png to --output (default RUN/eval or eval).
    """
    from kdpipe.stages import evaluate

    options["model"] = [m for value in options.get("model") or () for m in value.split(",") if m.strip()] or None
    cfg = load_config(EvaluateConfig, config_file, options)
    shown = {k: (",".join(v) if isinstance(v, list) else v) for k, v in options.items()}
    results = evaluate.run(cfg, command_line(config_file, shown), echo=lambda m: click.echo(m, err=True))
    click.echo(evaluate.format_table(results))
    click.echo(evaluate.summary(results))


# ---- plan: will it fit, how long, how big (config.json only; imports no torch) ----
@main.command("plan")
@click.option("--teacher", default=None, help="Teacher: short name (Qwen3-4B), hub id, local folder or config.json.")
@click.option("--student", default=None, help="Student, as --teacher.")
@click.option("--gpu", default=None, help="t4, l4, a10g, 4090, a100-40, a100-80, h100, h200 or cpu.")
@click.option("--gpu-memory-gb", type=float, default=None, help="The device's usable memory (overrides the table's).")
@click.option("--dataset", default=None, help="A known hub dataset (imdb, ...) or a local file: its number of examples.")
@click.option("--limit", type=int, default=None, help="Examples (as cache-teacher --limit).")
@click.option("--tokens", type=float, default=None, help="Total tokens of the data (instead of examples x --mean-length).")
@click.option("--mean-length", type=float, default=None, help="Tokens per example  [default: --max-length]")
@click.option("--targets-per-example", type=float, default=None,
              help="Distilled tokens per example (completions only: the completion's length)  [default: every token]")
@click.option("--max-length", type=int, default=512, show_default=True)
@click.option("--top-k", type=int, default=32, show_default=True)
@click.option("--encoding", type=click.Choice(["plain", "compact", "compact16"]), default="compact", show_default=True)
@click.option("--sparse-mode", type=click.Choice(["topk", "sampled"]), default="topk", show_default=True)
@click.option("--samples", type=int, default=12, show_default=True, help="Sampled mode: draws per position.")
@click.option("--lora/--full", default=True, help="LoRA (default) or every weight of the student.")
@click.option("--lora-r", type=int, default=16, show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True, help="The student's micro-batch.")
@click.option("--gradient-checkpointing", is_flag=True, help="The student recomputes activations in backward.")
@click.option("--backend", type=click.Choice(["hf", "vllm"]), default="hf", show_default=True)
@click.option("--vllm-gpu-memory-utilization", type=float, default=0.9, show_default=True)
@click.option("--vllm-max-num-batched-tokens", type=int, default=8192, show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto", show_default=True,
              help="Teacher dtype (auto: fp16 below compute capability 8, bf16 from 8, fp32 on CPU).")
@click.option("--precision", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto", show_default=True,
              help="Student mixed precision (same rule).")
@click.option("--efficiency", type=float, default=0.35, show_default=True, help="Fraction of peak FLOP/s reached.")
@click.option("--layers", type=int, default=None, help="Plan with this many layers (as bench_real_shapes --layers).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def plan_cmd(teacher: str | None, student: str | None, gpu: str | None, gpu_memory_gb: float | None,
             dataset: str | None, limit: int | None, tokens: float | None, mean_length: float | None,
             targets_per_example: float | None, max_length: int, top_k: int, encoding: str, sparse_mode: str,
             samples: int, lora: bool, lora_r: int, batch_size: int, gradient_checkpointing: bool, backend: str,
             vllm_gpu_memory_utilization: float, vllm_max_num_batched_tokens: int, dtype: str, precision: str,
             efficiency: float, layers: int | None, as_json: bool) -> None:
    """Predict each stage's peak memory, whether it fits, the largest batch, its time and the cache's size.

    \b
    Example:
      kdpipe plan --teacher Qwen3-4B --student Qwen3-0.6B --gpu t4 --dataset imdb --mean-length 300 --targets-per-example 2
    From config.json only (no weights are loaded); stages: cache-teacher, train-student, and for
    comparison online KD with both models resident and the student's SFT alone.
    """
    from kdpipe import plan

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
                      targets_per_example=targets_per_example if targets_per_example is not None else mean_length - 1,
                      max_length=max_length, top_k=top_k, encoding=encoding, sparse_mode=sparse_mode, samples=samples,
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
@click.option("--dry-run", is_flag=True, help="Print the plan (each step, its equivalent command, run or skip) and stop.")
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


if __name__ == "__main__":
    main()
