"""Sampled caching: the draws, the unbiased estimate (a statistical test), both loss paths, the stage end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import kdpipe

from kdpipe.cache import open_cache
from kdpipe.losses import DistillLossConfig, SparseTargets, distill_loss
from kdpipe.teacher.hf import Sampling, sampled_targets

F64 = torch.float64


def identity(x):
    return x


def reference_draws(logits: np.ndarray, uniforms: np.ndarray, temperature: float):
    """Independent float64 inverse-CDF sampling: per row, {id: count} and log p̂ = log(c/N) + log p - log q."""
    z = logits.astype(np.float64)
    log_p = z - np.logaddexp.reduce(z, axis=-1, keepdims=True)
    log_q = z / temperature - np.logaddexp.reduce(z / temperature, axis=-1, keepdims=True)
    cdf = np.cumsum(np.exp(log_q), axis=-1)
    out = []
    for row, u in enumerate(uniforms):
        draws = np.minimum(np.searchsorted(cdf[row], u * cdf[row, -1], side="right"), z.shape[1] - 1)
        ids, counts = np.unique(draws, return_counts=True)
        out.append({int(i): (int(c), np.log(c / len(u)) + log_p[row, i] - log_q[row, i]) for i, c in zip(ids, counts)})
    return out


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_draws_match_an_independent_inverse_cdf(temperature):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 300, generator=gen) * 3
    labels = torch.randint(0, 300, (64,), generator=gen)
    uniforms = torch.rand(64, 12, generator=gen, dtype=F64)
    ids, est, counts, target = sampled_targets(logits.clone(), labels, uniforms, temperature)
    ref = reference_draws(logits.numpy(), uniforms.numpy(), temperature)
    for row in range(64):
        got = {int(i): (int(c), float(e)) for i, c, e in zip(ids[row], counts[row], est[row]) if c > 0}
        assert got.keys() == ref[row].keys()
        for i, (c, e) in got.items():
            assert c == ref[row][i][0]
            assert e == pytest.approx(ref[row][i][1], abs=1e-4)
        c = counts[row].numpy()
        assert c.sum() == 12 and np.all(np.diff(c) <= 0), "counts sum to N, most often drawn first"
        assert np.all(est[row][counts[row] == 0].isneginf().numpy())
    np.testing.assert_allclose(target, logits.log_softmax(-1).gather(1, labels[:, None]).squeeze(1), atol=1e-5)


def test_uniforms_are_a_function_of_seed_and_id():
    a, b = Sampling(12, 1.0, 3), Sampling(12, 1.0, 4)
    np.testing.assert_array_equal(a.uniforms("ex-1", 5), a.uniforms("ex-1", 5))
    np.testing.assert_array_equal(a.uniforms("ex-1", 5)[:3], a.uniforms("ex-1", 3))
    assert not np.array_equal(a.uniforms("ex-1", 5), a.uniforms("ex-2", 5))
    assert not np.array_equal(a.uniforms("ex-1", 5), b.uniforms("ex-1", 5))


# ---------------------------------------------------------------- unbiasedness (statistical)

DRAWS, SAMPLES, V, D = 20000, 6, 40, 16


def per_draw_gradients(temperature: float, fused: bool, sampled: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """DRAWS independent sampled estimates of one teacher position; each one's sparse-loss gradient, and the dense one.

    The student sees the same input in every row, so row m's gradient is draw m's estimate of the
    gradient; the dense forward-KL gradient is the exact target.
    """
    gen = torch.Generator().manual_seed(1)
    teacher_logits = torch.randn(V, generator=gen, dtype=F64) * 0.7
    # design check: every id is drawn often enough that the sample variance sees its importance weight
    assert DRAWS * SAMPLES * torch.softmax(teacher_logits / temperature, -1).min() > 10
    head = torch.nn.Linear(D, V, bias=True).double()
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, D, generator=gen, dtype=F64) * 0.5)
        head.bias.copy_(torch.randn(V, generator=gen, dtype=F64))
    h0 = torch.randn(D, generator=gen, dtype=F64)
    uniforms = torch.rand(DRAWS, SAMPLES, generator=gen, dtype=F64)
    ids, est, _, _ = sampled_targets(teacher_logits.expand(DRAWS, V).clone(), torch.zeros(DRAWS, dtype=torch.long),
                                     uniforms, temperature)
    targets = SparseTargets(ids, est.double(), torch.zeros(DRAWS, dtype=F64))
    cfg = DistillLossConfig("fkl", alpha=1.0, tail="bucket", fused=fused, sampled=sampled)
    if fused:
        hidden = h0.expand(DRAWS, D).clone().requires_grad_(True)
        distill_loss(hidden, head, targets, cfg, num_items=1).backward()
        dense = head.weight.T @ (torch.softmax(head(h0), -1) - torch.softmax(teacher_logits, -1))
    else:
        logits = head(h0).detach().expand(DRAWS, V).clone().requires_grad_(True)
        hidden = logits
        distill_loss(hidden, identity, targets, cfg, num_items=1).backward()
        dense = torch.softmax(logits[0], -1) - torch.softmax(teacher_logits, -1)
    return hidden.grad.detach().numpy(), dense.detach().numpy()


def within_standard_errors(grads: np.ndarray, dense: np.ndarray, z: float = 4.5) -> np.ndarray:
    """|mean - dense| / (standard error from the draws' sample variance), per coordinate."""
    mean, se = grads.mean(0), grads.std(0, ddof=1) / np.sqrt(len(grads))
    assert np.all(se > 0), "every coordinate must vary across draws for the test to mean anything"
    return np.abs(mean - dense) / se


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.6, 2.0])
def test_sampled_gradient_is_unbiased(temperature, fused):
    """Averaged over many seeded draws, the sparse loss's gradient converges to the dense KL gradient.

    Tolerance: 4.5 standard errors of the mean, per coordinate, from the draws' own sample variance
    (for ~40 coordinates a correct estimator passes with probability > 0.999).
    """
    grads, dense = per_draw_gradients(temperature, fused)
    z = within_standard_errors(grads, dense)
    assert z.max() < 4.5, f"largest deviation {z.max():.2f} standard errors"


