"""`kdpipe generate`: a model's completions of the template's prompts, written as a dataset.

With the teacher it makes sequence-level KD data (Kim & Rush 2016); with the student, on-policy data
for the teacher to score (cache-teacher on the output file). Recipe: load the tokenizer and data,
render each prompt, load the model alone, then batch by batch: generate (seeded per row), decode,
append to the JSONL file. A rerun continues after the last complete row (see kdpipe.data.generated).

Each row is the example's own columns with the completion in the template's output field, an ``id``
(the example's, ``ID#j`` for its sample j > 0) and ``kdpipe_generate`` (source example, sample, model,
settings hash, why it stopped, new tokens).

Its config, recipe and registration (`STAGE`) are all here; torch loads inside `run` only.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kdpipe.config import option, progress_disabled
from kdpipe.data.generated import check_not_an_input, sidecar_path
from kdpipe.data.sources import DataConfig, load_examples
from kdpipe.errors import KdpipeError
from kdpipe.run_folder import read_json
from kdpipe.stages.base import Stage


@dataclass
class GenerateConfig(DataConfig):
    """Options of `kdpipe generate` (YAML keys; CLI options with dashes)."""

    model: str | None = option(None, "Model that writes the completions: hub id, local path or short name.")
    revision: str | None = option(None, "Hub revision (branch, tag or commit) of the model.")
    output: str | None = option(None, "The JSONL file to write (e.g. data/NAME.jsonl); a rerun continues it.")
    backend: Literal["hf", "vllm"] = option("hf", "Runtime: hf (transformers, anywhere) or vllm (fast on "
                                                  "GPU).")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = option(
        "auto", "Model dtype: auto = fp16 on GPUs before compute capability 8, bf16 from 8, fp32 on CPU.")
    device: str = option("auto", "Device: auto (CUDA if present), cpu, cuda, cuda:1 ...")
    samples: int = option(1, "Completions per prompt (sample j of example ID gets the id ID#j).")
    temperature: float = option(1.0, "Sampling temperature (0: greedy).")
    top_p: float = option(1.0, "Nucleus sampling: keep the smallest set of tokens whose probability reaches "
                               "top_p.")
    max_new_tokens: int = option(256, "Most tokens generated per completion.")
    batch_size: int = option(16, "Completions per batch (the unit of resume).")
    fraction: float = option(1.0, "Generate for a seeded random share of the selected prompts: "
                                  "ceil(fraction x N) of them, in their dataset order (on-policy rounds).")
    fraction_seed: int | None = option(None, "Seed of the --fraction choice (default --seed; another value "
                                             "picks other prompts without moving the held-out split).")
    overwrite: bool = option(False, "Start the output file again (otherwise a rerun continues it).")
    vllm_max_model_len: int | None = option(None, "vLLM backend: context length (default: the model's).")
    vllm_gpu_memory_utilization: float = option(0.9, "vLLM backend: fraction of GPU memory for weights and "
                                                      "KV cache.")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("samples", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"--temperature must be a finite number >= 0 (0: greedy), "
                             f"not {self.temperature}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"--top-p must be in (0, 1], not {self.top_p}")
        if not (math.isfinite(self.fraction) and 0 < self.fraction <= 1):
            raise ValueError(f"--fraction must be in (0, 1] (a share of the prompts), not {self.fraction}")
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ValueError(f"--vllm-gpu-memory-utilization must be in (0, 1], not "
                             f"{self.vllm_gpu_memory_utilization}")

    def selection_seed(self) -> int:
        return self.seed if self.fraction_seed is None else self.fraction_seed

    def sampling(self) -> dict[str, Any]:
        return {"samples": self.samples, "temperature": self.temperature, "top_p": self.top_p,
                "max_new_tokens": self.max_new_tokens, "seed": self.seed}


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
    check_not_an_input(cfg.output, {"--dataset": cfg.dataset, "--template": cfg.template})
    check_output_file(cfg.output)
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
    start, tokens, cuts, finish = time.perf_counter(), 0, 0, {"eos": 0, "length": 0}
    generator = _load(cfg, tokenizer, dtype)
    try:
        bar = tqdm(total=len(jobs), initial=len(out.done), unit="row", desc=f"generating with {cfg.model}",
                   dynamic_ncols=True, mininterval=1.0, disable=progress_disabled())
        for i in range(0, len(todo), cfg.batch_size):
            batch = todo[i : i + cfg.batch_size]
            rows = []
            for job, (ids, why) in zip(batch, generator.generate(batch)):
                text, cut = decode_whole(tokenizer, ids)
                rows.append(_row(job, selection.columns, column, slot.strip(text), settings["model"],
                                 out.hash, why, len(ids), cut))
                tokens, finish[why], cuts = tokens + len(ids), finish[why] + 1, cuts + bool(cut)
            out.append(rows)
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - start, 1e-9):,.0f}")
        bar.close()
        info = generator.info()
    finally:
        generator.close()
    return out.finish({"command": command, "backend_info": info, "skipped_prompts": skipped,
                       "this_run": {"rows": len(todo), "new_tokens": tokens, "finish": finish,
                                    "cut_mid_character": cuts,
                                    "elapsed_s": round(time.perf_counter() - start, 2)}})


def check_output_file(output: str) -> None:
    """The output file can be written, said before the model loads: not a folder, its folder writable."""
    from kdpipe.cache.storage import Store

    if Path(output).is_dir():
        raise KdpipeError(f"--output {output} is a folder; give a file path (data/NAME.jsonl)")
    Store.open(str(Path(output).parent)).check_writable("--output's folder")


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


def decode_whole(tokenizer: Any, ids: list[int]) -> tuple[str, int]:
    """(the completion's text, tokens dropped): a completion stopped inside a multi-byte character (by
    --max-new-tokens, or an EOS right after a character's first bytes) decodes to a trailing U+FFFD; it ends
    instead at the last whole character (at most 3 tokens of that character's bytes dropped, the row says
    how many)."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if not text.endswith("\ufffd"):
        return text, 0
    for cut in range(1, min(3, len(ids)) + 1):
        shorter = tokenizer.decode(ids[: len(ids) - cut], skip_special_tokens=True)
        if not shorter.endswith("\ufffd"):
            return shorter, cut
    return text, 0  # a U+FFFD the model wrote as a whole character


def _row(job: Any, columns: list[str], column: str, text: str, model: str, settings: str, why: str,
         new_tokens: int, cut: int = 0) -> dict[str, Any]:
    row = {c: job.fields[c] for c in columns if c in job.fields}
    row.update({"id": job.row_id, column: text})
    row["kdpipe_generate"] = {"source_id": job.example_id, "sample": job.sample, "model": model,
                              "settings_hash": settings[:16], "finish": why, "new_tokens": new_tokens,
                              # the last tokens began a character the length limit cut: not in the text
                              **({"cut_mid_character": cut} if cut else {})}
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
    cut = this.get("cut_mid_character")
    cut_note = f"; {cut} stopped inside a character: cut before it" if cut else ""
    return (f"generated {this.get('rows', 0)} completions ({this.get('new_tokens', 0):,} tokens; "
            f"{finish.get('eos', 0)} ended, {finish.get('length', 0)} hit --max-new-tokens{cut_note}) in "
            f"{this.get('elapsed_s', 0):.1f} s; {record.get('rows')} rows -> {output}")


# ---------------------------------------------------------------- the stage: a command, a `kdpipe run` step


def state(cfg: GenerateConfig, command: str, anything_ran: bool) -> tuple[str, str]:
    """From the output's sidecar: complete with the same command: skip; partly written: resume."""
    record = read_json(sidecar_path(cfg.output)) if cfg.output else None
    if record is None:
        return "run", ""
    if record.get("complete") and record.get("command") == command:
        return "skip", f"{cfg.output} is complete with the same settings"
    if not record.get("complete"):
        return "resume", f"{cfg.output} is partly written; generate continues after its last complete row"
    return "run", (f"{cfg.output} was written by another command; generate decides (same settings: nothing "
                   "to do)")


STAGE = Stage(
    name="generate", config=GenerateConfig, runner=lambda cfg, command, echo, state: run(cfg, command),
    summary=lambda record, cfg: summary(record, cfg.output), state=state, required=("model", "dataset"),
    help="""Write a model's completions of the template's prompts as a dataset (sequence-level or on-policy
    KD data).

    \b
    Example:
      kdpipe generate --model runs/demo/teacher --dataset kdpipe:arithmetic --output data/teacher-gen.jsonl
    Rerunning the same command continues after the last complete row.
    """)
