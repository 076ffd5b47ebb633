"""How the speedup of a compact model changes with batch and sequence length, from one dynamic ONNX file.

Each model is compiled on a batch-1 example (BERT: batch 1, sequence 128, both dims dynamic),
pruned one-shot (L2 magnitude, local scope, 50%, round_to 8: the config of results_cnn.md and
results_transformers.md), compacted, and the dense capture and the compact graph are each
exported once to ONNX. Both files are then timed by ``fxprune.benchmark`` (interleaved) at
every requested shape; "ideal" is dense MACs / compact MACs at that shape.

    python benchmarks/bench_batch.py --out benchmarks/results_batch.md
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch
import transformers as T
from torch.export import Dim

import _measure
import fxprune
from fxprune.passes.macs import count_macs

CONFIG = {"target_sparsity": 0.5, "prune_domain": "local", "round_to": 8}


def resnet50():
    model = T.ResNetForImageClassification(T.ResNetConfig()).eval()
    x = torch.randn(1, 3, 224, 224)
    return model, (x,), None, {"excluded_names": ["classifier"]}, [(b,) for b in (1, 8, 32)], \
        lambda b: {"pixel_values": np.random.default_rng(b).standard_normal((b, 3, 224, 224), dtype=np.float32)}


def bert_base():
    model = T.BertForSequenceClassification(T.BertConfig()).eval()
    ids = torch.randint(0, 30000, (1, 128))
    dims = {"input_ids": {0: Dim("batch"), 1: Dim("seq", max=512)}}
    return model, (ids,), dims, {"excluded_names": ["classifier"]}, [(1, 128), (8, 128), (32, 128), (1, 512), (8, 512)], \
        lambda b, s: {"input_ids": np.random.default_rng(b * s).integers(0, 30000, (b, s), dtype=np.int64)}


MODELS = {"resnet50": resnet50, "bert-base": bert_base}


def run(name: str, threads, repeat: int, tmp: str) -> list[str]:
    torch.manual_seed(0)
    model, x, dims, extra, shapes, feed = MODELS[name]()
    pruning = fxprune.compile(model, x, {**CONFIG, **extra}, dynamic_shapes=dims).prune()
    small = pruning.compact()
    dense_path, small_path = os.path.join(tmp, f"{name}-dense.onnx"), os.path.join(tmp, f"{name}-compact.onnx")
    fxprune.export_onnx(pruning.captured.graph_module, dense_path, x)
    fxprune.export_onnx(small, small_path, x)
    rows = []
    for shape in shapes:
        inputs = feed(*shape)
        args = tuple(torch.from_numpy(v) for v in inputs.values())
        macs = {"dense": count_macs(pruning.captured.graph_module, args), "compact": count_macs(small, args)}
        result = fxprune.benchmark({"dense": dense_path, "compact": small_path}, threads=threads, warmup=2,
                                   repeat=repeat, inputs=inputs, macs=macs)
        for r in result.rows:
            if r.label != "compact":
                continue
            dense = next(d for d in result.rows if d.label == "dense" and d.threads == r.threads)
            rows.append(f"| {name} | {'x'.join(map(str, shape))} | {r.threads} | {dense.median_ms:.1f} | "
                        f"{r.median_ms:.1f} | {r.speedup:.2f}× | {r.ideal:.2f} | {r.efficiency:.2f} |")
            print(rows[-1], flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--out")
    args = ap.parse_args()
    start = time.time()
    lines = ["| model | shape | threads | dense ms | compact ms | speedup | ideal | speedup / ideal |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            lines += run(name, args.threads, args.repeat, tmp)
    header = [f"# Speedup by batch and sequence length, one dynamic ONNX file per model", "",
              f"Command: `python {' '.join(sys.argv)}`", "",
              f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
              f"onnxruntime {__import__('onnxruntime').__version__}; median of {args.repeat} interleaved runs after 2 "
              f"warm-up runs; {time.time() - start:.0f} s in all.", ""]
    text = "\n".join(header + lines) + "\n"
    _measure.emit(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
