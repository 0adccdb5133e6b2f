"""Stage two: `kdpipe train-student` and `kdpipe merge-lora` on tiny models and caches (CPU, offline)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import expect_error, run_cli, student_kwargs

from kdpipe.cache import open_cache
from kdpipe.losses import DistillLossConfig, SparseTargets, distill_loss
from kdpipe.train.data import BlockShuffleSampler, CacheDataset, DistillCollator

F32 = torch.float32


def load_lm(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=F32).eval()


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def sample_ids(world, n=3):
    rows = [e.input_ids for e in open_cache(world.cache).iter_examples()][:n]
    width = min(len(r) for r in rows)
    return torch.tensor(np.stack([r[:width] for r in rows]).astype(np.int64))


def losses_logged(out):
    history = json.loads((out / "kdpipe_run.json").read_text())["log_history"]
    return [h["loss"] for h in history if "loss" in h]


# ---------------------------------------------------------------- data: dataset, sampler, collator


def test_dataset_and_collator_reproduce_the_cache_rows(world):
    cache = open_cache(world.cache)
    expected = list(cache.iter_examples())
    dataset = CacheDataset(cache, keep_groups=1)
    assert len(dataset) == len(expected) == 64 and len(dataset.sizes) == 3
    for i in (0, 30, 63, 5, 50):  # jumping between row groups with one kept decoded
        assert dataset[i].id == expected[i].id
    rows = [dataset[i] for i in (3, 40, 17)]
    batch = DistillCollator(pad_id=1, student_vocab=10_000, k=cache.k)(rows)
    flat = lambda f: np.concatenate([f(r) for r in rows])  # noqa: E731
    assert batch["topk_ids"].shape == (sum(len(r.positions) for r in rows), cache.k)
    np.testing.assert_array_equal(batch["topk_ids"].numpy(), flat(lambda r: r.targets.topk_ids))
    np.testing.assert_array_equal(batch["topk_logprobs"].numpy(), flat(lambda r: r.targets.topk_logprobs))
    np.testing.assert_array_equal(batch["tail_mass"].numpy(), flat(lambda r: r.targets.tail_mass))
    np.testing.assert_array_equal(batch["labels"].numpy(), flat(lambda r: r.labels))
    np.testing.assert_array_equal(batch["target_cols"].numpy(), flat(lambda r: r.positions))
    ids, rows_idx, cols = batch["input_ids"], batch["target_rows"], batch["target_cols"]
    assert torch.equal(ids[rows_idx, cols + 1], batch["labels"])  # right padding: positions index the padded batch
    for i, r in enumerate(rows):
        assert torch.equal(ids[i, : len(r.input_ids)], torch.from_numpy(r.input_ids.astype(np.int64)))
        assert batch["attention_mask"][i].sum() == len(r.input_ids) and (ids[i, len(r.input_ids):] == 1).all()


def test_shuffle_is_a_pure_function_of_seed_and_epoch():
    sizes = [5, 7, 3, 9]
    a, b = BlockShuffleSampler(sizes, seed=3, window=2), BlockShuffleSampler(sizes, seed=3, window=2)
    a.set_epoch(1), b.set_epoch(1)
    assert list(a) == list(b) and sorted(a) == list(range(24))
    assert not np.array_equal(a.order(0), a.order(1))
    assert not np.array_equal(a.order(0), BlockShuffleSampler(sizes, seed=4, window=2).order(0))
    # window=1: each block's rows stay together (reads stay within one row group)
    starts = np.cumsum([0] + sizes)
    blocks = np.searchsorted(starts, BlockShuffleSampler(sizes, seed=3, window=1).order(0), side="right") - 1
    assert (np.diff(blocks) != 0).sum() == len(sizes) - 1
    assert list(BlockShuffleSampler(sizes, 0, shuffle=False)) == list(range(24))


def test_teacher_vocab_padded_larger_than_the_students(world):
    """Cached ids >= the student's vocab are masked out (-inf) and their mass moves to the tail."""
    cache = open_cache(world.padded_cache)
    vocab = len(world.tokenizer)
    rows = list(cache.iter_examples())
    raw_ids = np.concatenate([r.targets.topk_ids for r in rows])
    raw_lp = np.concatenate([r.targets.topk_logprobs for r in rows])
    raw_tail = np.concatenate([r.targets.tail_mass for r in rows])
    outside = raw_ids >= vocab
    assert outside.any(), "the padded teacher should put some of its padding rows in its top-k"
    batch = DistillCollator(pad_id=1, student_vocab=vocab, k=cache.k)(rows)
    ids, lp, tail = batch["topk_ids"].numpy(), batch["topk_logprobs"].numpy(), batch["tail_mass"].numpy()
    assert ids.max() < vocab
    assert np.isneginf(lp[outside]).all() and np.array_equal(lp[~outside], raw_lp[~outside])
    np.testing.assert_allclose(tail, raw_tail + np.where(outside, np.exp(raw_lp), 0).sum(-1), rtol=1e-6)
    total = np.exp(lp).sum(-1) + tail  # the teacher's mass is kept whole
    np.testing.assert_allclose(total, np.exp(raw_lp).sum(-1) + raw_tail, rtol=1e-5)
    # and a student with the smaller vocabulary trains on it
    out = world.root / "runs" / "padded"
    run_cli("train-student", "--cache", world.padded_cache, "--model", world.student, "--output", out,
            "--max-steps", 2, "--batch-size", 4, "--logging-steps", 1, "--full")
    assert all(np.isfinite(losses_logged(out)))


