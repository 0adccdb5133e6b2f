"""lm-evaluation-harness tasks (IFEval, HellaSwag ...) through its own API, on the loaded model."""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from kdpipe.errors import KdpipeError, first_line

NETWORK_ERRORS = ("ConnectionError", "OfflineModeIsEnabled", "LocalEntryNotFoundError",
                  "DatasetNotFoundError", "HfHubHTTPError", "ConnectTimeout", "ReadTimeout", "MaxRetryError")


def check_lm_eval(tasks: list[str] | None = None) -> Any:
    """lm-eval's TaskManager, after checking that lm-eval is installed and knows every task in `tasks`."""
    if importlib.util.find_spec("lm_eval") is None:
        raise KdpipeError("--lm-eval needs lm-evaluation-harness, which is not installed: "
                          "pip install 'kdpipe[lm-eval]' (or pip install lm-eval)")
    if tasks is None:
        return None
    import difflib

    from lm_eval.tasks import TaskManager

    manager = TaskManager()
    known = set(manager.all_tasks)
    for task in tasks:
        if task not in known:
            close = difflib.get_close_matches(task, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else " (`lm-eval ls tasks` lists them)"
            raise KdpipeError(f"lm-eval has no task '{task}'{hint}")
    return manager


def run_lm_eval(model: Any, tokenizer: Any, cfg: Any, manager: Any = None) -> dict[str, float]:
    """lm-eval's own `simple_evaluate` on an `HFLM` wrapping the loaded model; every numeric metric, no
    stderr."""
    check_lm_eval()
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size)
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=list(cfg.lm_eval), limit=cfg.limit, log_samples=False,
                                      task_manager=manager, random_seed=cfg.seed, numpy_random_seed=cfg.seed,
                                      torch_random_seed=cfg.seed, fewshot_random_seed=cfg.seed)
    except KdpipeError:
        raise
    except Exception as e:
        raise KdpipeError(lm_eval_error(e, cfg.lm_eval)) from None
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
    return values


def lm_eval_error(e: BaseException, tasks: list[str]) -> str:
    """A one-paragraph message for an exception out of lm-eval: data unreachable, a missing package, or
    other."""
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
                "datasets from the Hugging Face hub: run once with network access (they are cached), or "
                "point HF_HOME at a cache that holds them")
    return f"lm-eval failed on {names}: {kind}: {text}"
