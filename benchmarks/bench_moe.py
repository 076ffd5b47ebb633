#!/usr/bin/env python
"""Mixture-of-experts models at the default config: onnxruntime latency of dense and compact files.

Hugging Face ``MixtralForCausalLM`` and ``GptOssForCausalLM`` built from small configs with random
weights (nothing is downloaded). Each is compiled with ``{"target_sparsity": 0.5}`` (heads and the
experts' intermediate channels; the hidden size stays, as by default) and, as a second row, with
``"prune_hidden_size": True`` added; pruned in one shot, compacted (checked against the masked
model), exported to ONNX (checked against torch), and the dense and compact files timed interleaved
in one ``fxprune.benchmark`` call per model at 1 and 2 threads. The experts run through the
grouped matmul transformers uses when capturing, which the ONNX file writes as one MatMul per
expert on that expert's rows.

Usage::

    python benchmarks/bench_moe.py --repeat 30 --out benchmarks/results_moe.md
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _measure import command_line, emit, machine  # noqa: E402

SHAPE = dict(vocab_size=1000, hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
             intermediate_size=1024, use_cache=False, num_experts_per_tok=2)


def build(name: str):
    import transformers as T

    if name == "mixtral":
        return T.MixtralForCausalLM(T.MixtralConfig(**SHAPE, num_local_experts=8))
    return T.GptOssForCausalLM(T.GptOssConfig(**SHAPE, num_local_experts=8, head_dim=64))


def peer_in_subprocess(name: str, tokens: int, limit_s: int) -> str:
    """``peer`` in a process of its own, stopped after ``limit_s`` (its dependency graph may not finish)."""
    import subprocess

    try:
        done = subprocess.run([sys.executable, __file__, "--_peer", name, "--tokens", str(tokens)], timeout=limit_s,
                              capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return f"no result within {limit_s} s (stopped)"
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("peer: ")]
    return lines[-1][len("peer: "):] if lines else f"exited {done.returncode}: {done.stderr.strip()[-160:]}"


def peer(name: str, ids) -> str:
    """Torch-Pruning at the same request (50% of channels, LM head left out, heads declared): what it gives."""
    try:
        import torch_pruning as tp
    except ImportError:
        return "not installed"
    import torch

    torch.manual_seed(0)
    model = build(name).eval()
    heads = {m.q_proj: model.config.num_attention_heads for m in model.modules() if hasattr(m, "q_proj")}
    try:
        pruner = tp.pruner.MagnitudePruner(model, ids, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                           pruning_ratio=0.5, ignored_layers=[model.lm_head], num_heads=heads)
        pruner.step()
        with torch.no_grad():
            model(ids)
    except Exception as err:  # the peer's failure is the result
        return f"fails: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
    return "prunes (not timed here)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mixtral", "gpt-oss"], choices=["mixtral", "gpt-oss"])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--out")
    ap.add_argument("--peer-limit", type=int, default=180, help="seconds the peer may take per model")
    ap.add_argument("--_peer", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._peer:
        import torch

        print("peer: " + peer(args._peer, torch.randint(3, 1000, (1, args.tokens),
                                                        generator=torch.Generator().manual_seed(0))))
        return 0

    import onnx
    import torch

    import fxprune

    start = time.time()
    lines = ["| model | config | ideal (MACs) | " + " | ".join(f"speedup @{t}t" for t in args.threads) + " | dense ms @1t |",
             "|---|---|---:|" + "---:|" * len(args.threads) + "---:|"]
    configs = {"default": {"target_sparsity": 0.5}, "+ hidden size": {"target_sparsity": 0.5, "prune_hidden_size": True}}
    peers = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            torch.manual_seed(0)
            model = build(name).eval()
            ids = (torch.randint(3, 1000, (1, args.tokens), generator=torch.Generator().manual_seed(0)),)
            files = {}
            ideal = {}
            for label, config in configs.items():
                pruning = fxprune.compile(model, ids, config, progress=False)
                pruning.prune()
                small = pruning.compact()
                ideal[label] = pruning.report().macs_ratio
                if not files:
                    files["dense"] = os.path.join(tmp, f"{name}-dense.onnx")
                    fxprune.export_onnx(pruning.captured.graph_module, files["dense"], ids, progress=False)
                files[label] = os.path.join(tmp, f"{name}-{label.replace(' ', '')}.onnx")
                fxprune.export_onnx(small, files[label], ids, progress=False)
            name_in = onnx.load(files["dense"], load_external_data=False).graph.input[0].name
            bench = fxprune.benchmark(files, threads=args.threads, repeat=args.repeat, baseline="dense",
                                      inputs={name_in: ids[0].numpy()})
            peers[name] = peer_in_subprocess(name, args.tokens, args.peer_limit)
            for label in configs:
                cells = [f"{next(r.speedup for r in bench.rows if r.label == label and r.threads == t):.2f}×"
                         for t in args.threads]
                dense_ms = next(r.median_ms for r in bench.rows if r.label == "dense" and r.threads == 1)
                lines.append(f"| {name} | {label} | {ideal[label]:.2f} | " + " | ".join(cells) + f" | {dense_ms:.2f} |")
    info = ", ".join(f"{k} = {v}" for k, v in machine().items())
    text = "\n".join([
        "# Mixture-of-experts models at the default config", "",
        f"`{command_line(__file__)}`, {time.time() - start:.0f} s; {info}", "",
        f"Input: token ids (1, {args.tokens}); {args.repeat} interleaved runs per file, median; speedup over the "
        "dense file of the same model; ideal = dense MACs / compact MACs (the experts' MACs counted on the rows "
        "routed to them).", "", *lines, "",
        "Torch-Pruning 1.6.1 at the same request (`MagnitudePruner`, `pruning_ratio=0.5`, the LM head ignored, "
        "`num_heads` given): " + "; ".join(f"{n}: {r}" for n, r in peers.items()) + ".", ""])
    emit(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
