"""`rounds:` of `kdpipe run`: on-policy distillation rounds after the `train` step (issue 17).

Round r = 1 .. count repeats three steps, each with one model in memory:

- `round{r}_generate` (`kdpipe generate`): the previous student (round 1: the `train` step's output)
  completes a seeded ceil(fraction x N) of the `cache` step's prompts, other ones each round;
- `round{r}_cache` (`kdpipe cache-teacher`): the `cache` step's teacher scores those completions;
- `round{r}_train` (`kdpipe train-student`): starts from the previous student and trains on the
  original cache(s) pooled with the round's cache.

Everything a round writes stays in runs/NAME/round-R/ (generated.jsonl, cache/, train/), and each step is
skipped, resumed or restarted like any other step. "Continue training" is an init, not a resume: each
round is its own train-student run whose model is the previous student (with LoRA the `train` step and
the rounds merge, `--merge`, so that the student is a plain model; the round trains a fresh adapter on
it, zero at the start, so it starts exactly where the previous student ended), with its own optimizer
and LR schedule. The student's total optimizer steps are the `train` step's plus each round's
(`rounds.train.max_steps`, default the `train` step's); `kdpipe run --dry-run` prints the sum.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from kdpipe.config import build_config, to_dict
from kdpipe.errors import KdpipeError
from kdpipe.stages import cache_teacher, generate, train_student
from kdpipe.stages.cache_teacher import CacheTeacherConfig
from kdpipe.stages.generate import GenerateConfig
from kdpipe.stages.train_student import TrainStudentConfig

KEYS = {
    "count": "number of rounds (at least 1)",
    "fraction": "share λ of the training prompts the student completes each round, in [0, 1] (0: no "
                "generation, the rounds only continue training on the original cache)",
    "seed": "seed of each round's prompt choice (round r uses seed + r; default: the experiment's seed)",
    "generate": "kdpipe generate options of the rounds (temperature, top_p, max_new_tokens, samples, ...)",
    "cache": "cache-teacher options of the rounds' caches (default: the cache step's)",
    "train": "train-student options of the rounds (default: the train step's), e.g. max_steps",
}
# set by the rounds themselves: the data is the cache step's, the model the previous student
FIXED = {
    # seed: the cache step's, which decides the held-out split (rounds.seed picks other prompts)
    "generate": {"model", "output", "dataset", "split", "part", "heldout_fraction", "limit", "columns",
                 "id_column", "fraction", "fraction_seed", "seed"},
    "cache": {"model", "cache", "dataset", "split", "part", "heldout_fraction", "limit", "id_column",
              "num_shards", "shard_index"},
    "train": {"model", "cache", "output", "resume"},
}
# what the prompts are: the cache step's data options, given to generate as they are
DATA_KEYS = ("dataset", "split", "part", "heldout_fraction", "limit", "columns", "id_column", "template",
             "label_names", "max_length", "truncation", "seed")


@dataclasses.dataclass
class Spec:
    count: int
    fraction: float
    seed: int
    generate: dict[str, Any]
    cache: dict[str, Any]
    train: dict[str, Any]


def read_spec(values: Any, seed: int | None, where: str) -> Spec:
    """The `rounds:` mapping, checked: unknown keys, count >= 1, fraction in [0, 1], sub-mappings."""
    if not isinstance(values, dict):
        raise KdpipeError(f"{where} must be a mapping, e.g. rounds: {{count: 2, fraction: 0.5, generate: "
                          "{temperature: 1.0}, train: {max_steps: 100}}")
    unknown = [k for k in values if k not in KEYS]
    if unknown:
        raise KdpipeError(f"{where}: unknown key '{unknown[0]}'; keys: "
                          + "; ".join(f"{k} ({why})" for k, why in KEYS.items()))
    count, fraction = values.get("count", 1), values.get("fraction", 0.5)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise KdpipeError(f"{where}, key 'count': the number of rounds must be an integer >= 1, "
                          f"not {count!r}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1 \
            or not math.isfinite(fraction):
        raise KdpipeError(f"{where}, key 'fraction': the share λ of the prompts the student completes "
                          f"must be in [0, 1], not {fraction!r}")
    subs = {}
    for key in ("generate", "cache", "train"):
        sub = values.get(key) or {}
        if not isinstance(sub, dict):
            raise KdpipeError(f"{where}, key '{key}' must be a mapping of {key} options")
        fixed = sorted(set(k.replace("-", "_") for k in sub) & FIXED[key])
        if fixed:
            raise KdpipeError(f"{where}, key '{key}': '{fixed[0]}' is set by the rounds (the model is "
                              "the previous student, the data the cache step's, outputs under "
                              f"runs/NAME/round-R); remove it (fixed: {', '.join(sorted(FIXED[key]))})")
        subs[key] = dict(sub)
    base_seed = values.get("seed", seed if seed is not None else 0)
    if isinstance(base_seed, bool) or not isinstance(base_seed, int):
        raise KdpipeError(f"{where}, key 'seed' must be an integer, not {base_seed!r}")
    return Spec(count, float(fraction), base_seed, **subs)


def expand(spec: Spec, steps: list[tuple[Any, Any]], step_cls: type, name: str, where: str
           ) -> list[tuple[Any, Any]]:
    """The rounds' (Step, config) pairs, after the `cache` and `train` steps found in `steps`."""
    by_name = {s.name: c for s, c in steps}
    if "train" not in by_name or "cache" not in by_name:
        raise KdpipeError(f"{where}: on-policy rounds need a 'cache' section (the teacher and the prompts) "
                          "and a 'train' section (the student they continue)")
    cache_cfg, train_cfg = by_name["cache"], by_name["train"]
    if train_cfg.cross_tokenizer:
        raise KdpipeError(f"{where}: the student has another tokenizer than the teacher (train: "
                          "cross_tokenizer): on-policy rounds need the teacher to score the student's own "
                          "tokens; use a student with the teacher's tokenizer (or the same tokens at other "
                          "ids, which train-student maps), or drop 'rounds'")
    if train_cfg.lora and not train_cfg.merge:
        train_cfg.merge = True  # the next round starts from the student as a plain model
    originals = train_cfg.caches()
    previous, out = train_cfg.output, []
    for r in range(1, spec.count + 1):
        folder = f"runs/{name}/round-{r}"
        caches = list(originals)
        if spec.fraction > 0:
            gen = _generate_config(spec, r, cache_cfg, previous, f"{folder}/generated.jsonl", where)
            teacher = _cache_config(spec, r, cache_cfg, gen.output, f"{folder}/cache", where)
            out.append((step_cls(f"round{r}_generate", _checked_generate(cache_cfg.model, train_cfg)), gen))
            out.append((step_cls(f"round{r}_cache", cache_teacher.STAGE), teacher))
            caches.append(teacher.cache)
        values = {k: v for k, v in to_dict(train_cfg).items() if k not in FIXED["train"]}
        values.update(spec.train, model=previous, cache=caches, output=f"{folder}/train")
        train = build_config(TrainStudentConfig, values, source=f"{where}, key 'train' (round {r})")
        if train.lora and not train.merge:
            train.merge = True
        out.append((step_cls(f"round{r}_train", train_student.STAGE), train))
        previous = train.output
    return out


