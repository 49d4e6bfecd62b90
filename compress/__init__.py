"""Compression: distillation, structural pruning, quantization-aware training, reparameterization."""