# ---------------------------------------------------------------- the loss the trainer computes


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_trainer_loss_equals_dense_reference(world, lora):
    from kdpipe.stages.train_student import TrainStudentConfig
    from kdpipe.train import setup as training
    from kdpipe.train import trainer as training_loop

    cfg = TrainStudentConfig(model=str(world.student), cache=str(world.cache), lora=lora, loss="jsd", alpha=0.7,
                             temperature=2.0, beta=0.3, tail="bucket", chunk_size=5, lora_dropout=0.0,
                             output=str(world.root / "unused"))
    model = training.load_trainable(cfg)
    if lora:  # make the adapters matter (B is zero at init)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
    cache = open_cache(world.cache)
    rows = [r for _, r in zip(range(5), cache.iter_examples())]
    batch = DistillCollator(world.tokenizer.pad_token_id, len(world.tokenizer), cache.k)(rows)
    trainer = training_loop.make_trainer(cfg.loss_config(), model=model, args=training.training_arguments(cfg, world.root / "unused"),
                                    train_dataset=None, data_collator=None)
    model.eval()
    got = trainer.compute_loss(model, batch)
    got_half = trainer.compute_loss(model, batch, num_items_in_batch=2 * len(batch["labels"]))

    with torch.no_grad():  # independent: the full logits of the same student, then distill_loss on them
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        selected = logits[batch["target_rows"], batch["target_cols"]].double()
        targets = SparseTargets(batch["topk_ids"], batch["topk_logprobs"], batch["tail_mass"], batch["labels"])
        want = distill_loss(selected, lambda x: x, targets, cfg.loss_config())
        # and alpha's CE part by hand
        ce = torch.nn.functional.cross_entropy(selected, batch["labels"])
        kd_only = distill_loss(selected, lambda x: x, targets, DistillLossConfig("jsd", 1.0, 2.0, beta=0.3, tail="bucket"))
    assert torch.allclose(got.double(), want, atol=1e-5, rtol=1e-5)
    assert torch.allclose(want, 0.7 * kd_only + 0.3 * ce, atol=1e-9)
    assert torch.allclose(got_half.double(), want / 2, atol=1e-5, rtol=1e-5)
    got.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in trained)
    if lora:
        assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


# ---------------------------------------------------------------- end to end through the CLI


@pytest.fixture(scope="module")
def lora_run(world):
    out = world.root / "runs" / "lora"
    run_cli("train-student", "--cache", world.cache, "--model", world.student, "--output", out, "--lora", "--merge",
            "--max-steps", 16, "--batch-size", 8, "--lr", "5e-3", "--logging-steps", 1, "--save-steps", 8,
            "--lr-scheduler", "constant", "--warmup", 0, "--alpha", 1.0, "--loss", "fkl", "--seed", 0)
    return out


def test_train_student_lora_merge_end_to_end(world, lora_run):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    losses = losses_logged(lora_run)
    assert len(losses) == 16 and np.mean(losses[-4:]) < np.mean(losses[:4])
    record = json.loads((lora_run / "kdpipe_run.json").read_text())
    assert record["status"] == "complete" and record["global_step"] == 16
    assert (lora_run / "checkpoint-16").is_dir()
    # --merge: the merged model at the top, the adapter in adapter/, both with the tokenizer
    merged = load_lm(lora_run)
    peft = AutoPeftModelForCausalLM.from_pretrained(str(lora_run / "adapter"), dtype=F32).eval()
    for folder in (lora_run, lora_run / "adapter"):
        assert AutoTokenizer.from_pretrained(str(folder)).get_vocab() == world.tokenizer.get_vocab()
    ids = sample_ids(world)
    adapted, base = logits_of(peft, ids), logits_of(load_lm(world.student), ids)
    assert not torch.allclose(adapted, base, atol=1e-3)  # training changed something
    torch.testing.assert_close(logits_of(merged, ids), adapted, atol=1e-5, rtol=1e-5)
    # merge-lora on the adapter gives the same merged model
    again = world.root / "runs" / "merged-again"
    run_cli("merge-lora", lora_run / "adapter", "--output", again)
    torch.testing.assert_close(logits_of(load_lm(again), ids), adapted, atol=1e-5, rtol=1e-5)
    assert (again / "tokenizer.json").is_file()


