"""training stage of MLAS-LoRA."""
