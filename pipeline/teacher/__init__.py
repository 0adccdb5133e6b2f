"""The teacher's forward pass for stage one: `hf` (transformers) and `vllm` backends."""