def test_full_run_is_loadable_by_auto_model(world):
    out = world.root / "runs" / "full"
    run_cli("train-student", "--cache", world.cache, "--model", world.student, "--output", out, "--full",
            "--max-steps", 3, "--batch-size", 8, "--lr", "1e-3", "--save-steps", 100)
    assert not (out / "adapter_config.json").exists()
    ids = sample_ids(world)
    assert not torch.allclose(logits_of(load_lm(out), ids), logits_of(load_lm(world.student), ids), atol=1e-4)


class Crash(Exception):
    pass


def test_resume_continues_with_the_same_data_order(world):
    """Killed right after a checkpoint (mid-epoch 2), then --resume: the weights equal an uninterrupted run's."""
    from transformers import TrainerCallback

    from kdpipe.stages import train_student
    from kdpipe.stages.train_student import TrainStudentConfig

    class CrashAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 9:
                raise Crash

    # 64 rows, batch 4 x grad-accum 2: 8 steps per epoch; the crash is at step 9, in the second epoch
    common = dict(model=str(world.student), cache=str(world.cache), lora=False, max_steps=12, batch_size=4, grad_accum=2,
                  lr=3e-3, save_steps=3, logging_steps=1, seed=5, lr_scheduler="linear", warmup=2.0, shuffle_window=2)
    straight = world.root / "runs" / "straight"
    train_student.run(TrainStudentConfig(output=str(straight), **common))
    broken = world.root / "runs" / "broken"
    with pytest.raises(Crash):
        train_student.run(TrainStudentConfig(output=str(broken), **common), callbacks=[CrashAfterSave()])
    assert (broken / "checkpoint-9").is_dir() and not (broken / "model.safetensors").exists()
    # without --resume the folder is refused and its checkpoints stay as they were
    refused = run_cli("train-student", "--cache", world.cache, "--model", world.student, "--output", broken, "--full",
                      ok=False)
    assert refused.exit_code != 0 and "--resume" in refused.output and isinstance(refused.exception, SystemExit)
    assert (broken / "checkpoint-9" / "trainer_state.json").is_file()
    run_cli("train-student", "--cache", world.cache, "--model", world.student, "--output", broken, "--full", "--resume",
            "--max-steps", 12, "--batch-size", 4, "--grad-accum", 2, "--lr", "3e-3", "--save-steps", 3,
            "--logging-steps", 1, "--seed", 5, "--lr-scheduler", "linear", "--warmup", 2, "--shuffle-window", 2)
    record = json.loads((broken / "kdpipe_run.json").read_text())
    assert record["resumed_from"] == ["checkpoint-9"] and record["global_step"] == 12
    a, b = load_lm(straight), load_lm(broken)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)
    assert not torch.equal(a.lm_head.weight, load_lm(world.student).lm_head.weight)
    # the losses logged after the resume are the uninterrupted run's (same batches in the same order)
    np.testing.assert_allclose(losses_logged(broken)[-3:], losses_logged(straight)[-3:], rtol=1e-5)


# ---------------------------------------------------------------- bad input: a clear message, no traceback


def test_student_with_another_tokenizer_is_refused(world, tmp_path):
    expect_error("train-student", "--cache", world.cache, "--model", world.other_student, "--output", tmp_path / "r",
                 match="another tokenizer")
    assert not (tmp_path / "r").exists()


def test_bad_options_are_refused(world, tmp_path):
    base = ("train-student", "--cache", world.cache, "--model", world.student, "--output", tmp_path / "r")
    expect_error(*base, "--loss", "kl", match="Invalid value for '--loss'")
    config = tmp_path / "c.yaml"
    config.write_text("loss: kll\n")
    expect_error(*base, "--config", config, match="must be one of fkl")
    expect_error(*base, "--alpha", "1.5", match="options: alpha must be in [0, 1]; got 1.5")
    expect_error(*base, "--alpha", "-0.1", match="options: alpha must be in [0, 1]; got -0.1")
    expect_error(*base, "--temperature", "0", match="options: temperature must be > 0; got 0.0")
    expect_error(*base, "--temperature", "-2", match="options: temperature must be > 0; got -2.0")
    expect_error(*base, "--lora-target-modules", "q_proj,qkv_fused",
                 match=f"--lora-target-modules: {world.student} has no module named qkv_fused; its weight matrices: "
                       "down_proj, embed_tokens, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj")
    expect_error(*base, "--full", "--merge", match="merge needs lora")
    expect_error(*base, "--resume", match="holds no checkpoint")
    expect_error("train-student", "--model", world.student, match="no cache given")
    assert not (tmp_path / "r").exists(), "a refused run leaves no run folder behind"


