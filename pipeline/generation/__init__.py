"""Sampling completions from a model (`kdpipe generate`, on-policy rounds): `hf` and `vllm`."""
