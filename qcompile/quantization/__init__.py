"""Quantization state and numerics: specs and node annotations, fake quantizers, recipes, cost models."""
