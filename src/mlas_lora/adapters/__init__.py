"""adapters stage of MLAS-LoRA."""
