"""npft-lightning: Noise Perturbation Fine-Tuning (NPFT) for quantization-robust LLMs, on Lightning."""

__version__ = "0.1.0"
