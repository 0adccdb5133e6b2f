"""`kdpipe generate --backend vllm`: completions from `vllm.LLM`, each request with its own seed.

The prompts go in as token ids (`TokensPrompt`), tokenized by kdpipe as for the HF backend, and the
completions come back as token ids that kdpipe decodes, so both backends write the same kind of row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kdpipe.errors import KdpipeError, first_line
from kdpipe.generation.hf import Job, row_seed


class VllmGenerator:
    """A `vllm.LLM` that completes prompts (see the module docstring)."""

    backend = "vllm"

    def __init__(self, llm: Any, temperature: float, top_p: float, max_new_tokens: int, seed: int,
                 eos: list[int]):
        self.llm, self.eos = llm, eos
        self.temperature, self.top_p = temperature, top_p
        self.max_new_tokens, self.seed = max_new_tokens, seed

    @classmethod
    def load(cls, name: str, tokenizer: Any, dtype: str, device: str, revision: str | None,
             max_model_len: int | None, gpu_memory_utilization: float, **sampling: Any) -> VllmGenerator:
        import torch

        from kdpipe.teacher.vllm import VLLM_DTYPES, prepare_engine

        vllm, resolved, cpu = prepare_engine(name, revision, device, 1)
        kwargs: dict[str, Any] = dict(model=resolved, revision=revision, dtype=VLLM_DTYPES[dtype],
                                      seed=sampling["seed"], gpu_memory_utilization=gpu_memory_utilization,
                                      disable_log_stats=True)
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        if cpu:
            kwargs["enforce_eager"] = True  # skip torch.compile: minutes of start-up
        # vLLM's CPU worker replaces set_num_threads
        threading = (torch.set_num_threads, torch.get_num_threads())
        try:
            llm = vllm.LLM(**kwargs)
        except Exception as e:  # vLLM raises many types
            raise KdpipeError(f"vLLM could not start the model {name}: {first_line(e, 400)}") from None
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        generator = cls(llm, eos=eos, **sampling)
        generator._threading = threading
        return generator

    def info(self) -> dict[str, Any]:
        import vllm

        config = self.llm.llm_engine.model_config
        return {"backend": "vllm", "backend_version": vllm.__version__,
                "dtype": str(config.dtype).removeprefix("torch.")}

    def generate(self, jobs: Sequence[Job]) -> list[tuple[list[int], str]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt


        prompts = [TokensPrompt(prompt_token_ids=list(j.prompt_ids)) for j in jobs]
        params = [SamplingParams(temperature=self.temperature, top_p=self.top_p,
                                 max_tokens=self.max_new_tokens,
                                 seed=row_seed(self.seed, j.example_id, j.sample), detokenize=False,
                                 stop_token_ids=self.eos or None) for j in jobs]
        try:
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
        except Exception as e:
            raise KdpipeError(f"vLLM failed on a batch starting with example '{jobs[0].example_id}': "
                              f"{first_line(e, 400)} (see --max-length and --max-new-tokens)") from None
        results = []
        for o in outputs:
            completion = o.outputs[0]
            tokens = list(completion.token_ids)
            if tokens and tokens[-1] in self.eos:
                tokens = tokens[:-1]
            results.append((tokens, "length" if completion.finish_reason == "length" else "eos"))
        return results

    def close(self) -> None:
        from kdpipe.teacher.vllm import close_engine

        close_engine(self)
