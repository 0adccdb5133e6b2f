"""Training on several processes: `torchrun --nproc-per-node 2` (DDP, gloo on CPU) against one process with the
same global batch, and each process reading its own row groups of the cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import run_cli

from kdpipe.train.data import BlockShuffleSampler


def logged_losses(run: Path) -> list[float]:
    history = json.loads((run / "kdpipe_run.json").read_text())["log_history"]
    return [h["loss"] for h in history if "loss" in h]


def rank_batches(sampler: BlockShuffleSampler, batch: int, rank: int, processes: int) -> list[list[int]]:
    """The batches accelerate hands process `rank` (its BatchSamplerShard over our sampler, as Trainer builds it)."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    shard = BatchSamplerShard(BatchSampler(sampler, batch, drop_last=False), processes, rank, split_batches=False)
    return list(shard)


def test_each_process_reads_its_own_row_groups():
    sizes = [256] * 8 + [100]  # row groups of a cache: 8 full ones and a short last one
    sampler = BlockShuffleSampler(sizes, seed=5, window=2, lanes=2, stripe=8)
    order = sampler.order()
    assert sorted(order.tolist()) == list(range(sum(sizes)))  # still every row once per epoch
    groups = [set(sampler.block_of(np.concatenate(rank_batches(sampler, 8, r, 2)[:60])).tolist()) for r in (0, 1)]
    assert groups[0] and groups[1] and not groups[0] & groups[1]  # 60 steps: disjoint row groups per process
    blocks = np.random.default_rng([5, 0]).permutation(len(sizes))
    assert groups[0] <= set(blocks[0::2].tolist()) and groups[1] <= set(blocks[1::2].tolist())
    # one process with the same global batch (16) and lanes=2 sees the union of the two processes' batches, step by step
    single = [sorted(b) for b in rank_batches(sampler, 16, 0, 1)]
    joint = [sorted(a + b) for a, b in zip(rank_batches(sampler, 8, 0, 2), rank_batches(sampler, 8, 1, 2))]
    assert single[: len(joint) - 1] == joint[:-1]
    # one lane is the plain block shuffle of a one-process run
    assert np.array_equal(BlockShuffleSampler(sizes, 5, 2).order(), BlockShuffleSampler(sizes, 5, 2, lanes=1, stripe=8).order())


def test_two_process_ddp_matches_one_process(world, tmp_path):
    """`torchrun --nproc-per-node 2` (gloo) with 4 rows per process = one process with 8 rows and --data-lanes 2,
    both with packed batches."""
    common = ["--cache", world.cache, "--model", world.student, "--full", "--max-steps", 4, "--lr", "5e-3",
              "--logging-steps", 1, "--seed", 0, "--shuffle-window", 1, "--warmup", 0, "--lr-scheduler", "constant",
              "--save-steps", 100, "--batching", "packed", "--pack-length", 64]  # 2-3 examples per packed row
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KDPIPE_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "kdpipe.cli", "train-student", *map(str, common), "--batch-size", "4", "--output", str(tmp_path / "ddp")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run_cli("train-student", *common, "--batch-size", 8, "--data-lanes", 2, "--output", tmp_path / "one")

    ddp, one = logged_losses(tmp_path / "ddp"), logged_losses(tmp_path / "one")
    assert len(ddp) == len(one) == 4
    assert one[-1] < one[0]  # it trains
    # Same rows per step, same weights: only float summation order differs (gradient all-reduce of two partial
    # sums vs one sum, padding to 4-row vs 8-row maxima), fp32 rounding of ~1e-7 per step (measured: 2e-7 over
    # 8 steps); processes training apart on the whole data (the bug this caught) were off by 3e-4 at step 1, 2e-2 by 4.
    np.testing.assert_allclose(ddp, one, rtol=1e-5)
    record = json.loads((tmp_path / "ddp" / "kdpipe_run.json").read_text())
    assert record["status"] == "complete" and record["global_step"] == 4


@pytest.mark.parametrize("lanes, message", [(3, "--data-lanes 3 does not divide the 8 rows of a micro-batch")])
def test_lanes_must_divide_the_micro_batch(world, tmp_path, lanes, message):
    result = run_cli("train-student", "--cache", world.cache, "--model", world.student, "--batch-size", 8,
                     "--data-lanes", lanes, "--max-steps", 1, "--output", tmp_path / "x", ok=False)
    assert result.exit_code != 0 and message in result.output


FSDP_SCRIPT = '''
import sys, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM
from kdpipe.train import trainer as training
from kdpipe.cache import open_cache
from kdpipe.losses import DistillLossConfig
from kdpipe.train.data import CacheDataset, DistillCollator

dist.init_process_group("gloo")
student, cache = sys.argv[1], sys.argv[2]
rows = CacheDataset(open_cache(cache))
batch = DistillCollator(0, 10_000, 8)([rows[i] for i in range(6)])
cfg = DistillLossConfig("fkl", 0.5, 2.0, 0.1, 0.5, "bucket", 16)
reference = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
ref_loss = training.student_distill_loss(reference, batch, cfg)
ref_loss.backward()
for root_reshards in (False, True):  # FSDP2's default for the root, and accelerate's (root resharded after forward)
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model, reshard_after_forward=root_reshards)
    assert type(model.get_output_embeddings().weight).__name__ == "DTensor"  # the head is sharded between the 2 ranks
    loss = training.student_distill_loss(model, batch, cfg)
    loss.backward()
    assert type(model.get_output_embeddings().weight).__name__ == "DTensor"  # resharded after backward
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        ref = dict(reference.named_parameters())[name].grad
        torch.testing.assert_close(p.grad.full_tensor(), ref, rtol=1e-4, atol=1e-6, msg=lambda m: name + ": " + m)
print("fsdp ok", float(loss))
dist.destroy_process_group()
'''


def test_loss_under_fsdp2_on_cpu(world, tmp_path):
    """FSDP2 (`fully_shard`, gloo): the LM head is a sharded DTensor outside forward; the loss gathers the root's
    parameters when the root resharded them, and gives the unsharded model's loss and every gradient."""
    script = tmp_path / "fsdp_check.py"
    script.write_text(FSDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           str(world.student), str(world.cache)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("fsdp ok") == 2
