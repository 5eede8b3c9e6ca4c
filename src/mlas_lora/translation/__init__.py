"""translation stage of MLAS-LoRA."""
