"""TrainConfig and transformers.TrainingArguments: the options kdpipe mirrors are passed by the field names
they declare (`hf=`), and any other field is reachable through --training-args, checked by name."""

from __future__ import annotations

import dataclasses

import pytest
from helpers import kdpipe

from kdpipe.errors import KdpipeError


def test_every_mirrored_option_names_a_training_arguments_field_and_reaches_it(tmp_path):
    from transformers import TrainingArguments

    from kdpipe.stages.train_student import TrainStudentConfig
    from kdpipe.train import setup as training

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    mirrored = training.mirrored(TrainStudentConfig)
    assert len(mirrored) >= 15 and set(mirrored.values()) <= fields, set(mirrored.values()) - fields
    cfg = TrainStudentConfig(epochs=2.5, batch_size=3, grad_accum=5, lr=0.0123, lr_scheduler="linear", warmup=7,
                             weight_decay=0.01, max_grad_norm=0.5, seed=11, save_steps=9, save_total_limit=4,
                             logging_steps=2, run_name="r", num_workers=0)
    args = training.training_arguments(cfg, tmp_path / "out")
    for name, hf in mirrored.items():
        want = getattr(cfg, name)
        want = {"lr": cfg.learning_rate, "report_to": []}.get(name, want)
        got = getattr(args, hf)
        assert (got.value if hasattr(got, "value") else got) == want, (name, hf, got, want)
    assert args.data_seed == 11 and args.output_dir == str(tmp_path / "out")


def test_training_args_reach_training_arguments_as_typed_values(tmp_path):
    from kdpipe.stages.finetune import FinetuneConfig
    from kdpipe.train import setup as training

    cfg = FinetuneConfig(training_args={"adam_beta2": "0.95", "optim": "adafactor", "adam_epsilon": "1e-6",
                                        "eval_accumulation_steps": "3", "tf32": "false"})
    args = training.training_arguments(cfg, tmp_path)
    assert args.adam_beta2 == 0.95 and args.optim.value == "adafactor" and args.adam_epsilon == 1e-6
    assert args.eval_accumulation_steps == 3 and args.tf32 is False


@pytest.mark.parametrize(("pair", "words"), [
    ("learning_rate=0.1", ["--training-args learning_rate", "set it with --lr", "'lr:' in a config file"]),
    ("per_device_train_batch_size=4", ["set it with --batch-size"]),
    ("output_dir=elsewhere", ["kdpipe sets output_dir itself"]),
    ("adam_epsilom=0.9", ["TrainingArguments has no field 'adam_epsilom'", "did you mean 'adam_epsilon'"]),
    ("adam_beta1=high", ["--training-args adam_beta1: 'high' is not a number"]),
    ("adam_beta2=nan", ["--training-args adam_beta2: must be a finite number, not 'nan'"]),
    ("max_grad_norm=.inf", ["--training-args max_grad_norm: set it with --max-grad-norm"]),
    ("eval_delay=.inf", ["--training-args eval_delay: must be a finite number, not '.inf'"]),
    ("optim=no_such_optimizer", ["invalid training options", "no_such_optimizer"]),
])
def test_a_wrong_training_arg_is_named_before_the_model_loads(world, tmp_path, pair, words, monkeypatch):
    from kdpipe.stages import finetune
    from kdpipe.train import setup as training

    key, _, value = pair.partition("=")
    monkeypatch.setattr(training, "load_trainable", lambda cfg: pytest.fail("the model was loaded"))
    cfg = finetune.FinetuneConfig(model=str(world.student), dataset="kdpipe:arithmetic", limit=8,
                                  output=str(tmp_path / "run"), training_args={key: value})
    with pytest.raises(KdpipeError) as e:
        finetune.run(cfg)
    for word in words:
        assert word in str(e.value)
    assert not (tmp_path / "run").exists()


def test_the_cli_takes_training_args_and_leaves_no_folder_for_a_wrong_one(world, tmp_path):
    out = tmp_path / "run"
    result = kdpipe("finetune", "--model", world.student, "--dataset", "kdpipe:arithmetic", "--limit", 8,
                    "--max-steps", 1, "--output", out, "--training-args", "adam_epsilon=1e-6,adam_beta2=high",
                    ok=False)
    assert result.exit_code != 0 and "adam_beta2: 'high' is not a number" in result.output, result.output
    assert not out.exists()
    kdpipe("finetune", "--model", world.student, "--dataset", "kdpipe:arithmetic", "--limit", 8, "--max-steps", 1,
           "--output", out, "--training-args", "adam_epsilon=1e-6,adam_beta2=0.9")
    import json

    record = json.loads((out / "kdpipe_run.json").read_text())
    assert record["config"]["training_args"] == {"adam_epsilon": "1e-6", "adam_beta2": "0.9"}
