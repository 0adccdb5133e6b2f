"""lm-evaluation-harness tasks (IFEval, HellaSwag ...) through its own API, on the loaded model."""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path
from typing import Any

from kdpipe.errors import KdpipeError, first_line

NETWORK_ERRORS = ("ConnectionError", "OfflineModeIsEnabled", "LocalEntryNotFoundError",
                  "DatasetNotFoundError", "HfHubHTTPError", "ConnectTimeout", "ReadTimeout", "MaxRetryError")


# IFEval's checkers of these instructions split sentences / words with nltk's punkt_tab data, which nltk
# downloads on first use; offline (or on a machine without it) they raise LookupError mid-run.
PUNKT_INSTRUCTIONS = ("length_constraints:number_sentences", "change_case:capital_word_frequency")


def check_lm_eval(tasks: list[str] | None = None, data: dict[str, str] | None = None) -> Any:
    """lm-eval's TaskManager, after checking that lm-eval is installed, knows every task in `tasks`, and
    that every local data file of `data` ({task: file}, from --lm-eval-data) exists and can be scored."""
    if importlib.util.find_spec("lm_eval") is None:
        raise KdpipeError("--lm-eval needs lm-evaluation-harness, which is not installed: "
                          "pip install 'kdpipe[lm-eval]' (or pip install lm-eval)")
    if tasks is None:
        return None
    import difflib

    from lm_eval.tasks import TaskManager

    for task, file in (data or {}).items():
        if not Path(file).is_file():
            raise KdpipeError(f"--lm-eval-data {task}={file}: {file} does not exist")
        _data_kind(task, file)
        if task.startswith("ifeval"):
            _check_punkt(task, file)
    manager = TaskManager()
    known = set(manager.all_tasks)
    for task in tasks:
        if task not in known:
            close = difflib.get_close_matches(task, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else " (`lm-eval ls tasks` lists them)"
            raise KdpipeError(f"lm-eval has no task '{task}'{hint}")
    return manager


def local_task(manager: Any, task: str, file: str, folder: Path) -> Path:
    """A task YAML in `folder` that includes lm-eval's own `task` (its prompts, generation settings,
    checkers and metrics) and reads its evaluation split from the local `file` instead of the hub; lm-eval
    loads it by path, under the task's own name."""
    import yaml

    entry = manager.task_index[task]
    if entry.yaml_path is None:
        raise KdpipeError(f"--lm-eval-data {task}=...: lm-eval's {task} is not a YAML task (a group or a "
                          "Python task), so its data cannot be replaced; name one of its YAML tasks")
    split = entry.cfg.get("test_split") or entry.cfg.get("validation_split") or "train"
    config = {"include": str(entry.yaml_path), "task": task, "dataset_path": _data_kind(task, file),
              "dataset_name": None,
              "dataset_kwargs": {"data_files": {split: str(Path(file).resolve())}}}
    path = folder / f"{task}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_lm_eval(model: Any, tokenizer: Any, cfg: Any,
                manager: Any = None) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """lm-eval's own `simple_evaluate` on an `HFLM` wrapping the loaded model (a peft adapter as peft loaded
    it), through the tokenizer's chat template where it has one: every numeric metric (no stderr), and
    one prediction per document (lm-eval's sample: the model's response and its per-document scores)."""
    check_lm_eval()
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size)
    _seed_langdetect(cfg.seed)
    files = cfg.lm_eval_files
    gen_kwargs = {"max_gen_toks": cfg.max_new_tokens} if cfg.max_new_tokens else None
    with tempfile.TemporaryDirectory(prefix="kdpipe-lm-eval-") as folder:
        tasks = [str(local_task(manager, t, files[t], Path(folder))) if t in files else t
                 for t in cfg.lm_eval]
        chat = getattr(tokenizer, "chat_template", None) is not None
        try:
            out = lm_eval.simple_evaluate(
                model=lm, tasks=tasks, limit=cfg.limit, log_samples=True, task_manager=manager,
                apply_chat_template=chat, gen_kwargs=gen_kwargs,
                random_seed=cfg.seed, numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed,
                fewshot_random_seed=cfg.seed)
        except KdpipeError:
            raise
        except Exception as e:
            raise KdpipeError(lm_eval_error(e, cfg.lm_eval, files)) from None
    if not out or "results" not in out:
        raise KdpipeError(f"lm-eval returned no results for {', '.join(cfg.lm_eval)}")
    values: dict[str, float] = {}
    for task, result in out["results"].items():
        for key, value in result.items():
            metric, _, filt = key.partition(",")
            if "stderr" in metric or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            name = metric if filt in ("", "none") else f"{metric}[{filt}]"
            values[f"lm-eval/{task}/{name}"] = float(value)
    return values, [_prediction(task, sample) for task, samples in out.get("samples", {}).items()
                    for sample in samples]


