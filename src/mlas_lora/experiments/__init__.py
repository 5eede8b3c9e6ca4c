"""experiments stage of MLAS-LoRA."""
