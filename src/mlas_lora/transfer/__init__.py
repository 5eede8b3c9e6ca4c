"""transfer stage of MLAS-LoRA."""