def test_the_statistical_test_detects_a_biased_estimate():
    """Renormalising the importance-weighted estimate (self-normalised, sampled=False) is biased at T != 1:
    the same test must reject it (so it has the power to catch a wrong estimator)."""
    grads, dense = per_draw_gradients(0.6, fused=False, sampled=False)
    assert within_standard_errors(grads, dense).max() > 4.5


# ---------------------------------------------------------------- the loss paths against the dense formula


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_sampled_loss_paths_match_the_dense_formula(alpha):
    gen = torch.Generator().manual_seed(2)
    n, v, d = 9, 30, 8
    head = torch.nn.Linear(d, v).double()
    hidden = torch.randn(n, d, generator=gen, dtype=F64)
    labels = torch.randint(0, v, (n,), generator=gen)
    ids, est, _, _ = sampled_targets(torch.randn(n, v, generator=gen) * 2, labels, torch.rand(n, 5, generator=gen, dtype=F64), 0.6)
    targets = SparseTargets(ids, est.double(), torch.zeros(n, dtype=F64), labels)

    def dense_formula(h, w, b):
        """Σ_v p̂_v (log p̂_v − log s_v) with p̂ as a dense vector (0 off the samples), plus the CE mix."""
        logs = F.linear(h, w, b).log_softmax(-1)
        p_hat = torch.zeros(n, v, dtype=F64).scatter_add_(1, ids, est.double().exp().nan_to_num(0.0) * (est > -torch.inf))
        kl = torch.where(p_hat > 0, p_hat * (p_hat.clamp_min(1e-300).log() - logs), 0.0).sum(-1)
        return (alpha * kl + (1 - alpha) * F.nll_loss(logs, labels, reduction="none")).mean()

    results = []
    for fused in (True, False):
        h, w, b = (t.detach().clone().requires_grad_(True) for t in (hidden, head.weight, head.bias))
        lin = torch.nn.Linear(d, v).double()
        lin.weight, lin.bias = torch.nn.Parameter(w), torch.nn.Parameter(b)
        loss = distill_loss(h, lin, targets, DistillLossConfig("fkl", alpha=alpha, fused=fused, sampled=True, chunk_size=4))
        loss.backward()
        results.append((loss.detach(), h.grad, lin.weight.grad, lin.bias.grad))
    h, w, b = (t.detach().clone().requires_grad_(True) for t in (hidden, head.weight, head.bias))
    ref = dense_formula(h, w, b)
    ref.backward()
    for loss, gh, gw, gb in results:
        torch.testing.assert_close(loss, ref.detach(), rtol=1e-10, atol=1e-12)
        for got, want in ((gh, h.grad), (gw, w.grad), (gb, b.grad)):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("kwargs, option", [({"loss": "rkl"}, "loss"), ({"temperature": 2.0}, "temperature"),
                                            ({"tail": "renorm"}, "tail")])
