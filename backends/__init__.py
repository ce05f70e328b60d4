"""Backends turn the integer IR into artifacts (ONNX, TVM) and run them; each is checked against the reference.

Heavy backends are optional extras and are imported lazily by the CLI.
"""