def test_cache_longer_than_the_students_context(world, tmp_path):
    from kdpipe import tiny

    short = tmp_path / "short"
    tiny.init_model(short, world.tokenizer, max_position_embeddings=16, seed=1, **student_kwargs())
    longest = max(len(e.input_ids) for e in open_cache(world.cache).iter_examples())
    expect_error("train-student", "--cache", world.cache, "--model", short, "--output", tmp_path / "r",
                 match=f"cache {world.cache} holds examples of up to {longest} tokens, longer than the student {short}'s "
                       "context (16 tokens); cache the data again with --max-length 16 or pick a student with a longer context")
    assert not (tmp_path / "r").exists()


def _copy_cache(world, tmp_path):
    folder = tmp_path / "cache"
    shutil.copytree(world.cache, folder)
    return folder, json.loads((folder / "manifest.json").read_text())


def test_broken_caches_are_refused(world, tmp_path):
    def train(folder):
        return ("train-student", "--cache", folder, "--model", world.student, "--output", tmp_path / "r")

    damaged, _ = _copy_cache(world, tmp_path / "a")
    shard = damaged / "shard-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    expect_error(*train(damaged), match="failed verification")

    newer, manifest = _copy_cache(world, tmp_path / "b")
    (newer / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    expect_error(*train(newer), match="newer than this kdpipe understands")

    empty, manifest = _copy_cache(world, tmp_path / "c")
    for f in empty.glob("shard-*.parquet"):
        f.unlink()
    manifest.update(shards=[], complete=True)
    manifest["sharding"]["total_shards"] = 0
    (empty / "manifest.json").write_text(json.dumps(manifest))
    expect_error(*train(empty), match="holds no examples")
    expect_error(*train(tmp_path / "nothing"), match="not a kdpipe cache")
    assert not (tmp_path / "r").exists()


def test_output_folder_of_another_run_is_refused(world, lora_run):
    before = sorted(p.name for p in lora_run.iterdir())
    expect_error("train-student", "--cache", world.cache, "--model", world.student, "--output", lora_run,
                 match="already holds a `kdpipe train-student` run")
    expect_error("finetune", "--model", world.student, "--dataset", "kdpipe:arithmetic", "--output", lora_run, "--resume",
                 match="not a `kdpipe finetune` run")
    assert sorted(p.name for p in lora_run.iterdir()) == before
    expect_error("merge-lora", world.student, "--output", lora_run / "x", match="not a LoRA adapter folder")
    expect_error("merge-lora", lora_run / "adapter", "--output", lora_run, match="is not empty")


def test_merge_lora_is_atomic_replaces_a_torn_folder_and_honours_the_umask(world, lora_run, tmp_path, monkeypatch):
    """Issue 29 items 8 and 11: merge-lora wrote straight into --output (a kill or a full disk left config files
    without weights, and the rerun said only "not empty"); weights came out 0600 while other outputs honour the
    umask; a read-only output failed with a traceback after the model loaded."""
    import os
    import stat

    from transformers import PreTrainedModel

    out = tmp_path / "merged"
    real_save = PreTrainedModel.save_pretrained

    def full_disk(self, folder, *a, **k):
        real_save(self, folder, *a, **k)  # config and weights written, then the disk fills
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_disk)
    expect_error("merge-lora", lora_run / "adapter", "--output", out,
                 match=f"could not write the merged model to {out} (PytorchStreamWriter failed")
    assert not out.exists() and not any(p.name.startswith(".merged") for p in tmp_path.iterdir())
    monkeypatch.undo()
    # a folder torn by an older, non-atomic merge: the model config, no weights
    out.mkdir()
    (out / "config.json").write_text((world.student / "config.json").read_text())
    result = run_cli("merge-lora", lora_run / "adapter", "--output", out)
    assert "held a torn merge" in result.output
    umask = os.umask(0o022)
    os.umask(umask)  # read, and put back
    mode = 0o666 & ~umask
    for f in out.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == mode, (f.name, oct(f.stat().st_mode))
    assert any(f.suffix == ".safetensors" for f in out.iterdir())
    # the trained run's own weights too
    assert stat.S_IMODE((lora_run / "model.safetensors").stat().st_mode) == mode
    # an output that cannot be written: said before the base model loads
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    try:
        if os.access(tmp_path / "ro", os.W_OK):  # root ignores the mode bits: a file in the path instead
            (tmp_path / "ro" / "file").write_text("x")
            target, says = tmp_path / "ro" / "file" / "m", "runs through the file"
        else:
            target, says = tmp_path / "ro" / "m", "cannot be written"
        expect_error("merge-lora", lora_run / "adapter", "--output", target, match=f"--output {target} {says}")
    finally:
        (tmp_path / "ro").chmod(0o755)
