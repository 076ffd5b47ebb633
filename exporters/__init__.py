"""Exporters: compact ONNX export and onnxruntime latency benchmarks."""
