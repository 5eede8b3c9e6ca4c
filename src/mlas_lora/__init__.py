"""MLAS-LoRA: language-aware parameter detection and LoRA-based knowledge transfer for multilingual MT."""

__version__ = "0.1.0"