def _data_kind(task: str, file: str) -> str:
    """The `datasets` builder of a --lm-eval-data file, by its suffix."""
    kind = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(Path(file).suffix)
    if kind is None:
        raise KdpipeError(f"--lm-eval-data {task}={file}: use a .jsonl, .json, .csv or .parquet file")
    return kind


def _seed_langdetect(seed: int) -> None:
    """IFEval's language checkers call langdetect, which samples: on short or mixed text its verdict on the
    same response changes from run to run (and with it inst_level_strict_acc). Its documented fix is a
    fixed `DetectorFactory.seed`; --seed sets it, so the figures repeat."""
    try:
        from langdetect import DetectorFactory
    except ImportError:  # a task without language checks
        return
    DetectorFactory.seed = seed


def _prediction(task: str, sample: dict[str, Any]) -> dict[str, Any]:
    """A predictions.jsonl row from an lm-eval sample: the prompt as rendered, the response, the scores."""
    scores = {k: v for k, v in sample.items() if k in sample.get("metrics", ())}
    response = sample["filtered_resps"][0] if sample.get("filtered_resps") else None
    prompt = sample["arguments"][0][0] if sample.get("arguments") else None
    return {"task": f"lm-eval/{task}", "doc_id": sample.get("doc_id"), "prompt": prompt,
            "response": response, **scores}


def _check_punkt(task: str, file: str) -> None:
    """Rows of `file` whose IFEval instructions need nltk's punkt_tab data, where it is not installed: a
    clear error before any model loads, instead of nltk's LookupError after the generation."""
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab")
        return
    except LookupError:
        pass
    from datasets import load_dataset

    rows = load_dataset(_data_kind(task, file), data_files=file, split="train")
    if "instruction_id_list" not in rows.column_names:
        raise KdpipeError(f"--lm-eval-data {task}={file}: the rows have no instruction_id_list (IFEval's "
                          "format: key, prompt, instruction_id_list, kwargs)")
    needing = sorted({i for ids in rows["instruction_id_list"] for i in ids if i in PUNKT_INSTRUCTIONS})
    if needing:
        raise KdpipeError(
            f"--lm-eval-data {task}={file}: IFEval's checkers of {', '.join(needing)} need nltk's punkt_tab "
            "data, which is not installed (nltk downloads it on first use, which fails offline): run "
            "`python -m nltk.downloader punkt_tab` once with network access, or set NLTK_DATA to a folder "
            "that has tokenizers/punkt_tab, or leave the rows with those instructions out")


def lm_eval_error(e: BaseException, tasks: list[str], files: dict[str, str] | None = None) -> str:
    """A one-paragraph message for an exception out of lm-eval: data unreachable, a missing package, or
    other (naming the local data files of --lm-eval-data, if any)."""
    text, kind = first_line(e), type(e).__name__
    names = ", ".join(tasks)
    if isinstance(e, ModuleNotFoundError):
        return (f"lm-eval task(s) {names} need the Python package '{e.name}', which is not installed "
                f"(pip install {e.name}, or lm-eval's extra for the task, e.g. "
                "pip install 'lm-eval[ifeval]')")
    chain = {type(x).__name__ for x in (e, e.__cause__, e.__context__) if x is not None}
    lowered = text.lower()
    words = ("couldn't reach", "offline", "connection", "internet")
    if chain & set(NETWORK_ERRORS) or any(w in lowered for w in words):
        offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (offline mode is on: HF_DATASETS_OFFLINE/HF_HUB_OFFLINE)" if offline else ""
        return (f"lm-eval could not get the data of {names}{hint}: {kind}: {text}. lm-eval downloads its "
                "datasets from the Hugging Face hub: run once with network access (they are cached), point "
                "HF_HOME at a cache that holds them, or give the task a local file in its own format with "
                "--lm-eval-data TASK=FILE (e.g. ifeval=ifeval.jsonl)")
    local = f" (data: {', '.join(f'{t}={f}' for t, f in files.items())})" if files else ""
    return f"lm-eval failed on {names}{local}: {kind}: {text}"
