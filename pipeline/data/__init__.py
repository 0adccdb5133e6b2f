"""Data: sources (hub names, local files, generated files), templates, tokenizing with a loss mask."""
