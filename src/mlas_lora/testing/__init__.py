"""Tiny in-process models and tokenizers for tests and smoke runs (no downloads, no weights on disk)."""