def _generate_config(spec: Spec, r: int, cache_cfg: CacheTeacherConfig, model: str, output: str,
                     where: str) -> GenerateConfig:
    values = {k: getattr(cache_cfg, k) for k in DATA_KEYS}
    values.update(spec.generate, model=model, output=output, fraction=spec.fraction,
                  fraction_seed=spec.seed + r)
    if spec.fraction == 1:
        values.pop("fraction_seed")  # every prompt: nothing to choose
    return build_config(GenerateConfig, values, source=f"{where}, key 'generate' (round {r})")


def _cache_config(spec: Spec, r: int, cache_cfg: CacheTeacherConfig, dataset: str, folder: str,
                  where: str) -> CacheTeacherConfig:
    values = {k: v for k, v in to_dict(cache_cfg).items() if k not in FIXED["cache"]}
    values.update(spec.cache, model=cache_cfg.model, dataset=dataset, cache=folder, heldout=False)
    return build_config(CacheTeacherConfig, values, source=f"{where}, key 'cache' (round {r})")


def _checked_generate(teacher: str, train_cfg: TrainStudentConfig) -> Any:
    """generate, refusing first a student whose tokens are not the teacher's (before its weights load)."""

    def runner(cfg: GenerateConfig, command: str, echo: Any, state: Any) -> Any:
        check_tokenizers(teacher, cfg.model)
        return generate.STAGE.runner(cfg, command, echo, state)

    return dataclasses.replace(generate.STAGE, runner=runner)


