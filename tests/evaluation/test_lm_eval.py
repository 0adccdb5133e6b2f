"""`kdpipe evaluate --lm-eval ifeval --lm-eval-data ifeval=FILE` for real: lm-evaluation-harness's own IFEval
(prompts, generation settings, checkers, metrics) on the local file tests/assets/ifeval_small.jsonl, for a
base model with a chat template, a LoRA adapter on it and the merged model; the figures must equal those of
lm-eval's own `simple_evaluate` loading the same model (the adapter through its `peft=` argument) with a
task YAML written here by hand."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import kdpipe

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[test]')")

DATA = Path(__file__).resolve().parents[1] / "assets" / "ifeval_small.jsonl"
METRICS = ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc")
MAX_GEN_TOKS = 12
# ChatML, as Qwen's and SmolLM2's tokenizers have it: lm-eval must render the prompts through it
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model_dir):
    """The tiny model with a chat template (base), a LoRA adapter on it (non-zero B, so it changes the
    outputs) and the adapter merged into the base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    from kdpipe.models import load_model

    root = tmp_path_factory.mktemp("lm-eval")
    base = root / "base"
    shutil.copytree(tiny_model_dir, base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(base)
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(load_model(str(base), "fp32", "cpu"), lora)
    peft_model.save_pretrained(root / "adapter")
    tokenizer.save_pretrained(root / "adapter")
    peft_model.merge_and_unload().save_pretrained(root / "merged")
    tokenizer.save_pretrained(root / "merged")
    return {"base": base, "adapter": root / "adapter", "merged": root / "merged"}


@pytest.fixture(scope="module")
def table(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("lm-eval-out")
    kdpipe("evaluate", "--model", models["base"], "--model", models["adapter"], "--model", models["merged"],
           "--lm-eval", "ifeval", "--lm-eval-data", f"ifeval={DATA}", "--max-new-tokens", MAX_GEN_TOKS,
           "--batch-size", 4, "--output", out, "--no-plot")
    results = json.loads((out / "results.json").read_text())
    responses: dict[str, dict[int, str]] = {}
    for row in map(json.loads, (out / "predictions.jsonl").read_text().splitlines()):
        assert row["task"] == "lm-eval/ifeval"
        assert row["prompt"].startswith("<|im_start|>user\n") and row["prompt"].endswith("<|im_start|>assistant\n")
        responses.setdefault(row["model"], {})[row["doc_id"]] = row["response"]
    return {m["name"]: m["metrics"] for m in results["models"]}, responses, results


def reference(tmp_path: Path, manager, pretrained: Path, peft: Path | None = None) -> tuple[dict, dict]:
    """lm-eval on its own: its HF model loader, IFEval's YAML included by a task file written here; one torch
    thread, as kdpipe evaluates a model this small on a CPU (greedy decoding of a random tiny model is
    sensitive to the last bit of a logit, and the sums' order depends on the thread count)."""
    import torch

    ifeval = Path(lm_eval.__file__).parent / "tasks" / "ifeval" / "ifeval.yaml"
    task = tmp_path / "ifeval_local.yaml"
    task.write_text(f"include: {ifeval}\ntask: ifeval\ndataset_path: json\ndataset_kwargs:\n"
                    f"  data_files:\n    train: {DATA}\n")
    args = {"pretrained": str(pretrained), "dtype": "float32", "device": "cpu"}
    if peft is not None:
        args["peft"] = str(peft)
    from langdetect import DetectorFactory

    DetectorFactory.seed = 0  # IFEval's language checks sample; kdpipe evaluate fixes this seed (--seed 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = lm_eval.simple_evaluate(model="hf", model_args=args, tasks=[str(task)], batch_size=4,
                                      apply_chat_template=True, gen_kwargs={"max_gen_toks": MAX_GEN_TOKS},
                                      task_manager=manager, log_samples=True)
    finally:
        torch.set_num_threads(threads)
    responses = {s["doc_id"]: s["filtered_resps"][0] for s in out["samples"]["ifeval"]}
    return {m: out["results"]["ifeval"][f"{m},none"] for m in METRICS}, responses


def test_ifeval_on_local_data_equals_lm_eval_itself(table, models, tmp_path):
    from lm_eval.tasks import TaskManager

    figures, responses, results = table
    assert list(figures) == ["base", "adapter", "merged"]
    manager = TaskManager()
    for name in ("base", "adapter"):
        ours = {m: figures[name][f"lm-eval/ifeval/{m}"] for m in METRICS}
        theirs, their_responses = reference(tmp_path, manager, models["base"],
                                            models["adapter"] if name == "adapter" else None)
        assert responses[name] == their_responses, name
        assert ours == theirs, name
    assert responses["adapter"] != responses["base"]  # the adapter is applied
    # the file's 12 prompts / 16 instructions: every accuracy is a multiple of 1/12 or 1/16
    for row in figures.values():
        assert round(row["lm-eval/ifeval/prompt_level_strict_acc"] * 12, 9).is_integer()
        assert round(row["lm-eval/ifeval/inst_level_strict_acc"] * 16, 9).is_integer()
    assert results["lm_eval_data"] == {"ifeval": str(DATA)}


def test_missing_local_file_and_missing_hub_data_name_the_option(models, tmp_path):
    result = kdpipe("evaluate", "--model", models["base"], "--lm-eval", "ifeval", "--lm-eval-data",
                    f"ifeval={tmp_path / 'nope.jsonl'}", "--output", tmp_path, ok=False)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"--lm-eval-data ifeval={tmp_path / 'nope.jsonl'}: {tmp_path / 'nope.jsonl'} does not exist" in result.output
    text = tmp_path / "rows.txt"
    text.write_text("not a table\n")
    result = kdpipe("evaluate", "--model", models["base"], "--lm-eval", "ifeval", "--lm-eval-data", f"ifeval={text}", ok=False)
    assert result.exit_code == 2 and f"--lm-eval-data ifeval={text}: use a .jsonl, .json, .csv or .parquet file" in result.output
    result = kdpipe("evaluate", "--model", models["base"], "--lm-eval", "ifeval", "--limit", 2,
                    "--output", tmp_path, ok=False)  # the hub's google/IFEval, offline
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "could not get the data of ifeval" in result.output and "--lm-eval-data TASK=FILE" in result.output
    result = kdpipe("evaluate", "--model", models["base"], "--lm-eval", "ifeval", "--lm-eval-data",
                    f"hellaswag={DATA}", ok=False)
    assert result.exit_code == 2 and "add --lm-eval hellaswag" in result.output


def test_rows_needing_nltk_punkt_are_refused_where_it_is_missing(tmp_path, monkeypatch):
    import nltk

    from kdpipe.errors import KdpipeError
    from kdpipe.evaluation import harness

    def missing(name, *args, **kwargs):
        raise LookupError(name)

    monkeypatch.setattr(nltk.data, "find", missing)  # as on a machine that never downloaded punkt_tab
    harness._check_punkt("ifeval", str(DATA))  # the shipped file needs none
    rows = [json.loads(line) for line in DATA.read_text().splitlines()[:2]]
    rows.append({"key": 9, "prompt": "Write 3 sentences.", "instruction_id_list": ["length_constraints:number_sentences"],
                 "kwargs": [{"relation": "at least", "num_sentences": 3}]})
    data = tmp_path / "sentences.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(KdpipeError, match=f"--lm-eval-data ifeval={data}: IFEval's checkers of "
                                          "length_constraints:number_sentences need nltk's punkt_tab data"):
        harness.check_lm_eval(["ifeval"], {"ifeval": str(data)})
