"""Parallel data: the example record, file readers and the embedded corpus."""
