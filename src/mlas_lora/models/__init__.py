"""models stage of MLAS-LoRA."""
