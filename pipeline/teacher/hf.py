"""Teacher scoring: token batches in, each distilled position's sparse distribution out.

The HF backend runs the decoder once per batch and applies the LM head only to the distilled
positions, a chunk at a time, so full-vocabulary fp32 log-probs never exist for a whole batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from kdpipe.batching import head_chunks, length_batches, pad
from kdpipe.cache.format import Targets
from kdpipe.data.tokenize import TokenizedExample
from kdpipe.models import head_is_linear, last_hidden_states, output_head


class TeacherBackend(Protocol):
    """What cache-teacher needs of a backend (HF transformers here, vLLM in teacher_vllm)."""

    def score(self, batch: Sequence[TokenizedExample]) -> list[Targets]: ...

    def info(self) -> dict[str, Any]: ...


def make_batches(examples: Sequence[TokenizedExample], max_tokens: int, max_rows: int) -> list[list[int]]:
    """Indices grouped longest first so that a batch's padding (rows × its longest row) stays within
    `max_tokens`."""
    return length_batches([len(e.input_ids) for e in examples], max_rows, max_tokens)


def sparse_targets(logits: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """Top-k ids and log-probs, the label's log-prob and the tail mass, from [C, V] logits.

    One pass over the vocabulary after the top-k: ``exp(logits - max)`` in place; the tail is the sum
    of those terms with the top-k's zeroed, so it keeps full relative precision however small it is
    (``1 - sum(top-k probs)`` would not).
    """
    logits = logits.float()
    top_values, top_ids = torch.topk(logits, k, dim=-1)
    label_logits = logits.gather(1, labels[:, None]).squeeze(1)
    peak = top_values[:, :1]
    scaled = logits.sub_(peak).exp_()  # in place: `logits` is this chunk's own scratch
    top = scaled.gather(1, top_ids).sum(-1)
    rest = scaled.scatter_(1, top_ids, 0.0).sum(-1)
    total = top + rest
    lse = peak.squeeze(1) + torch.log(total)
    tail = rest / total
    return top_ids, top_values - lse[:, None], label_logits - lse, tail


@dataclass(frozen=True)
class Sampling:
    """Sampled mode: N draws per position from the proposal q ∝ p^(1/temperature), seeded per example."""

    samples: int
    temperature: float = 1.0
    seed: int = 0

    def uniforms(self, example_id: str, positions: int) -> np.ndarray:
        """The example's [P, N] uniform numbers in [0, 1): a pure function of (seed, example id)."""
        key = int.from_bytes(hashlib.sha256(example_id.encode()).digest()[:8], "little")
        return np.random.default_rng([self.seed, key]).random((positions, self.samples))


def sampled_targets(logits: torch.Tensor, labels: torch.Tensor, uniforms: torch.Tensor,
                    temperature: float = 1.0) -> tuple[torch.Tensor, ...]:
    """N draws per row of [C, V] logits by inverse CDF of the proposal q ∝ softmax(logits / temperature).

    Returns the distinct ids [C, N] (most often drawn first, then by id; padded with 0), the log of
    the unbiased estimate p̂(v) = count(v)/N · p(v)/q(v) at them [C, N] (-inf at padding), the counts
    [C, N] (0 at padding) and the label's log-prob [C]. `uniforms` [C, N] in [0, 1) fix the draws.
    """
    logits = logits.float()
    n = uniforms.shape[1]
    lse = logits.logsumexp(-1)
    target = logits.gather(1, labels[:, None]).squeeze(1) - lse
    z = logits if temperature == 1.0 else logits / temperature  # at T != 1 `logits` stays intact for p(v)
    peak = z.amax(-1, keepdim=True)
    cdf = z.sub_(peak).exp_()  # in place: `z` is this chunk's own scratch
    cdf = cdf.cumsum_(-1)
    total = cdf[:, -1:]
    draws = torch.searchsorted(cdf, uniforms.to(cdf.dtype) * total, right=True).clamp_(max=cdf.shape[1] - 1)
    draws, _ = draws.sort(-1)
    first = torch.ones_like(draws, dtype=torch.bool)
    first[:, 1:] = draws[:, 1:] != draws[:, :-1]
    slot = first.long().cumsum(-1) - 1  # which distinct id each draw is
    counts = torch.zeros_like(draws).scatter_add_(1, slot, torch.ones_like(draws))
    ids = torch.zeros_like(draws).scatter_(1, slot, draws)  # later draws of a slot write the same id
    # count descending, then id ascending
    order = torch.argsort(counts * (cdf.shape[1] + 1) - ids, dim=-1, descending=True)
    counts, ids = counts.gather(1, order), ids.gather(1, order)
    est = torch.log(counts.double() / n)
    if temperature != 1.0:
        log_p = logits.gather(1, ids) - lse[:, None]
        log_q = logits.gather(1, ids) / temperature - (peak + torch.log(total))
        est = est + (log_p - log_q).double()
    return ids.masked_fill(counts == 0, 0), est.float(), counts, target