def test_sampled_refuses_biased_options(kwargs, option):
    with pytest.raises(ValueError, match=f"{option}=.* is not supported on a sampled cache"):
        DistillLossConfig(**{"loss": "fkl", **kwargs}, sampled=True)
    DistillLossConfig(**{"loss": "fkl", **kwargs}, alpha=0.0, sampled=True)  # pure CE ignores the teacher


# ---------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def sampled_cache(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("sampled")
    common = ("--model", tiny_model_dir, "--dataset", "kdpipe:arithmetic", "--limit", 20, "--dtype", "fp32",
              "--sparse-mode", "sampled", "--samples", 12, "--seed", 5)
    kdpipe("cache-teacher", *common, "--encoding", "compact", "--cache", root / "a", "--batch-size", 7)
    kdpipe("cache-teacher", *common, "--cache", root / "b", "--batch-size", 3, "--rows-per-shard", 6)
    kdpipe("cache-teacher", *common, "--proposal-temperature", 1.5, "--cache", root / "t")
    return root


def test_sampled_cache_draws_from_the_teacher(sampled_cache, tiny_model_dir):
    from helpers import dense_reference

    examples = list(open_cache(sampled_cache / "a").iter_examples())
    assert len(examples) == 20
    sampler = Sampling(12, 1.0, 5)
    for e in examples[:6]:
        logp = dense_reference(tiny_model_dir, e.input_ids)[e.positions].numpy()
        ref = reference_draws(logp, sampler.uniforms(e.id, len(e.positions)), 1.0)
        for row, drawn in enumerate(ref):
            got = {int(i): int(c) for i, c in zip(e.targets.topk_ids[row], e.targets.sample_counts[row]) if c}
            assert got == {i: c for i, (c, _) in drawn.items()}
            np.testing.assert_allclose(np.exp(e.targets.topk_logprobs[row][e.targets.sample_counts[row] > 0]),
                                       e.targets.sample_counts[row][e.targets.sample_counts[row] > 0] / 12, rtol=1e-6)
        np.testing.assert_allclose(e.targets.target_logprob, logp[np.arange(len(e.positions)), e.labels], rtol=2**-10)


def test_sampled_cache_is_deterministic_per_example(sampled_cache):
    """Other batch sizes, shard sizes and encoding: the same draws per example (resume and splits reproduce)."""
    a, b = (list(open_cache(sampled_cache / name).iter_examples()) for name in ("a", "b"))
    for x, y in zip(a, b):
        assert x.id == y.id
        np.testing.assert_array_equal(x.targets.topk_ids, y.targets.topk_ids)
        np.testing.assert_array_equal(x.targets.sample_counts, y.targets.sample_counts)


def test_proposal_temperature_stores_importance_ratios(sampled_cache, tiny_model_dir):
    import pyarrow.parquet as pq
    from helpers import dense_reference

    table = pq.read_table(sampled_cache / "t" / "shard-00000.parquet")
    assert "sample_log_ratio" in table.column_names and "sample_log_ratio" not in pq.read_schema(
        sampled_cache / "a" / "shard-00000.parquet").names
    e = next(open_cache(sampled_cache / "t").iter_examples())
    logp = dense_reference(tiny_model_dir, e.input_ids)[e.positions].numpy()
    ref = reference_draws(logp, Sampling(12, 1.5, 5).uniforms(e.id, len(e.positions)), 1.5)
    for row, drawn in enumerate(ref):
        for i, c, est in zip(e.targets.topk_ids[row], e.targets.sample_counts[row], e.targets.topk_logprobs[row]):
            if c:
                assert est == pytest.approx(drawn[int(i)][1], abs=1e-4)


