"""Padding-free student batches (`--batching packed`) and length-grouped order (`--batching grouped`): the packed
batch's loss and every gradient equal the padded batch's and a dense one-example-at-a-time reference; finetune's
cross-entropy through the fused head equals transformers' own; the routes, LoRA and several caches train the same
packed as padded."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import run_cli

from kdpipe.cache import open_cache
from kdpipe.losses import DistillLossConfig, SparseTargets, distill_loss
from kdpipe.train.data import BlockShuffleSampler, DistillCollator, SFTCollator
from kdpipe.train.packing import (
    choose_batching,
    first_fit,
    pack_length_for,
    packing_supported,
    real_tokens,
    token_batch,
)

LOSS = DistillLossConfig("jsd", 0.7, 2.0, beta=0.3, tail="bucket", chunk_size=5)


def student(world, attn="sdpa"):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(world.student), dtype=torch.float32, attn_implementation=attn)
    return model.eval()


def logged_losses(run):
    return [h["loss"] for h in json.loads((run / "kdpipe_run.json").read_text())["log_history"] if "loss" in h]


def test_first_fit_and_the_packed_layout():
    assert first_fit([5, 3, 4, 2, 1], 6) == [0, 2, 1, 1, 0]  # by decreasing length: 5+1 | 4+2 | 3
    assert first_fit([9, 2], 4) == [0, 1]  # longer than a row: a row of its own
    tokens = [np.arange(10, 10 + n) for n in (5, 3, 4, 2)]
    positions = [np.arange(n - 1) for n in (5, 3, 4, 2)]
    padded = token_batch(tokens, positions, pad_id=0)
    packed = token_batch(tokens, positions, pad_id=0, packed=True)
    assert padded["input_ids"].shape == (4, 5) and "position_ids" not in padded
    assert packed["input_ids"].shape == (3, 5) and "attention_mask" not in packed  # rows: 5 | 4 | 3+2
    assert packed["input_ids"][2].tolist() == [10, 11, 12, 10, 11]
    assert packed["position_ids"][2].tolist() == [0, 1, 2, 0, 1]
    assert packed["position_ids"][1].tolist() == [0, 1, 2, 3, 0]  # the pad at the row's end: its own segment
    assert real_tokens(padded) == real_tokens(packed) == 14
    for batch in (padded, packed):  # the targets point at the same tokens, in the same order
        at = batch["input_ids"][batch["target_rows"], batch["target_cols"]]
        assert at.tolist() == np.concatenate([t[:-1] for t in tokens]).tolist()
    wide = token_batch(tokens, positions, pad_id=0, packed=True, pack_length=8)
    assert wide["input_ids"].shape == (2, 8)  # 5+3 | 4+2


def dense_reference(model, rows, k):
    """Each example alone (batch of one, no padding, no packing), full logits, then the loss on all targets."""
    selected, targets = [], []
    for r in rows:
        logits = model(input_ids=torch.from_numpy(r.input_ids.astype(np.int64))[None]).logits[0]
        selected.append(logits[torch.from_numpy(r.positions.astype(np.int64))])
    batch = DistillCollator(0, model.config.vocab_size, k)(rows)
    targets = SparseTargets(batch["topk_ids"], batch["topk_logprobs"], batch["tail_mass"], batch["labels"])
    return distill_loss(torch.cat(selected), lambda x: x, targets, LOSS)


def grads_of(model, loss_fn):
    model.zero_grad()
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_and_every_gradient_equal_padded_and_dense(world, attn):
    from kdpipe.train.trainer import student_distill_loss

    model = student(world, attn)
    assert packing_supported(model)
    cache = open_cache(world.cache)
    rows = [r for _, r in zip(range(7), cache.iter_examples())]
    vocab = model.config.vocab_size
    padded = DistillCollator(0, vocab, cache.k)(rows)
    packed = DistillCollator(0, vocab, cache.k, packed=True, pack_length=80)(rows)
    assert packed["input_ids"].shape[0] == 3  # rows really shared: 7 examples of 19-26 tokens
    want, want_g = grads_of(model, lambda: dense_reference(model, rows, cache.k))
    for batch in (padded, packed):
        got, got_g = grads_of(model, lambda b=batch: student_distill_loss(model, b, LOSS))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for name, g in want_g.items():
            torch.testing.assert_close(got_g[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_finetune_cross_entropy_equals_transformers_own(world):
    from kdpipe.data.sources import DataConfig, load_examples
    from kdpipe.data.templates import get_template
    from kdpipe.data.tokenize import tokenize_examples
    from kdpipe.train.trainer import student_distill_loss

    cfg = DataConfig(dataset="kdpipe:arithmetic", limit=6)
    examples, _ = tokenize_examples(load_examples(cfg).examples, get_template("arithmetic"), world.tokenizer, cfg)
    model = student(world)
    pad = world.tokenizer.pad_token_id
    padded = SFTCollator(pad)(examples)
    ids, mask = padded["input_ids"], padded["attention_mask"]
    labels = torch.full_like(ids, -100)  # transformers' unshifted causal-LM labels: the token at j when j-1 is trained
    labels[padded["target_rows"], padded["target_cols"] + 1] = ids[padded["target_rows"], padded["target_cols"] + 1]
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        ce = DistillLossConfig(alpha=0.0)
        for batch in (padded, SFTCollator(pad, packed=True, pack_length=128)(examples)):
            torch.testing.assert_close(student_distill_loss(model, batch, ce), want, rtol=1e-5, atol=1e-6)


def test_grouped_order_is_a_pure_function_of_seed_and_epoch():
    rng = np.random.default_rng(0)
    lengths = np.minimum(rng.lognormal(5.5, 0.7, 1000).astype(int) + 2, 512)
    sizes = [256, 256, 256, 232]
    grouped = BlockShuffleSampler(sizes, seed=3, window=2, stripe=8, lengths=lengths)
    plain = BlockShuffleSampler(sizes, seed=3, window=2, stripe=8)
    order = grouped.order(epoch=1)
    assert sorted(order.tolist()) == list(range(1000))
    assert np.array_equal(order, BlockShuffleSampler(sizes, 3, 2, stripe=8, lengths=lengths).order(1))
    assert not np.array_equal(order, grouped.order(epoch=2))
    # the rows of each window stay in that window: the plain order's first 512 rows are the grouped order's
    assert set(order[:512].tolist()) == set(plain.order(1)[:512].tolist())

    def padding(o):  # padded tokens of batches of 8 in this order
        batches = lengths[o[: len(o) // 8 * 8]].reshape(-1, 8)
        return (batches.max(1, keepdims=True) - batches).sum()

    assert padding(order) < 0.2 * padding(plain.order(1))


def test_packing_falls_back_with_a_note(world, caplog):
    model = student(world)
    assert choose_batching("packed", model) == "packed" and choose_batching("padded", model) == "padded"
    with caplog.at_level("INFO", logger="kdpipe"):  # the command line shows kdpipe's notes on stderr
        assert choose_batching("packed", model, why_not="the test says so") == "grouped"
    assert "--batching packed does not apply: the test says so" in caplog.text

    class Positionless(torch.nn.Module):  # a body that cannot take position ids (as ALiBi models)
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, input_ids, use_cache=False):
            return model.model(input_ids=input_ids)

    broken = student(world)
    broken.model = Positionless()
    assert not packing_supported(broken)
    # flash-attention reads packed sequences from position ids only in a one-row batch: one row per micro-batch
    assert pack_length_for(model, 64) == 64 and pack_length_for(model, None) is None
    model.config._attn_implementation = "flash_attention_2"
    assert pack_length_for(model, 64) >= 2**40


@pytest.mark.parametrize("route", ["lora", "two-caches", "cross-tokenizer"])
def test_routes_train_the_same_packed_as_padded(world, tmp_path, route):
    common = ["--model", world.student, "--cache", world.cache, "--max-steps", 3, "--batch-size", 8, "--lr", "5e-3",
              "--logging-steps", 1, "--warmup", 0, "--lr-scheduler", "constant", "--lora-dropout", 0]
    if route == "two-caches":  # a second cache of the same teacher on other examples (a copy is refused)
        run_cli("cache-teacher", "--model", world.teacher, "--dataset", "kdpipe:arithmetic", "--split", "test",
                "--limit", 16, "--top-k", 8, "--cache", tmp_path / "second", "--device", "cpu")
    extra = {"lora": ["--lora"], "two-caches": ["--full", "--cache", tmp_path / "second"],
             "cross-tokenizer": ["--full", "--cross-tokenizer", "--alpha", 0.5]}[route]
    if route == "cross-tokenizer":
        common[1] = world.other_student
    losses = {}
    for batching in ("padded", "packed"):  # packed: rows of 64 tokens, 2-3 examples of 19-26 tokens in each
        out = tmp_path / batching
        run_cli("train-student", *common, *extra, "--batching", batching, "--pack-length", 64, "--output", out)
        losses[batching] = logged_losses(out)
    assert len(losses["packed"]) == 3
    np.testing.assert_allclose(losses["packed"], losses["padded"], rtol=2e-5)


def test_bad_pack_length_is_refused(world, tmp_path):
    result = run_cli("train-student", "--cache", world.cache, "--model", world.student, "--pack-length", 1,
                     "--output", tmp_path / "r", ok=False)
    assert result.exit_code != 0 and "pack_length must be at least 2, not 1" in result.output
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("stage", ["train-student", "finetune"])
def test_the_run_record_says_which_batching_ran(world, tmp_path, monkeypatch, stage):
    """The options stay as asked (so --resume compares like with like); `used` says what ran."""
    from kdpipe.train import packing

    monkeypatch.setattr(packing, "packing_supported", lambda model: False)  # a model that cannot pack
    data = (["--cache", world.cache] if stage == "train-student" else
            ["--dataset", "kdpipe:arithmetic", "--limit", 16, "--template", "arithmetic"])
    out = tmp_path / "run"
    result = run_cli(stage, "--model", world.student, *data, "--full", "--max-steps", 1, "--batch-size", 4,
                     "--output", out)
    assert "--batching packed does not apply" in result.output
    record = json.loads((out / "kdpipe_run.json").read_text())
    assert record["config"]["batching"] == "packed" and record["used"] == {"batching": "grouped"}
    assert record["status"] == "complete"
