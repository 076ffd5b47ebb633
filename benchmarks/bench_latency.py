"""Latency targets and the same request against the peer, on Hugging Face models (random init).

    python benchmarks/bench_latency.py --out benchmarks/results_latency.md
    python benchmarks/bench_latency.py --models resnet50 --targets 2 --settings 1x1   # quick
    python benchmarks/bench_latency.py --targets --out benchmarks/results_latency_same_request.md   # (a) only

(a) **Same request.** fxprune's default config with the classifier excluded,
``{"target_sparsity": 0.5, "excluded_names": ["classifier"]}``, and Torch-Pruning at its defaults
with the same request (``MagnitudePruner(pruning_ratio=0.5, ignored_layers=[classifier])``, L2 group
magnitude), both one-shot; dense, fxprune and peer ONNX files timed interleaved at 1 and 2 threads,
batch 1. All three files have a dynamic batch, the format fxprune writes (a static file was 1-4% faster at
batch 1 on ConvNeXt, for either tool's model; ``--peer-static`` adds the peer's static file). On models
with a hidden size (ConvNeXt, BERT) the peer also prunes it, so "fxprune + hidden" adds the one key that
puts it in fxprune's budget (``"prune_hidden_size": True``): the same request over the same channels,
where fxprune's default leaves the hidden size alone (README, "Pruning the hidden size").
ideal = dense MACs / compact MACs (fxprune's counter for both). Speedups from the median
and from the 10th percentile of the interleaved runs (the one fxprune's latency model uses: on a
virtual machine the host slows runs for seconds at a time, and the median moves with it).

(b) **Latency targets.** ``{"target_speedup": T, "excluded_names": ["classifier"],
"latency_threads": t, "latency_batch": b}`` for every target and (threads x batch) setting: the
speedup fxprune predicted for its first plan, the speedup measured for it (the prediction error),
the speedup measured for the plan kept (after the check's corrections), and how many compact
models were timed. The latency tables are timed once per model and setting (the second target
reads them from the cache); their time is reported.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import datetime, timezone

import numpy as np
import torch
import transformers

import _measure
import fxprune
from fxprune.passes.macs import count_macs
from fxprune.passes.trace import capture

MODELS = {
    "resnet50": ("ResNetForImageClassification", "ResNetConfig"),
    "mobilenetv2": ("MobileNetV2ForImageClassification", "MobileNetV2Config"),
    "convnext-tiny": ("ConvNextForImageClassification", "ConvNextConfig"),
    "bert-base": ("BertForSequenceClassification", "BertConfig"),
}
# more depthwise nets, outside the four (not in the default --models)
MORE_MODELS = {
    "mobilenetv1": ("MobileNetV1ForImageClassification", "MobileNetV1Config", {}),
    "efficientnet-b0": ("EfficientNetForImageClassification", "EfficientNetConfig",
                        {"width_coefficient": 1.0, "depth_coefficient": 1.0, "image_size": 224, "hidden_dim": 1280}),
}
MODELS.update(MORE_MODELS)


def build(name: str):
    model_cls, config_cls, *options = MODELS[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**(options[0] if options else {}))
    model = getattr(transformers, model_cls)(config).eval()
    if name.startswith("bert"):
        x = torch.randint(0, model.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
    else:
        x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    return model, x


def classifier(model) -> str:
    return "classifier"


def logits(out):
    return out.logits if hasattr(out, "logits") else out


def peer(model, x, tmp: str, static: bool = False) -> tuple[str, int] | tuple[str, int, str] | str:
    """Torch-Pruning at its defaults with the same request; (onnx path, MACs), or why it could not run.

    The pruned model is exported like the dense and fxprune files, with a dynamic batch (captured
    as fxprune captures, so the file has the same format); with ``static`` a second file at the
    example's fixed shapes is written too and returned third.
    """
    try:
        import torch_pruning as tp
    except ImportError as err:
        return f"torch_pruning not importable ({err}); pip install torch-pruning==1.6.1"
    try:
        pruner = tp.pruner.MagnitudePruner(model, (x,), importance=tp.importance.GroupMagnitudeImportance(p=2),
                                           pruning_ratio=0.5, ignored_layers=[model.classifier],
                                           output_transform=logits)
        pruner.step()
        model.eval()
        gm = capture(model, (x,)).graph_module
        path = fxprune.export_onnx(gm, os.path.join(tmp, "peer.onnx"), (x,), check=True).path
        if not static:
            return path, count_macs(gm, (x,))
        fixed = fxprune.export_onnx(model, os.path.join(tmp, "peer_static.onnx"), (x,), check=True).path
        return path, count_macs(gm, (x,)), fixed
    except Exception as err:  # noqa: BLE001 - the peer's failure is a result
        return f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"


HIDDEN = ("convnext-tiny", "bert-base")  # models with groups that norm statistics span


def request_files(name: str, tmp: str, hidden: bool = True, peer_static: bool = False,
                  local: bool = False) -> tuple[dict, dict, torch.Tensor, str | None]:
    """The same request's ONNX files in ``tmp`` (dense, fxprune, the asked variants, the peer), their MACs, the
    example input, and why the peer could not run (None when it ran)."""
    model, x = build(name)
    request = {"target_sparsity": 0.5, "excluded_names": [classifier(model)]}
    p = fxprune.compile(model, (x,), request)
    small = p.prune().compact()
    rep = p.report()
    files = {"dense": fxprune.export_onnx(p.captured.graph_module, os.path.join(tmp, "dense.onnx"), (x,)).path,
             "fxprune": fxprune.export_onnx(small, os.path.join(tmp, "fx.onnx"), (x,)).path}
    macs = {"dense": rep.macs_before, "fxprune": rep.macs_after}
    variants = {"fxprune + hidden": ("fx_hidden", {"prune_hidden_size": True})} if hidden and name in HIDDEN else {}
    if local:
        variants["fxprune, local scope"] = ("fx_local", {"prune_domain": "local"})
    for label, (stem, extra) in variants.items():
        q = fxprune.compile(model, (x,), {**request, **extra})
        files[label] = fxprune.export_onnx(q.prune().compact(), os.path.join(tmp, f"{stem}.onnx"), (x,)).path
        macs[label] = q.report().macs_after
    got = peer(build(name)[0], x, tmp, static=peer_static)
    if not isinstance(got, tuple):
        return files, macs, x, got
    files["torch-pruning"], macs["torch-pruning"] = got[:2]
    if peer_static:
        files["torch-pruning, static file"], macs["torch-pruning, static file"] = got[2], got[1]
    return files, macs, x, None


def same_request(name: str, repeat: int, lines: list[str], hidden: bool = True, peer_static: bool = False,
                 local: bool = False) -> None:
    files, macs, x, failure = request_files(name, tempfile.mkdtemp(), hidden, peer_static, local)
    if failure is not None:
        lines.append(f"- {name}: Torch-Pruning failed: {failure}")
    res = fxprune.benchmark(files, threads=(1, 2), repeat=repeat, warmup=3, macs=macs, baseline="dense",
                            inputs={_input_name(files["dense"]): x.numpy()})
    p10 = {(r.label, r.threads): r.p10_ms for r in res.rows}
    for r in res.rows:
        fast = p10["dense", r.threads] / r.p10_ms  # the statistic fxprune's latency model times with
        lines.append(f"| {name} | {r.label} | {r.threads} | {r.median_ms:.2f} | {r.speedup:.2f}x | {r.ideal:.2f} | "
                     f"{r.efficiency:.2f} | {r.p10_ms:.2f} | {fast:.2f}x | {fast / r.ideal:.2f} |")


def _input_name(path: str) -> str:
    import onnxruntime

    return onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"]).get_inputs()[0].name


def targets(name: str, target_list, settings, cache: str, lines: list[str]) -> None:
    model, x = build(name)
    for threads, batch in settings:
        for target in target_list:
            t0 = time.perf_counter()
            p = fxprune.compile(model, (x,), {"target_speedup": target, "excluded_names": [classifier(model)],
                                              "latency_threads": threads, "latency_batch": batch,
                                              "latency_cache": cache})
            lat = p.pruners[0].latency
            t1 = time.perf_counter()
            lat.build()
            t2 = time.perf_counter()
            p.prune()
            t3 = time.perf_counter()
            first = p.latency_checks[0]
            kept = next(c for c in p.latency_checks if c["kept"])
            error = first["predicted_speedup"] / first["measured_speedup"] - 1
            rep = p.report()
            lines.append(f"| {name} | {target:g}x | {threads} | {batch} | {first['predicted_speedup']:.2f}x | "
                         f"{first['measured_speedup']:.2f}x | {error:+.1%} | **{kept['measured_speedup']:.2f}x** | "
                         f"{len(p.latency_checks)} | {rep.macs_ratio:.2f} | {p.sparsity:.2f} | "
                         f"{t2 - t1:.0f} ({lat.timed_shapes} shapes) | {t3 - t2:.0f} | "
                         + ", ".join(f"{c['measured_speedup']:.2f}/{c['predicted_speedup']:.2f}"
                                     + (f" ({c['timed']})" if c["timed"] > 1 else "") for c in p.latency_checks)
                         + " |")
            print(lines[-1], flush=True)
            del p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=[m for m in MODELS if m not in MORE_MODELS], choices=list(MODELS))
    ap.add_argument("--targets", nargs="*", type=float, default=[2.0, 3.0], help="none: (a) only")
    ap.add_argument("--settings", nargs="+", default=["1x1", "2x8"], help="THREADSxBATCH")
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--skip-same-request", action="store_true")
    ap.add_argument("--no-hidden", action="store_true",
                    help="(a) without the fxprune + hidden row on ConvNeXt and BERT")
    ap.add_argument("--fx-local", action="store_true",
                    help="(a) also times fxprune's same request with `prune_domain: local`")
    ap.add_argument("--peer-static", action="store_true",
                    help="(a) also times the peer's model exported at the example's fixed shapes (every other file "
                         "has a dynamic batch)")
    ap.add_argument("--cache", default=None, help="latency-table cache folder (default: a fresh temporary one, "
                                                  "so table times are what a first run pays)")
    ap.add_argument("--layout-edges", choices=("on", "off"), default="on",
                    help="off: conv tables hold each conv's time alone, layout changes at its edges included "
                         "(fxprune.latency.LAYOUT_EDGES)")
    ap.add_argument("--in-network", choices=("on", "off"), default="on",
                    help="off: every layer's table as timed alone, one line fit for all (fxprune.latency.IN_NETWORK)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    fxprune.latency.LAYOUT_EDGES = args.layout_edges == "on"
    fxprune.latency.IN_NETWORK = args.in_network == "on"
    settings = [tuple(int(v) for v in s.split("x")) for s in args.settings]
    cache = args.cache or tempfile.mkdtemp(prefix="fxprune-tables-")
    began = time.perf_counter()
    head = [f"# Latency targets and the same request ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC)", "",
            f"Command: `python benchmarks/bench_latency.py {' '.join(sys.argv[1:])}`", "",
            "Machine: " + ", ".join(f"{k} = {v}" for k, v in _measure.machine().items())
            + f", fxprune {fxprune.__version__}",
            ""]
    a = ["## (a) Same request: 50% channels, classifier excluded, each tool's defaults (batch 1); "
         "fxprune + hidden: the same with `prune_hidden_size: True`", "",
         "| model | method | threads | median ms | speedup | ideal | speedup/ideal | p10 ms | p10 speedup | "
         "p10 speedup/ideal |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    b = ["## (b) target_speedup: predicted and measured", "",
         "| model | target | threads | batch | predicted (1st plan) | measured (1st plan) | prediction error | "
         "measured (plan kept) | models timed | ideal (MACs) | channel sparsity | tables s | prune s | "
         "each plan: measured / predicted (times timed) |",
         "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name in args.models:
        if not args.skip_same_request:
            same_request(name, args.repeat, a, hidden=not args.no_hidden, peer_static=args.peer_static,
                         local=args.fx_local)
            print("\n".join(a[-8:]), flush=True)
        if args.targets:
            targets(name, args.targets, settings, cache, b)
    text = "\n".join(head + ([] if args.skip_same_request else a + [""]) + (b if args.targets else []) +
                     ["", f"Total wall time: {(time.perf_counter() - began) / 60:.1f} min"]) + "\n"
    _measure.emit(text, args.out)


if __name__ == "__main__":
    main()
