"""Evaluate: task metrics, fidelity to the teacher, lm-evaluation-harness tasks; several models side by side.

Recipe: resolve the models (hub ids, folders, LoRA adapters, run folders; by default the latest
finished run's student, its base and its teacher), load and check the data once, then one model at a
time (never two in memory): load, run each task, the cache fidelity pass and lm-eval, free. Write
one table as JSON and CSV (+ per-example predictions and plots) and return it. The parts are
`kdpipe.evaluation`; this module imports no torch until `run`, since the CLI reads `EvaluateConfig`.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import kdpipe
from kdpipe.data.sources import load_examples
from kdpipe.data.templates import get_template
from kdpipe.errors import KdpipeError
from kdpipe.evaluation.report import definitions as metric_definitions
from kdpipe.evaluation.report import format_table, summary, write_results
from kdpipe.evaluation.tasks import TASKS, check_examples, data_info, resolve_tasks
from kdpipe.stages.configs import EvaluateConfig  # torch-free: the CLI builds its options from it

__all__ = ["EvaluateConfig", "format_table", "run", "summary"]


def run(cfg: EvaluateConfig, command: str = "", echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Evaluate every model of `cfg`; write results.json/.csv (+ predictions, plots); return the results."""
    import torch

    from kdpipe.evaluation import fidelity, harness, specs
    from kdpipe.models import pick_device

    torch.manual_seed(cfg.seed)
    pick_device(cfg.device)  # a device this machine lacks: said before anything loads
    models = specs.resolve_models(cfg, echo)  # with no --dataset, cfg gets the run's data
    template = get_template(cfg.resolved_template(), cfg.label_names) if cfg.dataset else None
    tasks = resolve_tasks(cfg, template)
    if not tasks and not cfg.cache and not cfg.lm_eval:
        raise KdpipeError("nothing to evaluate: pass --dataset (with --task), --cache and/or --lm-eval")
    manager = harness.check_lm_eval(cfg.lm_eval, cfg.lm_eval_files) if cfg.lm_eval else None
    examples = load_examples(cfg).examples if tasks else []
    if tasks:
        check_examples(examples, template, tasks, cfg)
    cache = fidelity.open_heldout(cfg.cache, echo, models, cfg.verify) if cfg.cache else None
    work = Work(tasks, examples, template, cache, manager)
    tokenizers = specs.load_tokenizers(models, echo)

    results: dict[str, Any] = {
        "kdpipe_version": kdpipe.__version__, "command": command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "data": data_info(cfg, examples, template, tasks),
        "cache": cfg.cache, "lm_eval": cfg.lm_eval, "lm_eval_data": cfg.lm_eval_files, "definitions": {},
        "models": [],
    }
    predictions: list[dict[str, Any]] = []
    for spec in models:  # one at a time: never two models in memory
        evaluated = evaluate_model(spec, tokenizers[spec.name], cfg, work, echo)
        if evaluated is not None:
            results["models"].append(evaluated[0])
            predictions += evaluated[1]

    results["definitions"] = metric_definitions(results)
    out = specs.output_folder(cfg.output, models)
    plotted = _plots(results, models, out, echo) if cfg.plot else []
    write_results(results, predictions, out, plotted)
    return results


@dataclass(frozen=True)
class Work:
    """What every model is evaluated on: the tasks and their data, the held-out cache, lm-eval's tasks."""

    tasks: list[str]
    examples: list[Any]
    template: Any
    cache: Any
    lm_eval_manager: Any


def evaluate_model(spec: Any, tokenizer: Any, cfg: EvaluateConfig, work: Work,
                   echo: Callable[[str], None]) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
    """Load one model, run the tasks, fidelity and lm-eval on it, free it: (its results.json entry, its
    predictions), or None for an optional model that does not load."""
    import torch

    from kdpipe.evaluation import fidelity, harness, specs

    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    try:
        model = specs.load_model(spec, cfg.dtype, cfg.device)
    except KdpipeError as e:
        if not spec.optional:
            raise
        echo(f"skipping the {spec.role or 'model'} {spec.source}: {e.message}")
        return None
    threads = torch.get_num_threads()
    if specs.small_on_cpu(model):
        torch.set_num_threads(1)
    values: dict[str, float] = {}
    predictions: list[dict[str, Any]] = []
    for task in work.tasks:
        out, preds = TASKS[task].run(model, tokenizer, work.examples, work.template, cfg, spec)
        values.update({f"{task}/{k}": v for k, v in out.items()})
        predictions += [{"model": spec.name, "task": task, **p} for p in preds]
    if work.cache is not None:
        fid = fidelity.fidelity(model, tokenizer, work.cache, cfg, spec)
        values.update({f"fidelity/{k}": v for k, v in fid.items()})
    if cfg.lm_eval:
        scores, samples = harness.run_lm_eval(model, tokenizer, cfg, work.lm_eval_manager)
        values.update(scores)
        predictions += [{"model": spec.name, **p} for p in samples]
    torch.set_num_threads(threads)
    del model
    gc.collect()
    for note in spec.notes:
        echo(f"note ({spec.name}): {note}")
    row = {"name": spec.name, "source": spec.source, "kind": spec.kind, "role": spec.role, "path": spec.path,
           "base": spec.base, "run": str(spec.run) if spec.run else None, "notes": spec.notes,
           "metrics": values, "seconds": round(time.perf_counter() - start, 2)}
    return row, predictions


def _plots(results: dict[str, Any], models: list[Any], out: Any, echo: Callable[[str], None]) -> list[str]:
    from kdpipe.evaluation import plots

    plotted, message = plots.write_plots(results, {s.name: s.run for s in models if s.run}, out)
    if message:
        echo(message)
    return plotted
