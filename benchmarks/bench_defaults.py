"""What the default config gives: HF ResNet-50 compact-model latency vs ideal under config variants.

    python benchmarks/bench_defaults.py [--out benchmarks/results_defaults.md] [--repeat 30]

Every variant prunes 50% of channels with L2 magnitude in one shot; the model is built from
``ResNetConfig()`` with random weights (nothing downloaded). Each compact model and the dense
capture are exported to ONNX once and timed interleaved (``fxprune.benchmark``) at 1 and 2
threads, batch 1 and 8. ideal = dense MACs / compact MACs; efficiency = speedup / ideal.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from datetime import datetime, timezone

import numpy as np
import torch
import transformers

import _measure
import fxprune

VARIANTS = {
    "default": {},
    "global, round_to=1": {"pruning_scope": "global", "round_to": 1},
    "global, round_to=8": {"pruning_scope": "global", "round_to": 8},
    "global, round_to=16": {"pruning_scope": "global", "round_to": 16},
    "local, round_to=1": {"pruning_scope": "local", "round_to": 1},
    "local, round_to=8": {"pruning_scope": "local", "round_to": 8},
    "local, round_to=auto": {"pruning_scope": "local"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args()
    torch.manual_seed(0)
    model = transformers.ResNetForImageClassification(transformers.ResNetConfig()).eval()
    x = torch.randn(1, 3, 224, 224)
    tmp = tempfile.mkdtemp()
    files, macs, notes = {}, {}, []
    dense_done = False
    for name in args.variants:
        cfg = {"target_sparsity": 0.5, **VARIANTS[name]}
        t0 = time.perf_counter()
        p = fxprune.compile(model, (x,), cfg)
        if not dense_done:
            files["dense"] = fxprune.export_onnx(p.captured.graph_module, os.path.join(tmp, "dense.onnx"), (x,)).path
            dense_done = True
        small = p.prune().compact()
        r = p.report()
        macs.setdefault("dense", r.macs_before)
        macs[name] = r.macs_after
        files[name] = fxprune.export_onnx(small, os.path.join(tmp, f"{len(files)}.onnx"), (x,)).path
        widths = sorted({int(m) for g in p.groups for m in [len(p.kept_channels[g.index])]})
        aligned8 = np.mean([len(p.kept_channels[g.index]) % 8 == 0 for g in p.groups])
        notes.append(f"- `{name}` = `{cfg}`: channel sparsity {p.sparsity:.3f}, MACs x{r.macs_after / r.macs_before:.3f}, "
                     f"{aligned8:.0%} of groups keep a multiple of 8 channels, kept widths {widths[:12]}"
                     f"{'…' if len(widths) > 12 else ''} ({time.perf_counter() - t0:.0f} s)")
    lines = [f"# Default config on HF ResNet-50 ({datetime.now(timezone.utc):%Y-%m-%d}, {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} CPUs, onnxruntime CPU)", "",
             f"Command: `python benchmarks/bench_defaults.py --repeat {args.repeat}`", ""] + notes
    for batch in (1, 8):
        feed = {"x": np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)}
        import onnxruntime
        name0 = onnxruntime.InferenceSession(files["dense"], providers=["CPUExecutionProvider"]).get_inputs()[0].name
        res = fxprune.benchmark(files, threads=(1, 2), repeat=args.repeat, warmup=3, inputs={name0: feed["x"]},
                                macs=macs, baseline="dense")
        lines += ["", f"## batch {batch}", "", res.to_markdown()]
    text = "\n".join(lines) + "\n"
    _measure.emit(text, args.out)


if __name__ == "__main__":
    main()
