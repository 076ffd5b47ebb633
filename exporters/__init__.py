"""Exporters: compact ONNX export and onnxruntime latency benchmarks."""

from .onnx_export import OnnxExport, OnnxExportError, OnnxMismatchError, export_onnx
from .ort_benchmark import BenchmarkResult, benchmark

__all__ = ["export_onnx", "OnnxExport", "OnnxExportError", "OnnxMismatchError", "benchmark", "BenchmarkResult"]
