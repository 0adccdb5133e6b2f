"""`kdpipe generate`'s mechanics: the template's prompts, seeded sampling, the HF and vLLM backends.

Determinism: every (example, sample) draws its random numbers from its own generator, seeded by
(seed, example id, sample index), so the text generated for a row does not depend on which rows share
its batch, on the batch size, or on where a killed run restarted (up to floating-point ties: padding
changes a batch's arithmetic by an ulp or so). HF: `generate` runs greedy over scores from which
`SeededSampler` has already drawn one token per row (temperature, top-p, then inverse CDF with the
row's own uniform number), so HF keeps doing the caching, padding and stopping. vLLM: each request
carries its own `SamplingParams.seed`; vLLM's sampler differs from ours, so the backend is part of the
settings a resume checks.

torch and transformers are imported inside the functions: `kdpipe --help` imports this module's callers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kdpipe.data.tokenize import prompt_ids
from kdpipe.errors import KdpipeError

SENTINEL = "\x00kdpipe-output\x00"  # stands in for the output while a prompt is rendered


@dataclass(frozen=True)
class Slot:
    """Where generated text goes: `field`, and the literal text the template puts around it."""

    field: str
    prefix: str = ""
    suffix: str = ""

    def strip(self, text: str) -> str:
        """The generated text as the field's value: without the template's own text around it."""
        if self.prefix and text.startswith(self.prefix):
            text = text[len(self.prefix):]
        if self.suffix.strip() and text.endswith(self.suffix.strip()):
            text = text[: -len(self.suffix.strip())]
        return text


@dataclass
class Job:
    """One completion to generate: the example, which sample of it, the prompt's token ids."""

    example_id: str
    sample: int
    fields: dict[str, Any]
    prompt_ids: list[int]

    @property
    def row_id(self) -> str:
        return self.example_id if self.sample == 0 else f"{self.example_id}#{self.sample}"


def make_jobs(examples: Sequence[Any], template: Any, tokenizer: Any, field: str, samples: int,
              max_length: int, truncation: str) -> tuple[list[Job], Slot, dict[str, int]]:
    """Every (example, sample) with its prompt's ids, tokenized segment by segment as cache-teacher does."""
    jobs, slot, skipped = [], None, {"skipped (prompt too long)": 0}
    for e in examples:
        if template.name == "chat" and e.fields.get("messages"):
            raise KdpipeError(f"example '{e.id}': kdpipe generate fills the 'output' field of "
                              "instruction/output rows; conversations in 'messages' are not supported (use "
                              "instruction/output rows)")
        segments = template.render({**e.fields, field: SENTINEL}, e.id, tokenizer)
        trained = [i for i, s in enumerate(segments) if s.trained]
        if trained != [len(segments) - 1] or SENTINEL not in segments[-1].text:
            raise KdpipeError(f"template {template.name}: the output field '{field}' must be the completion, "
                              "the last and only trained part, for kdpipe generate to fill it")
        if any(SENTINEL in s.text for s in segments[:-1]):
            raise KdpipeError(f"template {template.name} uses the output field '{field}' in its prompt: "
                              "generation cannot fill it")
        before, _, after = segments[-1].text.partition(SENTINEL)
        slot = slot or Slot(field, before, after)
        ids = prompt_ids(tokenizer, [s.text for s in segments[:-1]], template)
        if len(ids) >= max_length:
            if truncation in ("error", "truncate"):
                raise KdpipeError(f"example '{e.id}': its prompt has {len(ids)} tokens, not fewer than "
                                  f"max_length={max_length}; raise --max-length or pass --truncation skip "
                                  "(or truncate-prompt: keep the prompt's end)")
            if truncation == "skip":
                skipped["skipped (prompt too long)"] += 1
                continue
            ids = ids[len(ids) - max_length + 1:]
        jobs += [Job(e.id, j, e.fields, ids) for j in range(samples)]
    if not jobs:
        raise KdpipeError("no prompt is left to complete (every prompt is longer than --max-length)")
    return jobs, slot, {k: v for k, v in skipped.items() if v}


