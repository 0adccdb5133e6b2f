"""What `auto` means for a dtype or mixed precision: one rule for the teacher (HF and vLLM) and the student.

fp16 on CUDA devices of compute capability < 8 (T4, V100: no native bf16; torch's
``is_bf16_supported()`` says True there because it counts emulation), bf16 from 8 (A100, L4, 4090,
H100), fp32 on CPU. `kdpipe plan` applies the same rule to a GPU from its table, without torch.
"""

from __future__ import annotations


def auto_precision(capability: tuple[int, int] | None) -> str:
    """fp32 without a GPU (None), fp16 below compute capability 8, bf16 from 8."""
    if capability is None:
        return "fp32"
    return "bf16" if tuple(capability) >= (8, 0) else "fp16"


def device_capability(device: str = "auto") -> tuple[int, int] | None:
    """The CUDA compute capability of `device` ("auto": the current CUDA device if any), None on CPU."""
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        return None
    index = None if device in ("auto", "cuda") else torch.device(device).index
    return tuple(torch.cuda.get_device_capability(index))  # type: ignore[return-value]


def resolve_dtype(dtype: str, device: str = "auto") -> str:
    """`dtype` as given, or for "auto" the rule above on `device`: bf16, fp16 or fp32."""
    return auto_precision(device_capability(device)) if dtype == "auto" else dtype