def test_sampled_cache_info_verify_and_training(sampled_cache, tiny_model_dir, tmp_path):
    info = json.loads(kdpipe("cache", "info", sampled_cache / "a", "--json").output)
    assert (info["sparse_mode"], info["samples"], info["proposal_temperature"], info["encoding"]) == ("sampled", 12, 1.0, "compact")
    assert info["bytes_per_target_token"] == round(info["bytes"] / info["target_tokens"], 2)
    assert "ok" in kdpipe("cache", "verify", sampled_cache / "a", sampled_cache / "t").output
    kdpipe("train-student", "--model", tiny_model_dir, "--cache", sampled_cache / "a", "--max-steps", 2, "--batch-size", 4,
           "--full", "--output", tmp_path / "run")
    assert (tmp_path / "run" / "model.safetensors").is_file()
    bad = kdpipe("train-student", "--model", tiny_model_dir, "--cache", sampled_cache / "a", "--loss", "jsd",
                 "--temperature", 2, "--output", tmp_path / "bad", ok=False)
    assert ("--loss jsd, --temperature 2.0 cannot train on the sampled cache" in bad.output
            and "--loss fkl --temperature 1 --tail bucket" in bad.output), bad.output


def test_verify_catches_bad_sample_counts(sampled_cache):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kdpipe.cache.checks import check_values
    from kdpipe.cache.manifest import read_manifest

    table = pq.ParquetFile(sampled_cache / "b" / "shard-00000.parquet").read()  # with the id rank table
    counts = table["sample_counts"].combine_chunks()
    flat = counts.values.values.to_numpy().copy()
    flat[0] += 1
    bad_counts = pa.ListArray.from_arrays(counts.offsets, pa.ListArray.from_arrays(counts.values.offsets, pa.array(flat)))
    bad = table.set_column(table.schema.get_field_index("sample_counts"), table.schema.field("sample_counts"), bad_counts)
    problems = check_values(bad, read_manifest(sampled_cache / "b"))
    assert problems and "sample counts do not sum to N=12" in problems[0]


def test_vllm_backend_refuses_sampled_mode(tiny_model_dir, tmp_path):
    out = kdpipe("cache-teacher", "--model", tiny_model_dir, "--dataset", "kdpipe:arithmetic", "--limit", 4,
                 "--backend", "vllm", "--sparse-mode", "sampled", "--cache", tmp_path / "c", ok=False).output
    assert "--sparse-mode sampled needs the teacher's full distribution, but --backend vllm only returns" in out
    assert not (tmp_path / "c").exists()


def test_sampled_rows_without_positions_batch_with_the_others():
    """A row with no distilled position decodes to [0, N] like the others, so a batch collates."""
    from kdpipe.cache.format import ENCODINGS, Targets
    from kdpipe.train.data import DistillCollator

    gen = torch.Generator().manual_seed(3)
    ids, est, counts, target = sampled_targets(torch.randn(4, 50, generator=gen), torch.zeros(4, dtype=torch.long),
                                               torch.rand(4, 6, generator=gen, dtype=F64))
    full = Targets(ids.numpy().astype(np.int32), est.numpy(), target.numpy(), np.zeros(4, np.float32), counts.numpy().astype(np.uint8))
    empty = Targets(np.zeros((0, 6), np.int32), np.zeros((0, 6), np.float32), np.zeros(0, np.float32), np.zeros(0, np.float32),
                    np.zeros((0, 6), np.uint8))
    rows = [("a", np.arange(6, dtype=np.int32), np.arange(4, dtype=np.int32), full),
            ("b", np.arange(3, dtype=np.int32), np.zeros(0, np.int32), empty)]
    for encoding in ("plain", "compact"):
        table = ENCODINGS[encoding].encode(rows, 6, {"encoding": encoding, "sparse_mode": "sampled", "samples": 6, "vocab_size": 50})
        a, b = ENCODINGS[encoding].decode(table)
        assert a.targets.topk_ids.shape == (4, 6) and b.targets.topk_ids.shape == (0, 6)
        np.testing.assert_array_equal(a.targets.topk_ids, full.topk_ids)
        np.testing.assert_array_equal(a.targets.sample_counts, full.sample_counts)
        np.testing.assert_allclose(a.targets.topk_logprobs, full.topk_logprobs, rtol=1e-6)
        batch = DistillCollator(0, 50, 6)([a, b])
        assert batch["topk_ids"].shape == (4, 6)
