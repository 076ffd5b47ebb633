"""Command line: ``fxprune demo`` runs the embedded default job."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fxprune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="digits CNN: train, prune during fine-tune, compact, ONNX, latency")
    demo.add_argument("--sparsity", type=float, default=0.5, help="fraction of channels to remove (default 0.5)")
    demo.add_argument("--pruner", default="snip_momentum", help="registered pruner (default snip_momentum)")
    demo.add_argument("--steps", type=int, default=300, help="dense training steps")
    demo.add_argument("--finetune-steps", type=int, default=300, help="fine-tuning steps while pruning")
    demo.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="onnxruntime intra-op threads")
    demo.add_argument("--batch", type=int, default=64, help="batch size of the exported models")
    demo.add_argument("--repeat", type=int, default=30, help="timed runs per model and thread count")
    demo.add_argument("--round-to", type=int, default=8, help="kept channels are multiples of this")
    demo.add_argument("--out", default=None, help="folder for the ONNX files (default: a temp folder)")
    exp = sub.add_parser("explain", help="show a model's channel groups and why other channels are frozen")
    exp.add_argument("factory", help="module:callable returning the model, e.g. mypkg.models:build")
    exp.add_argument("--input", default="1x3x224x224", help="example input shape, e.g. 1x3x224x224 (float)")
    args = parser.parse_args(argv)
    if args.command == "explain":
        import importlib

        import torch

        from fxprune.explain import explain

        module, _, attr = args.factory.partition(":")
        model = getattr(importlib.import_module(module), attr)()
        shape = tuple(int(s) for s in args.input.lower().split("x"))
        print(explain(model.eval(), (torch.randn(shape),)))
    if args.command == "demo":
        from fxprune.demo import run_demo

        run_demo(sparsity=args.sparsity, pruner=args.pruner, steps=args.steps, finetune_steps=args.finetune_steps,
                 threads=args.threads, batch=args.batch, repeat=args.repeat, round_to=args.round_to,
                 out_dir=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
