"""Teacher scoring: token batches in, each distilled position's sparse distribution out.

The HF backend runs the decoder once per batch and applies the LM head only to the distilled
positions, a chunk at a time, so full-vocabulary fp32 log-probs never exist for a whole batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch

from kdpipe.cache.format import Targets
from kdpipe.tokenize import TokenizedExample


class TeacherBackend(Protocol):
    """What cache-teacher needs of a backend (HF transformers here, vLLM in teacher_vllm)."""

    def score(self, batch: Sequence[TokenizedExample]) -> list[Targets]: ...

    def info(self) -> dict[str, Any]: ...


def make_batches(examples: Sequence[TokenizedExample], max_tokens: int, max_rows: int) -> list[list[int]]:
    """Indices grouped longest first so that a batch's padding (rows × its longest row) stays within `max_tokens`."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i))
    batches: list[list[int]] = []
    for i in order:
        if batches:
            current = batches[-1]
            longest = len(examples[current[0]].input_ids)
            if len(current) < max_rows and (len(current) + 1) * longest <= max_tokens:
                current.append(i)
                continue
        batches.append([i])
    return batches


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


class HFTeacher:
    """A transformers causal LM as teacher, under `torch.inference_mode`."""

    def __init__(self, model: Any, k: int, chunk_size: int = 2048):
        self.model, self.k, self.chunk_size = model, k, chunk_size
        self.device = next(model.parameters()).device
        config = model.config
        # Heads that are not a plain linear map of the last hidden state need the model's own forward.
        self.head_only = getattr(config, "final_logit_softcapping", None) is None and getattr(config, "logit_scale", None) is None
        self.pad_id = getattr(config, "pad_token_id", None) or 0

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
            hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            selected, project = hidden[rows, cols], self.model.get_output_embeddings()
        else:
            selected = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[rows, cols]
            project = None
        pieces = []
        for start in range(0, len(labels), self.chunk_size):
            chunk = selected[start : start + self.chunk_size]
            logits = project(chunk) if project is not None else chunk.clone()
            pieces.append(sparse_targets(logits, labels[start : start + self.chunk_size], self.k))
        ids, logprobs, target, tail = (torch.cat(parts).cpu().numpy() for parts in zip(*pieces))
        return split_targets(batch, ids.astype(np.int32), logprobs, target, tail)


def pad_batch(batch: Sequence[TokenizedExample], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask, as long as the batch's longest row."""
    longest = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for i, e in enumerate(batch):
        ids[i, : len(e.input_ids)] = torch.from_numpy(e.input_ids.astype(np.int64))
        mask[i, : len(e.input_ids)] = 1
    return ids.to(device), mask.to(device)


def split_targets(batch: Sequence[TokenizedExample], ids: np.ndarray, logprobs: np.ndarray, target: np.ndarray, tail: np.ndarray) -> list[Targets]:
    """Per-position arrays for the whole batch -> one `Targets` per example."""
    out, start = [], 0
    for e in batch:
        end = start + len(e.positions)
        out.append(Targets(ids[start:end], logprobs[start:end].astype(np.float32), target[start:end].astype(np.float32), tail[start:end].astype(np.float32)))
        start = end
    return out
