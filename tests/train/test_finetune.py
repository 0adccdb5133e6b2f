"""`kdpipe finetune`: plain SFT (cross-entropy on the trained tokens), LoRA or full, same data code as the cache."""

from __future__ import annotations

import json

import numpy as np
import torch
from helpers import run_cli

from kdpipe.data.sources import DataConfig, load_examples
from kdpipe.data.templates import get_template
from kdpipe.data.tokenize import tokenize_examples
from kdpipe.losses import DistillLossConfig
from kdpipe.train.data import SFTCollator

F32 = torch.float32


def load_lm(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=F32).eval()


def tokenized(world, n=6):
    cfg = DataConfig(dataset="kdpipe:arithmetic", limit=n)
    examples, _ = tokenize_examples(load_examples(cfg).examples, get_template("arithmetic"), world.tokenizer, cfg)
    return examples


def test_sft_labels_and_loss_match_a_hand_computed_cross_entropy(world):
    from kdpipe.stages.finetune import FinetuneConfig
    from kdpipe.train import setup as training
    from kdpipe.train import trainer as training_loop

    examples = tokenized(world)
    batch = SFTCollator(world.tokenizer.pad_token_id)(examples)
    # the targets: every trained position, example by example, its label the next token
    np.testing.assert_array_equal(batch["target_cols"].numpy(), np.concatenate([e.positions for e in examples]))
    np.testing.assert_array_equal(batch["labels"].numpy(), np.concatenate([e.input_ids[e.positions + 1] for e in examples]))
    cfg = FinetuneConfig(model=str(world.student), dataset="kdpipe:arithmetic", lora=False, output=str(world.root / "u"))
    model = training.load_trainable(cfg).eval()
    trainer = training_loop.make_trainer(DistillLossConfig(alpha=0.0), model=model,
                                         args=training.training_arguments(cfg, world.root / "u"))
    got = trainer.compute_loss(model, batch)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
        rows = torch.cat([torch.full((len(e.positions),), i) for i, e in enumerate(examples)])
        cols = torch.from_numpy(np.concatenate([e.positions for e in examples]).astype(np.int64))
        want = torch.nn.functional.cross_entropy(logits[rows, cols], batch["input_ids"][rows, cols + 1])
    assert torch.allclose(got.double(), want, atol=1e-5)


def test_finetune_full_end_to_end(world, tmp_path):
    out = tmp_path / "sft"
    config = tmp_path / "sft.yaml"
    config.write_text("dataset: kdpipe:arithmetic\nlimit: 64\nbatch_size: 2\nlr: 0.003\nmax_steps: 12\nlogging_steps: 1\n"
                      "lr_scheduler: constant\nwarmup: 0\n")
    run_cli("finetune", "--config", config, "--model", world.student, "--full", "--batch-size", 8, "--output", out)
    record = json.loads((out / "kdpipe_run.json").read_text())
    assert record["config"]["batch_size"] == 8 and record["config"]["limit"] == 64  # the CLI wins over the file
    losses = [h["loss"] for h in record["log_history"] if "loss" in h]
    assert len(losses) == 12 and np.mean(losses[-3:]) < np.mean(losses[:3])
    # SFT has no teacher: its logged parts are the cross-entropy only, never a NaN divergence
    logged = [h for h in record["log_history"] if "loss" in h]
    assert all("kd/ce" in h and "kd/divergence" not in h and "kd/tail_mass" not in h for h in logged), logged[0]
    assert all(np.isfinite(v) for h in logged for k, v in h.items() if k.startswith("kd/")), logged[0]
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(out)).get_vocab() == world.tokenizer.get_vocab()
    ids = torch.tensor([tokenized(world, 1)[0].input_ids.astype(np.int64)])
    with torch.no_grad():
        assert not torch.allclose(load_lm(out)(ids).logits, load_lm(world.student)(ids).logits, atol=1e-4)


def test_finetune_lora_merge(world, tmp_path):
    from peft import AutoPeftModelForCausalLM

    out = tmp_path / "sft-lora"
    run_cli("finetune", "--model", world.student, "--dataset", "kdpipe:arithmetic", "--limit", 32, "--lora", "--merge",
            "--max-steps", 4, "--batch-size", 8, "--lr", "1e-2", "--lora-r", 4, "--output", out)
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and set(adapter["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    ids = torch.tensor([tokenized(world, 1)[0].input_ids.astype(np.int64)])
    peft = AutoPeftModelForCausalLM.from_pretrained(str(out / "adapter"), dtype=F32).eval()
    with torch.no_grad():
        torch.testing.assert_close(load_lm(out)(ids).logits, peft(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_finetune_bad_input(world, tmp_path):
    result = run_cli("finetune", "--model", world.student, "--dataset", tmp_path / "missing.jsonl", "--output", tmp_path / "o", ok=False)
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit) and "does not exist" in result.output
    result = run_cli("finetune", "--model", world.student, "--dataset", "kdpipe:arithmetic", "--max-steps", 0, ok=False)
    assert result.exit_code != 0 and "max_steps must be positive" in result.output
    assert not (tmp_path / "o").exists()
