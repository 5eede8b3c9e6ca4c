"""evaluation stage of MLAS-LoRA."""