def check_tokenizers(teacher: str, student: str) -> None:
    """The teacher must score the student's own tokens: the same tokenizer, or the same tokens at other ids
    (train-student's vocabulary map); anything else is refused, naming tokens that differ."""
    from kdpipe.models import load_tokenizer, vocab_hash
    from kdpipe.vocab.map import token_keys

    t, s = load_tokenizer(teacher), load_tokenizer(student)
    if vocab_hash(t) == vocab_hash(s):
        return
    ordinary = lambda tok: {k for k in token_keys(tok).values() if k[0] != "added"}  # noqa: E731
    only_t, only_s = ordinary(t) - ordinary(s), ordinary(s) - ordinary(t)
    if not only_t and not only_s:
        return  # the same tokens at other ids: train-student maps the cached ids by token string
    examples = ", ".join(repr(k[1])[:20] for k in sorted(only_s or only_t, key=str)[:4])
    raise KdpipeError(
        f"rounds: the student {student} and the teacher {teacher} have different tokenizers "
        f"({len(only_s)} student tokens are not the teacher's, {len(only_t)} teacher tokens not the "
        f"student's, e.g. {examples}): on-policy rounds need the teacher to score the student's own tokens. "
        "Use a student with the teacher's tokenizer (or the same tokens at other ids), or drop 'rounds'")


def add_to_evaluate(steps: list[tuple[Any, Any]], rounds: list[tuple[Any, Any]], labels: dict[str, str]
                    ) -> None:
    """Each round's student joins the evaluation (after the `train` step's student), labelled by round."""
    trained = [cfg.output for step, cfg in rounds if step.name.endswith("_train")]
    for r, output in enumerate(trained, 1):
        labels.setdefault(output, f"round {r} student")
    train = next((cfg.output for step, cfg in steps if step.name == "train"), None)
    for step, cfg in steps:
        if step.name != "evaluate" or not cfg.model:
            continue  # no evaluate step, or one that evaluates the latest run's models by default
        models = [m for m in cfg.model if m not in trained]
        at = models.index(train) + 1 if train in models else len(models)
        cfg.model = models[:at] + trained + models[at:]


def steps_line(steps: list[tuple[Any, Any]]) -> str | None:
    """The student's optimizer steps: the `train` step's and each round's (compare at equal steps)."""
    runs = [(s.name, c) for s, c in steps if s.name == "train" or (s.name.startswith("round")
                                                                  and s.name.endswith("_train"))]
    if len(runs) < 2:
        return None
    if any(c.max_steps < 0 for _, c in runs):
        return ("student steps: set by epochs in " + ", ".join(n for n, c in runs if c.max_steps < 0)
                + " (give max_steps to compare runs at equal steps)")
    total = sum(c.max_steps for _, c in runs)
    parts = " + ".join(f"{n} {c.max_steps}" for n, c in runs)
    return f"student steps: {parts} = {total} optimizer steps in all (compare baselines at {total})"
