"""`kdpipe generate`: a model's completions of the template's prompts, written as a dataset.

With the teacher it makes sequence-level KD data (Kim & Rush 2016); with the student, on-policy data
for the teacher to score (cache-teacher on the output file). Recipe: load the tokenizer and data,
render each prompt, load the model alone, then batch by batch: generate (seeded per row), decode,
append to the JSONL file. A rerun continues after the last complete row (see kdpipe.data.generated).

Each row is the example's own columns with the completion in the template's output field, an ``id``
(the example's, ``ID#j`` for its sample j > 0) and ``kdpipe_generate`` (source example, sample, model,
settings hash, why it stopped, new tokens).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from kdpipe.config import progress_disabled
from kdpipe.data.sources import load_examples
from kdpipe.errors import KdpipeError
from kdpipe.stages.configs import GenerateConfig

# The config is defined torch-free in kdpipe.stages.configs (the CLI builds its options from it).


def run(cfg: GenerateConfig, command: str = "") -> dict[str, Any]:
    """Generate (or continue) `cfg.output`; returns the sidecar record (settings, rows, ...)."""
    from tqdm.auto import tqdm

    from kdpipe.data.generated import GeneratedFile
    from kdpipe.data.templates import get_template
    from kdpipe.generation.hf import check_can_generate, make_jobs
    from kdpipe.models import load_tokenizer, pick_device, resolve_model_name
    from kdpipe.precision import resolve_dtype

    if not cfg.model:
        raise KdpipeError("no model given: pass --model (the teacher, or the student for on-policy data)")
    if not cfg.output:
        raise KdpipeError("no output file given: pass --output data/NAME.jsonl")
    if Path(cfg.output).suffix != ".jsonl":
        raise KdpipeError(f"--output {cfg.output}: kdpipe generate writes JSON lines; name the file *.jsonl")
    pick_device(cfg.device)
    check_can_generate(cfg.model, cfg.revision)
    tokenizer = load_tokenizer(cfg.model, cfg.revision)
    template = get_template(cfg.resolved_template(), cfg.label_names)
    selection = choose_fraction(load_examples(cfg), cfg.fraction, cfg.selection_seed())
    field = template.output_field()
    jobs, slot, skipped = make_jobs(selection.examples, template, tokenizer, field, cfg.samples,
                                    cfg.max_length, cfg.truncation)
    column = cfg.resolved_columns().get(field, field)  # the file keeps the source's column names
    dtype = resolve_dtype(cfg.dtype, cfg.device)
    model = resolve_model_name(cfg.model)
    model = str(Path(model).resolve()) if Path(model).exists() else model  # the same from any folder
    settings = _settings(cfg, selection, template, dtype, model)
    out = GeneratedFile(cfg.output, settings, cfg.overwrite, [j.row_id for j in jobs])
    if out.complete:
        return {**out._read_side(), "skipped": True}
    todo = jobs[len(out.done):]
    start, tokens, finish = time.perf_counter(), 0, {"eos": 0, "length": 0}
    generator = _load(cfg, tokenizer, dtype)
    try:
        bar = tqdm(total=len(jobs), initial=len(out.done), unit="row", desc=f"generating with {cfg.model}",
                   dynamic_ncols=True, mininterval=1.0, disable=progress_disabled())
        for i in range(0, len(todo), cfg.batch_size):
            batch = todo[i : i + cfg.batch_size]
            rows = []
            for job, (ids, why) in zip(batch, generator.generate(batch)):
                text = slot.strip(tokenizer.decode(ids, skip_special_tokens=True))
                rows.append(_row(job, selection.columns, column, text, settings["model"], out.hash, why,
                                 len(ids)))
                tokens, finish[why] = tokens + len(ids), finish[why] + 1
            out.append(rows)
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - start, 1e-9):,.0f}")
        bar.close()
        info = generator.info()
    finally:
        generator.close()
    return out.finish({"command": command, "backend_info": info, "skipped_prompts": skipped,
                       "this_run": {"rows": len(todo), "new_tokens": tokens, "finish": finish,
                                    "elapsed_s": round(time.perf_counter() - start, 2)}})


def choose_fraction(selection: Any, fraction: float, seed: int) -> Any:
    """ceil(fraction x N) of the selected examples, chosen by `seed`, kept in their dataset order."""
    import dataclasses
    import math

    import numpy as np

    from kdpipe.data.sources import fingerprint

    if fraction >= 1:
        return selection
    n = len(selection.examples)
    keep = np.sort(np.random.default_rng(seed).choice(n, size=math.ceil(fraction * n), replace=False))
    examples = [selection.examples[i] for i in keep]
    return dataclasses.replace(selection, examples=examples, fingerprint=fingerprint(examples))


def _settings(cfg: GenerateConfig, selection: Any, template: Any, dtype: str, model: str) -> dict[str, Any]:
    """What decides the rows: a rerun with other settings is refused (batch size and device are not here)."""
    return {
        "model": model, "revision": cfg.revision, "backend": cfg.backend, "dtype": dtype,
        "dataset": {"source": selection.source, "split": cfg.split, "part": cfg.part,
                    "heldout_fraction": cfg.heldout_fraction, "limit": cfg.limit,
                    "columns": cfg.resolved_columns(),
                    "fingerprint": selection.fingerprint},
        "template": template.name, "label_names": list(cfg.label_names), "max_length": cfg.max_length,
        "truncation": cfg.truncation, "sampling": cfg.sampling(),
        # only when used, so that files written before --fraction existed keep their settings hash
        **({"fraction": cfg.fraction, "fraction_seed": cfg.selection_seed()} if cfg.fraction < 1 else {}),
    }


def _row(job: Any, columns: list[str], column: str, text: str, model: str, settings: str, why: str,
         new_tokens: int) -> dict[str, Any]:
    row = {c: job.fields[c] for c in columns if c in job.fields}
    row.update({"id": job.row_id, column: text})
    row["kdpipe_generate"] = {"source_id": job.example_id, "sample": job.sample, "model": model,
                              "settings_hash": settings[:16], "finish": why, "new_tokens": new_tokens}
    return row


def _load(cfg: GenerateConfig, tokenizer: Any, dtype: str) -> Any:
    sampling = {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens,
                "seed": cfg.seed}
    if cfg.backend == "vllm":
        from kdpipe.generation.vllm import VllmGenerator

        return VllmGenerator.load(cfg.model, tokenizer, dtype, cfg.device, cfg.revision,
                                  cfg.vllm_max_model_len, cfg.vllm_gpu_memory_utilization, **sampling)
    from kdpipe.generation.hf import HFGenerator

    return HFGenerator.load(cfg.model, tokenizer, dtype, cfg.device, cfg.revision, **sampling)


def summary(record: dict[str, Any], output: str | Path) -> str:
    if record.get("skipped"):
        return (f"{output} is already complete ({record.get('rows')} rows with the same settings): "
                "nothing to do")
    this = record.get("this_run") or {}
    finish = this.get("finish") or {}
    return (f"generated {this.get('rows', 0)} completions ({this.get('new_tokens', 0):,} tokens; "
            f"{finish.get('eos', 0)} ended, {finish.get('length', 0)} hit --max-new-tokens) in "
            f"{this.get('elapsed_s', 0):.1f} s; {record.get('rows')} rows -> {output}")
