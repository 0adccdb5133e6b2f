"""The models of an evaluation table: what the user named (hub ids, folders, LoRA adapters, run
folders) or, by default, the latest finished run's student, its base and its teacher; and loading
each (never two at a time)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdpipe.errors import KdpipeError, first_line
from kdpipe.evaluation import runs
from kdpipe.evaluation.runs import read_json
from kdpipe.run_folder import RUN_FILE


@dataclass
class ModelSpec:
    """One model of the table: what the user named and how to load it."""

    name: str
    source: str
    kind: str  # "model" or "adapter"
    path: str
    base: str | None = None
    run: Path | None = None
    role: str | None = None
    optional: bool = False  # skipped with a note (not an error) when it cannot be loaded
    notes: list[str] = field(default_factory=list)


def resolve_models(cfg: Any, echo: Callable[[str], None]) -> list[ModelSpec]:
    """The models of `cfg` (or the latest run's student, base and teacher); with no --dataset, `cfg`
    gets the data of the first run among them (and the experiment's evaluate settings)."""
    if cfg.model:
        specs = [resolve_spec(m) for m in cfg.model]
        for spec in specs:
            if spec.run is not None and not cfg.dataset:
                runs.data_from_run(cfg, read_json(spec.run / RUN_FILE), echo)
                break
    else:
        specs = _latest_run_models(cfg, echo)
    _unique_names(specs)
    return specs


def _latest_run_models(cfg: Any, echo: Callable[[str], None]) -> list[ModelSpec]:
    folder, record = runs.latest_run()
    experiment = runs.experiment_of(folder)
    echo(f"evaluating the latest finished run {folder}"
         + (f" (of the experiment {experiment['config']})" if experiment else ""))
    specs = [resolve_spec(str(folder))]
    specs[0].role = "student"
    base = (record.get("config") or {}).get("model") or (record.get("identity") or {}).get("model")
    if base:
        specs.append(ModelSpec(short_name(base), base, "model", base, role="base"))
    teacher = runs.run_teacher(record) or (experiment or {}).get("teacher")
    if teacher:
        specs.append(ModelSpec(short_name(teacher), teacher, "model", teacher, role="teacher", optional=True))
    if experiment and experiment.get("evaluate") and not cfg.dataset and not cfg.cache:
        runs.settings_from_experiment(cfg, experiment["evaluate"])
        echo(f"settings: the evaluate section of {experiment['config']} (data, tasks, cache)")
    if not cfg.dataset:
        runs.data_from_run(cfg, record, echo)
    return specs


def resolve_spec(source: str) -> ModelSpec:
    """A hub id, a model folder, a LoRA adapter folder or a run folder (model or adapter at its top)."""
    from kdpipe.models import resolve_model_name

    path = Path(source).expanduser()
    if not path.exists():
        resolved = resolve_model_name(source)  # a clear error for a missing local path
        return ModelSpec(short_name(source), source, "model", resolved)
    if not path.is_dir():
        raise KdpipeError(f"model {source} is a file; pass a model folder, a LoRA adapter folder, a run "
                          "folder or a hub id")
    run = path if (path / RUN_FILE).is_file() else None
    if run is not None:
        record = read_json(path / RUN_FILE)
        if record.get("status") not in runs.FINISHED:
            raise KdpipeError(f"run {path} has status '{record.get('status')}', not finished; evaluate it "
                              "when it is complete")
    if (path / "adapter_config.json").is_file():
        base = read_json(path / "adapter_config.json").get("base_model_name_or_path")
        if not base:
            raise KdpipeError(f"{path}/adapter_config.json names no base model (base_model_name_or_path)")
        if base.startswith(("/", ".", "~")) and not Path(base).expanduser().exists():
            raise KdpipeError(
                f"the LoRA adapter {source} is on the base model {base}, which does not exist (any more): "
                f"that path comes from {path / 'adapter_config.json'} (base_model_name_or_path). Point it at "
                "where the base model is now (a folder or hub id) by editing that key, or evaluate a merged "
                "model (kdpipe merge-lora)")
        return ModelSpec(path.resolve().name, source, "adapter", str(path), base=base, run=run)
    if (path / "config.json").is_file():
        return ModelSpec(path.resolve().name, source, "model", str(path), run=run)
    raise KdpipeError(f"{source} holds no model (no config.json) and no LoRA adapter "
                      "(no adapter_config.json)")


def load_tokenizers(specs: list[ModelSpec], echo: Callable[[str], None]) -> dict[str, Any]:
    """Each model's tokenizer, by spec name; an optional model whose tokenizer fails is dropped from
    `specs`."""
    tokenizers = {}
    for spec in list(specs):
        try:
            tokenizers[spec.name] = load_tokenizer(spec)
        except KdpipeError as e:
            if not spec.optional:
                raise
            echo(f"skipping the {spec.role or 'model'} {spec.source}: {e.message}")
            specs.remove(spec)
    return tokenizers


def load_tokenizer(spec: ModelSpec) -> Any:
    """The model's tokenizer; an adapter's own where it saved one, else its base model's."""
    from kdpipe import models

    if spec.kind == "adapter":
        has = any((Path(spec.path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
        return models.load_tokenizer(spec.path if has else spec.base)
    return models.load_tokenizer(spec.path)


def load_model(spec: ModelSpec, dtype: str, device: str) -> Any:
    """The model in eval mode; an adapter as a peft `PeftModel` on its base (named in adapter_config.json)."""
    from kdpipe import models

    if spec.kind != "adapter":
        return models.load_model(spec.path, dtype, device)
    from peft import PeftModel

    base = models.load_model(spec.base, dtype, device)
    try:
        return PeftModel.from_pretrained(base, spec.path).eval()
    except Exception as e:
        raise KdpipeError(f"could not load the LoRA adapter {spec.source} on its base {spec.base}: "
                          f"{first_line(e)}") from None


def small_on_cpu(model: Any) -> bool:
    """A loaded model that is evaluated on one CPU thread (`kdpipe.models.small_on_cpu`)."""
    from kdpipe import models

    return models.small_on_cpu(models.parameter_count(model), next(model.parameters()).device)


def output_folder(output: str | None, specs: list[ModelSpec]) -> Path:
    """--output, else the first run's eval/ folder, else eval/."""
    if output:
        return Path(output)
    run_folders = [s.run for s in specs if s.run is not None]
    return run_folders[0] / "eval" if run_folders else Path("eval")


def short_name(name: str) -> str:
    path = Path(name)
    return path.name if path.exists() or name.startswith(("/", ".", "~")) else name


def _unique_names(specs: list[ModelSpec]) -> None:
    seen: dict[str, int] = {}
    for spec in specs:
        n = seen.get(spec.name, 0)
        seen[spec.name] = n + 1
        if n:
            spec.name = f"{spec.name}#{n + 1}"
