"""Quantization-aware training on top of the passes: device-resident data, the QAT schedule, a DDP-ready
trainer, lowering of the trained model to the integer IR, and the width × recipe Pareto sweep."""