def row_seed(seed: int, example_id: str, sample: int) -> int:
    """The row's own seed: a pure function of (seed, example id, sample), below 2**63."""
    digest = hashlib.sha256(f"{seed}\x00{example_id}\x00{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def check_can_generate(model: str, revision: str | None) -> None:
    """Refuse, before any weights load, a model that is not a causal LM (it has no LM head to generate
    with)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from kdpipe.models import load_model_config

    try:
        config = load_model_config(model, revision)
    except Exception:  # the model load reports it, with the offline hint
        return
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise KdpipeError(f"--model {model} (model type '{config.model_type}') is not a causal LM, so it "
                          "cannot generate: pass a decoder model that AutoModelForCausalLM loads (e.g. "
                          "Qwen3, Llama)")


class SeededSampler:
    """A logits processor: one token per row drawn from its own generator; scores keep only that token.

    temperature 0 keeps the scores (greedy). The rows' generators are advanced once per step.
    """

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float, vocab: int):
        import numpy as np

        self.rngs = [np.random.default_rng(s) for s in seeds]
        self.temperature, self.top_p, self.vocab = temperature, top_p, vocab

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        scores = scores.clone()
        scores[:, self.vocab:] = -torch.inf  # padded LM-head rows are no tokens of the tokenizer
        if self.temperature == 0:
            return scores
        uniforms = torch.tensor([rng.random() for rng in self.rngs], dtype=torch.float64,
                                device=scores.device)
        probs = torch.softmax(scores.double() / self.temperature, dim=-1)
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        cdf = torch.cumsum(sorted_probs, dim=-1)
        if self.top_p < 1:  # the smallest head whose mass reaches top_p (always at least one token)
            sorted_probs = torch.where(cdf - sorted_probs < self.top_p, sorted_probs, 0.0)
            cdf = torch.cumsum(sorted_probs, dim=-1)
        target = (uniforms * cdf[:, -1])[:, None]
        pick = torch.searchsorted(cdf, target).clamp_(max=scores.shape[-1] - 1)
        tokens = order.gather(1, pick)
        out = torch.full_like(scores, -torch.inf)
        return out.scatter_(1, tokens, 0.0)


class HFGenerator:
    """transformers' `generate` with `SeededSampler`; a batch is left-padded."""

    backend = "hf"

    def __init__(self, model: Any, tokenizer: Any, temperature: float, top_p: float, max_new_tokens: int,
                 seed: int):
        self.model, self.tokenizer = model, tokenizer
        self.temperature, self.top_p = temperature, top_p
        self.max_new_tokens, self.seed = max_new_tokens, seed
        self.eos = eos_ids(model, tokenizer)

    @classmethod
    def load(cls, name: str, tokenizer: Any, dtype: str, device: str, revision: str | None,
             **sampling: Any) -> HFGenerator:
        from kdpipe.models import load_model

        return cls(load_model(name, dtype, device, revision), tokenizer, **sampling)

    def info(self) -> dict[str, Any]:
        return {"backend": "hf", "dtype": str(self.model.dtype).removeprefix("torch.")}

    def generate(self, jobs: Sequence[Job]) -> list[tuple[list[int], str]]:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList

        from kdpipe.models import parameter_count, threads_for

        longest = max(len(j.prompt_ids) for j in jobs)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos[0]
        ids = torch.full((len(jobs), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(jobs), longest), dtype=torch.long)
        for i, j in enumerate(jobs):
            ids[i, longest - len(j.prompt_ids):] = torch.tensor(j.prompt_ids)
            mask[i, longest - len(j.prompt_ids):] = 1
        device = next(self.model.parameters()).device
        sampler = SeededSampler([row_seed(self.seed, j.example_id, j.sample) for j in jobs], self.temperature,
                                self.top_p, len(self.tokenizer))
        config = GenerationConfig(do_sample=False, max_new_tokens=self.max_new_tokens, eos_token_id=self.eos,
                                  pad_token_id=pad, num_beams=1)
        with threads_for(parameter_count(self.model), device), torch.no_grad():
            out = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                      generation_config=config,
                                      logits_processor=LogitsProcessorList([sampler]))
        results = []
        for row in out[:, longest:].tolist():
            cut = next((t for t, token in enumerate(row) if token in self.eos), None)
            results.append((row, "length") if cut is None else (row[:cut], "eos"))
        return results

    def close(self) -> None:
        self.model = None


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """The ids that end a completion: the tokenizer's EOS and the model's generation config's."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for token in extra if isinstance(extra, list) else [extra]:
        if token is not None and token not in ids:
            ids.append(int(token))
    return ids

