"""awareness stage of MLAS-LoRA."""
