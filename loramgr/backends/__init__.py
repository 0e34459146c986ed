"""Interchangeable runtimes for an exported base: ONNX Runtime, TensorRT, torch (reference)."""