class HFTeacher:
    """A transformers causal LM as teacher, under `torch.inference_mode`."""

    def __init__(self, model: Any, k: int, chunk_size: int = 2048, sampling: Sampling | None = None):
        self.model, self.k, self.chunk_size, self.sampling = model, k, chunk_size, sampling
        self.device = next(model.parameters()).device
        # Heads that are not a plain linear map of the last hidden state need the model's own forward.
        self.head_only = head_is_linear(model)
        self.pad_id = getattr(model.config, "pad_token_id", None) or 0

    def info(self) -> dict[str, Any]:
        import transformers

        return {"backend": "hf", "backend_version": transformers.__version__}

    @torch.inference_mode()
    def score(self, batch: Sequence[TokenizedExample]) -> list[Targets]:
        input_ids, attention_mask = pad_batch(batch, self.pad_id, self.device)
        rows = torch.cat([torch.full((len(e.positions),), i) for i, e in enumerate(batch)]).to(self.device)
        cols = torch.from_numpy(np.concatenate([e.positions for e in batch]).astype(np.int64)).to(self.device)
        labels = input_ids[rows, cols + 1]
        if self.head_only:
            selected = last_hidden_states(self.model, input_ids, attention_mask)[rows, cols]
            project = output_head(self.model)
        else:
            selected = self.model(input_ids=input_ids, attention_mask=attention_mask,
                                  use_cache=False).logits[rows, cols]
            project = torch.clone  # the chunk's own scratch: the targets below work in place
        if self.sampling:
            draws = [self.sampling.uniforms(e.id, len(e.positions)) for e in batch]
            uniforms = torch.from_numpy(np.concatenate(draws))
        pieces = []
        for sl, logits in head_chunks(selected, project, self.chunk_size):
            if self.sampling:
                ids, est, counts, target = sampled_targets(logits, labels[sl], uniforms[sl].to(self.device),
                                                           self.sampling.temperature)
                pieces.append((ids, est, target, torch.zeros_like(target), counts.to(torch.uint8)))
            else:
                pieces.append(sparse_targets(logits, labels[sl], self.k))
        ids, logprobs, target, tail, *counts = (torch.cat(parts).cpu().numpy() for parts in zip(*pieces))
        return split_targets(batch, ids.astype(np.int32), logprobs, target, tail,
                             counts[0] if counts else None)


def pad_batch(batch: Sequence[TokenizedExample], pad_id: int,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask, as long as the batch's longest row."""
    ids, mask = pad([e.input_ids for e in batch], pad_id)
    return ids.to(device), mask.to(device)


def split_targets(batch: Sequence[TokenizedExample], ids: np.ndarray, logprobs: np.ndarray,
                  target: np.ndarray, tail: np.ndarray, counts: np.ndarray | None = None) -> list[Targets]:
    """Per-position arrays for the whole batch -> one `Targets` per example."""
    out, start = [], 0
    for e in batch:
        end = start + len(e.positions)
        rows = slice(start, end)
        out.append(Targets(ids[rows], logprobs[rows].astype(np.float32), target[rows].astype(np.float32),
                           tail[rows].astype(np.float32), None if counts is None else counts[rows]))
        start = end
    return out
