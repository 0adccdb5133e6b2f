"""Property-based tests (hypothesis): the shard encoding round-trips any rows; the sparse losses are
finite, non-negative and zero when the student is the teacher, whatever the distributions."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from kdpipe.cache.format import Targets, decode, encode_plain
from kdpipe.cache.writer import shard_bytes
from kdpipe.losses import LOSSES, DistillLossConfig, SparseTargets, distill_loss

F64 = torch.float64
SETTINGS = settings(max_examples=40, deadline=None)


# ---------------------------------------------------------------- shards


@st.composite
def cache_rows(draw) -> tuple[int, list]:
    """Rows as the teacher produces them: P distilled positions among L tokens (P may be 0), k ids each."""
    k = draw(st.integers(1, 6))
    rows = []
    for i in range(draw(st.integers(1, 5))):
        length = draw(st.integers(2, 40))
        positions = np.array(sorted(draw(st.sets(st.integers(0, length - 2), max_size=length - 1))), np.int32)
        p = len(positions)
        finite = st.floats(-60, 0, width=16)
        rows.append((
            draw(st.text(min_size=1, max_size=12)) + f"#{i}",  # any unicode id, unique in the shard
            draw(arrays(np.int32, length, elements=st.integers(0, 2**31 - 1))),
            positions,
            Targets(
                draw(arrays(np.int32, (p, k), elements=st.integers(0, 2**31 - 1))),
                -np.sort(-draw(arrays(np.float16, (p, k), elements=finite)), axis=1),
                draw(arrays(np.float32, p, elements=st.floats(-1e4, 0, width=32))),
                draw(arrays(np.float32, p, elements=st.floats(0, 1, width=32))),
            ),
        ))
    return k, rows


@SETTINGS
@given(cache_rows())
def test_shard_encode_decode_round_trip(data):
    k, rows = data
    table = encode_plain(rows, k, {"k": k})
    data = shard_bytes(table)
    back = pq.read_table(pa.BufferReader(data))
    assert back.schema.names == table.schema.names and back.schema.metadata == table.schema.metadata
    decoded = decode(back)
    assert [e.id for e in decoded] == [r[0] for r in rows]
    for e, (_, input_ids, positions, t) in zip(decoded, rows):
        np.testing.assert_array_equal(e.input_ids, input_ids)
        np.testing.assert_array_equal(e.positions, positions)
        assert e.targets.topk_ids.shape == e.targets.topk_logprobs.shape == (len(positions), k)
        np.testing.assert_array_equal(e.targets.topk_ids, t.topk_ids)
        np.testing.assert_array_equal(e.targets.topk_logprobs, t.topk_logprobs.astype(np.float32))  # float16 is exact
        np.testing.assert_array_equal(e.targets.target_logprob, t.target_logprob)
        np.testing.assert_array_equal(e.targets.tail_mass, t.tail_mass)
    for batch in pq.ParquetFile(pa.BufferReader(data)).iter_batches(batch_size=2):  # the reader's path
        assert all(len(e.targets.tail_mass) == len(e.positions) for e in decode(batch))


# ---------------------------------------------------------------- losses


@st.composite
def distributions(draw) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Student and teacher logits [N, V] (any scale, some peaked), and k <= V."""
    n, vocab = draw(st.integers(1, 6)), draw(st.integers(2, 24))
    seed, scale = draw(st.integers(0, 2**32 - 1)), draw(st.sampled_from([0.1, 1.0, 5.0, 30.0]))
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(n, vocab, generator=g, dtype=F64) * scale
    teacher = torch.randn(n, vocab, generator=g, dtype=F64) * draw(st.sampled_from([0.1, 1.0, 5.0, 30.0]))
    return student, teacher, draw(st.integers(1, vocab))


def sparse(teacher_logits: torch.Tensor, k: int) -> SparseTargets:
    """The cache's view of a teacher: top-k ids and log-probs, the exact tail mass, and a label."""
    logp = teacher_logits.log_softmax(-1)
    top = logp.topk(k, -1)
    tail = (1.0 - top.values.exp().sum(-1)).clamp_min(0.0) if k < logp.shape[-1] else torch.zeros(len(logp), dtype=F64)
    return SparseTargets(top.indices, top.values, tail, logp.argmax(-1))


def config(loss: str, tail: str, temperature: float, alpha: float = 1.0, fused: bool = True) -> DistillLossConfig:
    return DistillLossConfig(loss, alpha, temperature, skew=0.1, beta=0.3, tail=tail, chunk_size=4, fused=fused)


@pytest.mark.parametrize("loss", LOSSES)
@SETTINGS
@given(data=distributions(), tail=st.sampled_from(["bucket", "renorm"]), temperature=st.sampled_from([0.5, 1.0, 2.0, 5.0]),
       alpha=st.sampled_from([0.0, 0.3, 1.0]))
@example(data=(torch.tensor([[0.15, -0.03]], dtype=F64), torch.tensor([[-65.4, 17.1]], dtype=F64), 1),
         tail="bucket", temperature=0.5, alpha=0.3)  # the teacher's tail underflows to 0: reverse KL was +inf
def test_losses_are_finite_and_divergences_non_negative(loss, data, tail, temperature, alpha):
    student, teacher, k = data
    value = distill_loss(student.clone().requires_grad_(), lambda x: x, sparse(teacher, k), config(loss, tail, temperature, alpha))
    assert torch.isfinite(value) and value >= -1e-12  # a divergence, a cross-entropy, or a mix: never negative
    value.backward()


@pytest.mark.parametrize("loss", LOSSES)
@SETTINGS
@given(data=distributions(), temperature=st.sampled_from([0.5, 1.0, 2.0, 5.0]), fused=st.booleans())
def test_divergence_is_zero_when_the_student_is_the_teacher(loss, data, temperature, fused):
    """Exact cases: renorm at any T, bucket at T = 1 (at T != 1 the bucket treats the tail as one token).

    The student is an LM head (nn.Linear: the fused path, or wrapped: the checkpointed one) whose
    logits are the teacher's own.
    """
    hidden, _, k = data
    vocab = hidden.shape[1]
    head = torch.nn.Linear(vocab, vocab, bias=False, dtype=F64)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(vocab), dtype=F64))
        targets = sparse(head(hidden), k)
    student = head if fused else (lambda x: head(x))
    for tail, t in (("renorm", temperature), ("bucket", 1.0)):
        value = distill_loss(hidden.clone().requires_grad_(), student, targets, config(loss, tail, t))
        assert abs(value.item()) < 1e-9, (tail, t, value)
