"""Does a dynamic ONNX file cost latency? The same compact model exported with a dynamic batch (and sequence)
and at the example's fixed shapes, timed interleaved in one ``fxprune.benchmark`` call at the example's shape.

    python benchmarks/bench_static_vs_dynamic.py --out benchmarks/results_static_vs_dynamic.md
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import torch
import transformers as T
from torch.export import Dim

import _measure
import fxprune

CONFIG = {"target_sparsity": 0.5, "prune_domain": "local", "round_to": 8, "excluded_names": ["classifier"]}


def models():
    yield ("resnet50", T.ResNetForImageClassification(T.ResNetConfig()).eval(), torch.randn(1, 3, 224, 224), None,
           {"pixel_values": np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32)})
    yield ("bert-base", T.BertForSequenceClassification(T.BertConfig()).eval(), torch.randint(0, 30000, (1, 128)),
           {"input_ids": {0: Dim("batch"), 1: Dim("seq", max=512)}},
           {"input_ids": np.random.default_rng(0).integers(0, 30000, (1, 128), dtype=np.int64)})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--out")
    args = ap.parse_args()
    lines = [f"Command: `python {' '.join(sys.argv)}`", "",
             "| model | threads | dense static ms | dense dynamic ms | compact static ms | compact dynamic ms |",
             "|---|---:|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name, model, x, dims, feed in models():
            torch.manual_seed(0)
            files = {}
            for label, spec in (("static", {}), ("dynamic", dims)):
                p = fxprune.compile(model, (x,), CONFIG, dynamic_shapes=spec).prune()
                for kind, module in (("dense", p.captured.graph_module), ("compact", p.compact())):
                    path = os.path.join(tmp, f"{name}-{kind}-{label}.onnx")
                    fxprune.export_onnx(module, path, (x,))
                    files[f"{kind} {label}"] = path
            result = fxprune.benchmark(files, threads=[1, 2], warmup=3, repeat=args.repeat, inputs=feed)
            for t in (1, 2):
                ms = {r.label: r.median_ms for r in result.rows if r.threads == t}
                lines.append(f"| {name} | {t} | {ms['dense static']:.1f} | {ms['dense dynamic']:.1f} | "
                             f"{ms['compact static']:.1f} | {ms['compact dynamic']:.1f} |")
                print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    _measure.emit(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
