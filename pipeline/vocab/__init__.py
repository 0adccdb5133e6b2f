"""A student with another vocabulary: token-string maps, routes, cross-tokenizer alignment, ULD."""
