"""What `auto` means for the teacher's dtype (HF and vLLM alike) and the student's mixed precision.

fp16 on CUDA devices of compute capability < 8 (a T4 is (7, 5)), bf16 from 8, fp32 on CPU. The GPU
is simulated by patching torch's device queries; the real run is on CPU.
"""

from __future__ import annotations

import pytest
import torch
from helpers import kdpipe

from kdpipe.errors import KdpipeError
from kdpipe.precision import auto_precision, resolve_dtype
from kdpipe.train.setup import resolve_precision

CASES = [((7, 5), "fp16"), ((7, 0), "fp16"), ((8, 0), "bf16"), ((8, 9), "bf16"), ((9, 0), "bf16"),
         (None, "fp32")]


def gpu(monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int] | None) -> None:
    """Make torch report a CUDA device of this compute capability (None: no GPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: capability is not None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what torch says on a T4


@pytest.mark.parametrize("capability,expected", CASES)
def test_auto_rule(monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int] | None,
                   expected: str) -> None:
    gpu(monkeypatch, capability)
    assert auto_precision(capability) == expected
    assert resolve_dtype("auto") == expected
    assert resolve_precision("auto") == expected  # the student's mixed precision
    assert resolve_dtype("auto", "cpu") == "fp32"  # an explicit CPU device, whatever GPU there is
    for explicit in ("fp32", "bf16", "fp16"):
        assert resolve_dtype(explicit) == resolve_precision(explicit) == explicit


@pytest.mark.parametrize("backend", ["hf", "vllm"])
@pytest.mark.parametrize("capability,expected", [((7, 5), "fp16"), ((8, 0), "bf16"), (None, "fp32")])
def test_cache_teacher_gives_both_backends_the_same_dtype(monkeypatch, tiny_model_dir, workdir, backend: str,
                                                          capability, expected: str) -> None:
    """`--dtype auto` reaches the HF loader and the vLLM engine as the same concrete dtype."""
    from kdpipe import models
    from kdpipe.teacher.vllm import VllmTeacher

    seen = []

    def spy(model, *args, **kwargs):
        # VllmTeacher.load(model, k, dtype, ...) / load_model(model, dtype, ...)
        seen.append(args[1] if backend == "vllm" else args[0])
        raise KdpipeError("stopped by the test after loading")

    monkeypatch.setattr(models, "load_model", spy)  # imported by the recipe when it loads
    monkeypatch.setattr(VllmTeacher, "load", classmethod(lambda cls, model, *a, **k: spy(model, *a, **k)))
    gpu(monkeypatch, capability)
    result = kdpipe("cache-teacher", "--model", tiny_model_dir, "--dataset", "kdpipe:arithmetic",
                    "--limit", "4",
                    "--backend", backend, "--dtype", "auto", ok=False)
    assert "stopped by the test" in result.output
    assert seen == [expected]


def test_auto_on_cpu_runs_a_bf16_checkpoint_in_fp32(tiny_model_dir, workdir) -> None:
    """A real run: a checkpoint saved in bf16, `--dtype auto` on CPU -> the teacher ran (recorded) in fp32."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    bf16 = workdir / "teacher-bf16"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(bf16)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(bf16)
    assert json.loads((bf16 / "config.json").read_text())["dtype"] == "bfloat16"
    kdpipe("cache-teacher", "--model", bf16, "--dataset", "kdpipe:arithmetic", "--limit", "4",
           "--dtype", "auto",
           "--device", "cpu", "--cache", workdir / "cache")
    manifest = json.loads((workdir / "cache" / "manifest.json").read_text())
    assert manifest["teacher"]["dtype"] == "float32"
