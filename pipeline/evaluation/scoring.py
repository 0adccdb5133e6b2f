"""Running a loaded causal LM for evaluation: log-probs at chosen positions, and greedy generation.

The decoder runs once per batch of right-padded sequences (sorted by length, with an attention
mask); the LM head runs only on the positions asked for, `chunk_size` at a time, so the
full-vocabulary log-probs never exist for a whole batch. Padding never reaches a result: only real
positions are read, so a sequence scores the same alone or in any padded batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from kdpipe.batching import head_chunks, length_batches, pad
from kdpipe.config import progress_disabled
from kdpipe.models import last_hidden_states, output_head


def progress(total: int, desc: str) -> Any:
    return tqdm(total=total, desc=desc, unit="ex", dynamic_ncols=True, mininterval=1.0, leave=False,
                disable=progress_disabled())


@torch.no_grad()
def map_positions(
    model: Any,
    sequences: Sequence[np.ndarray],
    positions: Sequence[np.ndarray],
    fn: Callable[[torch.Tensor, slice], dict[str, torch.Tensor]],
    pad_id: int,
    batch_size: int = 32,
    max_batch_tokens: int = 16384,
    chunk_size: int = 1024,
    desc: str = "scoring",
) -> dict[str, np.ndarray]:
    """Apply `fn(logp [C, V] float32 log-softmax, flat slice)` to the next-token distributions at
    ``positions[i]`` of each sequence; return each output key concatenated in the flat order
    (sequence by sequence, positions in the given order).

    The flat slice tells `fn` which entries of the flattened positions the chunk covers, so it can
    look up per-position data (labels, cached targets) of its own.
    """
    device = next(model.parameters()).device
    head = output_head(model)
    starts = np.concatenate([[0], np.cumsum([len(p) for p in positions])]).astype(np.int64)
    outputs: dict[int, dict[str, torch.Tensor]] = {}
    bar = progress(len(sequences), desc)
    for batch in length_batches([len(s) for s in sequences], batch_size, max_batch_tokens):
        ids, mask = pad([sequences[i] for i in batch], pad_id)
        hidden = last_hidden_states(model, ids.to(device), mask.to(device))
        for row, i in enumerate(batch):
            # chunked per sequence, not across the batch: a sequence's chunks are the same alone or batched
            pos = torch.as_tensor(np.asarray(positions[i], np.int64), device=device)
            pieces: list[dict[str, torch.Tensor]] = []
            for sl, logits in head_chunks(hidden[row, pos], head, chunk_size):
                flat = slice(int(starts[i]) + sl.start, int(starts[i]) + sl.stop)
                out = fn(logits.float().log_softmax(-1), flat)
                pieces.append({k: v.detach().cpu() for k, v in out.items()})
            if pieces:
                outputs[i] = {k: torch.cat([p[k] for p in pieces]) for k in pieces[0]}
        bar.update(len(batch))
    bar.close()
    done = [outputs[i] for i in range(len(sequences)) if i in outputs]
    if not done:
        return {}
    return {k: torch.cat([d[k] for d in done]).numpy() for k in done[0]}


def target_logprobs(model: Any, sequences: Sequence[np.ndarray], positions: Sequence[np.ndarray], pad_id: int,
                    **kwargs: Any) -> np.ndarray:
    """log p(sequence[t + 1] | sequence[: t + 1]) for each t in positions, flattened (float64)."""
    nexts = [np.asarray(s, np.int64)[np.asarray(p, np.int64) + 1] for s, p in zip(sequences, positions)]
    labels = torch.as_tensor(np.concatenate(nexts) if nexts else np.zeros(0, np.int64))

    def fn(logp: torch.Tensor, flat: slice) -> dict[str, torch.Tensor]:
        return {"lp": logp.gather(-1, labels[flat].to(logp.device).unsqueeze(-1)).squeeze(-1).double()}

    return map_positions(model, sequences, positions, fn, pad_id, **kwargs).get("lp", np.zeros(0))


@torch.no_grad()
def greedy_generate(model: Any, prompts: Sequence[Sequence[int]], pad_id: int, eos_id: int | None,
                    max_new_tokens: int, batch_size: int = 32, desc: str = "generating") -> list[list[int]]:
    """Greedy continuations (token ids, up to and without the first EOS) of left-padded prompt batches."""
    device = next(model.parameters()).device
    results: list[list[int]] = [[] for _ in prompts]
    bar = progress(len(prompts), desc)
    for batch in length_batches([len(p) for p in prompts], batch_size, 1 << 62):
        ids, mask = pad([prompts[i] for i in batch], pad_id, left=True)
        longest = ids.shape[1]
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad_id,
                             eos_token_id=eos_id, temperature=None, top_p=None, top_k=None)
        for row, i in enumerate(batch):
            new = out[row, longest:].tolist()
            if eos_id is not None and eos_id in new:
                new = new[: new.index(eos_id)]
            results[i] = new
        bar.update(len(batch))
    bar.close()
    return results
