"""fxprune: structured pruning compiler for PyTorch.

Capture with torch.export, group coupled channels with networkx, prune with
registered pruners during fine-tuning, remove the channels for real, export a
compact ONNX model and measure it with onnxruntime.
"""

from fxprune.api import Pruning, compile
from fxprune.calibrated import ActivationPruner, FlapPruner, WandaSPPruner
from fxprune.calibration import CalibrationStats
from fxprune.config import PruningConfig, parse_config, parse_pattern
from fxprune.errors import (CaptureError, CompactionError, ConfigError, ExampleInputsError, FxPruneError,
                            PruningError)
from fxprune.explain import Explanation, explain
from fxprune.exporters import (BenchmarkResult, OnnxExport, OnnxExportError, OnnxMismatchError, benchmark,
                               export_onnx)
from fxprune.plan import load_compact, load_plan, save_compact
from fxprune.pruners import (MagnitudePruner, PatternLockPruner, Pruner, SnipMomentumPruner, SnipPruner,
                             TaylorPruner, get_pruner, register_pruners)
from fxprune.report import Report
from fxprune.sweep import SweepPoint, SweepResult, sweep

__all__ = [
    "compile", "Pruning", "PruningConfig", "parse_config", "parse_pattern", "Report",
    "register_pruners", "get_pruner", "Pruner", "MagnitudePruner", "SnipPruner", "SnipMomentumPruner",
    "TaylorPruner", "PatternLockPruner", "ActivationPruner", "WandaSPPruner", "FlapPruner", "CalibrationStats",
    "explain", "Explanation", "save_compact", "load_compact", "load_plan",
    "export_onnx", "OnnxExport", "benchmark", "BenchmarkResult", "sweep", "SweepResult", "SweepPoint",
    "FxPruneError", "CaptureError", "ConfigError", "ExampleInputsError", "PruningError", "CompactionError",
    "OnnxMismatchError", "OnnxExportError",
]
__version__ = "0.1.0"
