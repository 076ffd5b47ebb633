#!/usr/bin/env python
"""fxprune vs Torch-Pruning on Hugging Face CNNs: compile cost, size, MACs and onnxruntime latency.

Models are built from their default configs with random weights (nothing is downloaded):

    resnet50       ResNetModel(ResNetConfig())            (the default config is resnet-50)
    convnext-tiny  ConvNextModel(ConvNextConfig())        (the default config is convnext-tiny)
    mobilenetv2    MobileNetV2Model(MobileNetV2Config())  (mobilenet_v2_1.0_224)

For every model:

1. fxprune: ``fxprune.compile`` (torch.export capture + channel-group pass), one-shot magnitude
   ``prune()``, ``compact()``, ``report()``; compile seconds, peak RSS, params and MACs before/after.
2. The dense captured graph and the compact graph are exported to ONNX (``fxprune.export_onnx``
   checks onnxruntime against torch) into a temporary folder.
3. Peer (optional, ``--no-peer`` to skip): Torch-Pruning (``pip install torch-pruning==1.6.1``)
   prunes the same model (same seed, same random weights) with ``MagnitudePruner`` +
   ``GroupMagnitudeImportance(p=2)``, local pruning, the same ratio and ``round_to``. Its
   DependencyGraph build is timed and its pruned model exported to ONNX the same way.
4. dense, fxprune and torch-pruning ONNX files are timed in one interleaved
   ``fxprune.benchmark`` call per model (thread counts from ``--threads``).

fxprune and Torch-Pruning each run in a fresh worker process so that the peak RSS of one does
not hide the other's and a crash in one (e.g. a segfault) is recorded instead of ending the run.
Peak RSS is the kernel's high-water mark VmHWM (/proc/self/status; what ``getrusage().ru_maxrss``
reports, but without the parent's RSS that ru_maxrss inherits across fork+exec), reset through
/proc/self/clear_refs just before the graph build and read right after it; the worker has imported
torch/transformers and built the model before, so "RSS increase" = that peak minus VmRSS before.

Usage::

    python benchmarks/bench_cnn.py --models resnet50 --repeat 5              # quick
    python benchmarks/bench_cnn.py --repeat 30 --out benchmarks/results_cnn.md
    python benchmarks/bench_cnn.py --models convnext-tiny --prune-hidden-size --out benchmarks/results_cnn_hidden.md
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _measure  # noqa: E402
from _measure import _checksum, _err, _export, _f, _first_line, _mb, _peak_rss_mib, machine  # noqa: E402

MODELS = {
    "resnet50": ("ResNetModel", "ResNetConfig"),
    "convnext-tiny": ("ConvNextModel", "ConvNextConfig"),
    "mobilenetv2": ("MobileNetV2Model", "MobileNetV2Config"),
}
SEED = 0


# ------------------------------------------------------------------------------------------
# helpers shared by the workers (peak-RSS probes, ONNX export, the fxprune steps: _measure.py)
# ------------------------------------------------------------------------------------------
def _build(name: str, batch: int):
    import torch
    import transformers

    model_cls, config_cls = MODELS[name]
    torch.manual_seed(SEED)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)()).eval()
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(SEED))
    return model, x


def _macs_params(module, x) -> tuple[int, int]:
    """MACs and params of an eager module, counted by fxprune's own counter (same as the report)."""
    import torch
    from fxprune.passes.macs import count_macs, count_params

    gm = torch.export.export(module.eval(), (x,), strict=False).module()
    return count_macs(gm, (x,)), count_params(module)


# ------------------------------------------------------------------------------------------
# worker: fxprune
# ------------------------------------------------------------------------------------------
def worker_fxprune(args) -> dict:
    import torch

    import fxprune

    out: dict = {"tool": "fxprune", "version": fxprune.__version__}
    model, x = _build(args.model, args.batch)
    out["checksum"] = _checksum(model)
    with torch.no_grad():
        out["output_absmax"] = float(model(x).last_hidden_state.abs().max())
    cfg = {"target_sparsity": args.sparsity, "pattern": "channelx1", "prune_domain": "local",
           "round_to": args.round_to, "prune_hidden_size": args.prune_hidden_size}
    out["config"] = cfg
    model_box = [model]
    del model  # the pipeline drops the model once compile() has copied it
    # the warm-up forward keeps the compile step from paying eager first-call costs
    _measure.fxprune_pipeline(out, model_box, x, cfg, args.tmp, warm=lambda m: m(x), peak_before=True)
    if "build_s" in out and args.build_repeat:  # warm-process repeats of the build timing (fresh model each)
        reps = []
        for _ in range(args.build_repeat):
            m, _x = _build(args.model, args.batch)
            q = fxprune.compile(m, (x,), cfg)
            reps.append(q.captured.seconds + q.grouping.seconds)
            del q, m
        out["build_repeats_s"] = reps
    return out


# ------------------------------------------------------------------------------------------
# worker: Torch-Pruning
# ------------------------------------------------------------------------------------------
def _output_layer(model, x):
    """The last Conv/Linear run by forward: it writes the model's output channels.

    Torch-Pruning is normally told to ignore the classifier so the network keeps its output width;
    these headless backbones have none, so the layer that produces ``last_hidden_state`` is ignored
    instead (its whole coupled group keeps its width). fxprune freezes model outputs the same way.
    """
    import torch

    order = []
    hooks = [m.register_forward_hook(lambda m, i, o: order.append(m)) for m in model.modules()
             if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return order[-1]


def worker_tp(args) -> dict:
    import torch

    out: dict = {"tool": "torch-pruning"}
    try:
        import torch_pruning as tp
    except ImportError as exc:
        out["error_stage"] = "import"
        out["error"] = f"torch_pruning is not importable: {exc}"
        return out
    out["version"] = importlib.metadata.version("torch-pruning")
    model, x = _build(args.model, args.batch)
    out["checksum"] = _checksum(model)
    names = {m: n for n, m in model.named_modules()}
    build_dependency = tp.DependencyGraph.build_dependency
    stage = "build"
    try:
        dense_out = None
        with torch.no_grad():
            dense_out = model(x)
        out_shape = tuple(dense_out.last_hidden_state.shape)
        ignored = [_output_layer(model, x)]
        out["ignored_layers"] = [names[m] for m in ignored]
        out["params_before"] = sum(p.numel() for p in model.parameters())

        dg_seconds = []

        def timed_build(self, *a, **k):  # time the DependencyGraph construction inside the pruner
            t0 = time.perf_counter()
            try:
                return build_dependency(self, *a, **k)
            finally:
                dg_seconds.append(time.perf_counter() - t0)

        tp.DependencyGraph.build_dependency = timed_build
        _measure.mark_build_start(out, peak_before=True)
        stage = "MagnitudePruner(...) / DependencyGraph build"
        importance = tp.importance.GroupMagnitudeImportance(p=2)
        t0 = time.perf_counter()
        pruner = tp.pruner.MagnitudePruner(
            model, (x,), importance=importance, pruning_ratio=args.sparsity, round_to=args.round_to,
            global_pruning=False, ignored_layers=ignored,
            output_transform=lambda o: o.last_hidden_state)
        out["pruner_init_s"] = time.perf_counter() - t0
        out["peak_after_build_mib"] = _peak_rss_mib()
        out["build_s"] = sum(dg_seconds)
        stage = "pruner.step()"
        t0 = time.perf_counter()
        pruner.step()
        out["prune_s"] = time.perf_counter() - t0
        stage = "forward of the pruned model"
        model.eval()
        with torch.no_grad():
            pruned_out = model(x)
        if tuple(pruned_out.last_hidden_state.shape) != out_shape:
            out["note"] = (f"output shape changed: {out_shape} -> {tuple(pruned_out.last_hidden_state.shape)}")
        stage = "MAC count (torch.export + fxprune counter)"
        macs_after, params_after = _macs_params(model, x)
        out.update(params_after=params_after, macs_after=macs_after)
        stage = "export"
        out["onnx"] = _export(model, os.path.join(args.tmp, "torch-pruning.onnx"), x)
    except BaseException as exc:  # noqa: BLE001
        out["error_stage"] = stage
        out["error"] = _err(exc)
    finally:
        tp.DependencyGraph.build_dependency = build_dependency
    out["peak_end_mib"] = _peak_rss_mib()
    if "build_s" in out and args.build_repeat:  # warm-process repeats of the DependencyGraph build
        reps = []
        for _ in range(args.build_repeat):
            m, _x = _build(args.model, args.batch)
            t0 = time.perf_counter()
            tp.DependencyGraph().build_dependency(m, example_inputs=(x,),
                                                  output_transform=lambda o: o.last_hidden_state)
            reps.append(time.perf_counter() - t0)
            del m
        out["build_repeats_s"] = reps
    return out


# ------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------
def run_worker(kind: str, model: str, args, tmp: str) -> dict:
    return _measure.run_worker(__file__, kind, model, args, tmp,
                               ["--_worker", kind, "--build-repeat", str(args.build_repeat)]
                               + (["--prune-hidden-size"] if args.prune_hidden_size else []))


def _median(v):
    import statistics

    return statistics.median(v) if v else None


def model_section(name: str, fx: dict, tp: dict | None, bench, bench_error: str | None) -> str:
    model_cls, config_cls = MODELS[name]
    cols = ["fxprune"] + (["Torch-Pruning " + tp.get("version", "")] if tp is not None else [])
    runs = [fx] + ([tp] if tp is not None else [])

    def row(label, fn):
        cells = []
        for r in runs:
            try:
                cells.append(fn(r))
            except (KeyError, TypeError, ZeroDivisionError):
                cells.append("-")
        return f"| {label} | " + " | ".join(cells) + " |"

    dense_macs = fx.get("macs_before")
    dense_params = fx.get("params_before")
    lines = [f"### {name}: `{model_cls}({config_cls}())`", ""]
    lines += ["| figure | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    lines.append(row("graph build s, first call in a fresh process (fxprune: capture + group; TP: DependencyGraph)",
                     lambda r: _f(r["build_s"])))
    lines.append(row("graph build s, median of warm repeats [all]",
                     lambda r: f"{_median(r['build_repeats_s']):.2f} [" + ", ".join(f"{v:.2f}" for v in r["build_repeats_s"]) + "]"))
    lines.append(row("  capture s / group s", lambda r: f"{r['capture_s']:.2f} / {r['group_s']:.2f}"
                     if r["tool"] == "fxprune" else "-"))
    lines.append(row("  compile() wall s (fxprune) / MagnitudePruner() s (TP)",
                     lambda r: _f(r["compile_wall_s"] if r["tool"] == "fxprune" else r["pruner_init_s"])))
    lines.append(row("prune s", lambda r: _f(r["prune_s"])))
    lines.append(row("compact s", lambda r: _f(r["compact_s"]) if r["tool"] == "fxprune" else "- (in place)"))
    lines.append(row("RSS before graph build MiB (torch + transformers + model)",
                     lambda r: _f(r["rss_before_mib"], ".0f")))
    lines.append(row("peak RSS during graph build MiB", lambda r: _f(r["peak_after_build_mib"], ".0f")))
    lines.append(row("RSS increase during graph build MiB",
                     lambda r: _f(r["peak_after_build_mib"] - r["rss_before_mib"], ".0f")))
    lines.append(row("peak RSS from build to end of worker MiB (incl. prune, compact, ONNX export)",
                     lambda r: _f(r["peak_end_mib"], ".0f")))
    lines.append(row("params before → after (M)",
                     lambda r: f"{_mb(dense_params):.2f} → {_mb(r['params_after']):.2f}"))
    lines.append(row("params ratio", lambda r: _f(dense_params / r["params_after"])))
    lines.append(row("GMACs before → after",
                     lambda r: f"{dense_macs / 1e9:.3f} → {r['macs_after'] / 1e9:.3f}"))
    lines.append(row("ideal (dense MACs / pruned MACs)", lambda r: _f(dense_macs / r["macs_after"])))
    lines.append(row("ONNX nodes / MB", lambda r: f"{r['onnx']['num_nodes']} / {r['onnx']['size_bytes'] / 1e6:.1f}"))
    lines.append(row("ONNX max abs error vs torch", lambda r: _f(r["onnx"]["max_abs_error"], ".1e")
                     + (" (default atol failed, see below)" if r["onnx"].get("check_error") else "")))
    lines.append(row("ONNX export s", lambda r: _f(r["onnx"]["seconds"])))
    lines.append(row("worker wall s", lambda r: _f(r.get("worker_s"), ".1f")))
    if "dense_onnx" in fx:
        d = fx["dense_onnx"]
        lines += ["", f"Dense ONNX (fxprune's captured graph): {d['num_nodes']} nodes, {d['size_bytes'] / 1e6:.1f} MB, "
                  f"max abs error vs torch {d['max_abs_error']:.1e}"
                  + (" (default atol failed, see below)" if d.get("check_error") else "")
                  + f", export {d['seconds']:.1f} s."]
    notes = _measure.run_notes(fx, " (random init; the ONNX errors above are absolute, compare them with this scale).",
                               f" (other processes shared the {os.cpu_count()} cores).")
    if fx.get("groups") is not None:
        notes.append(f"fxprune: {fx['groups']} channel groups, channel sparsity {fx.get('channel_sparsity', 0):.1%}, "
                     f"{fx.get('blocked', 0)} blocked parameter dims, compact-vs-masked max error "
                     f"{_f(fx.get('compact_error'), '.1e')}; compile() deep-copies the model (inplace=False), "
                     "which is part of its RSS increase.")
        if fx.get("blocked_reasons"):
            notes.append("fxprune blocked dims, most common reasons: "
                         + "; ".join(f"{n}x {why}" for why, n in fx["blocked_reasons"]) + ".")
    if tp is not None and tp.get("ignored_layers"):
        notes.append(f"Torch-Pruning: ignored_layers = {tp['ignored_layers']} (the layer writing the model output, "
                     "so the output width is kept as fxprune keeps it); "
                     f"weights identical to fxprune's (checksum {'equal' if tp.get('checksum') == fx.get('checksum') else 'DIFFERENT'}).")
    if tp is not None and tp.get("note"):
        notes.append(f"Torch-Pruning: {tp['note']}.")
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    if bench is not None:
        lines += ["", "onnxruntime CPU latency (interleaved, one `fxprune.benchmark` call):", "", bench.to_markdown()]
    elif bench_error:
        lines += ["", f"benchmark failed: `{_first_line(bench_error)}`"]
    for label, r in [("fxprune dense export", fx.get("dense_onnx")), ("fxprune compact export", fx.get("onnx")),
                     ("torch-pruning export", (tp or {}).get("onnx"))]:
        if r and r.get("check_error"):
            lines += ["", f"**{label}: `fxprune.export_onnx` raised with its default atol=1e-4; redone with "
                      f"atol={r['retry_atol']:.3g} (1e-4 x output scale), max abs error then {r['max_abs_error']:.2e}:**",
                      "", "```", r["check_error"], "```"]
    for r in runs:
        if r.get("error"):
            lines += ["", f"**{r['tool']} failed at stage `{r.get('error_stage')}`:**", "", "```", r["error"], "```"]
    return "\n".join(lines)


def combined_table(rows: list[dict], threads: list[int]) -> str:
    head = ["model", "method", "build s cold / warm", "build peak RSS MiB", "params M", "GMACs", "ideal"]
    for t in threads:
        head += [f"ms @{t}t", f"speedup @{t}t", f"speedup/ideal @{t}t"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for r in rows:
        build = "-" if r.get("build_s") is None else f"{r['build_s']:.2f} / {_f(_median(r.get('build_repeats_s')))}"
        cells = [r["model"], r["method"], build, _f(r.get("peak_mib"), ".0f"),
                 _f(_mb(r.get("params"))), _f(None if r.get("macs") is None else r["macs"] / 1e9, ".3f"),
                 _f(r.get("ideal"))]
        for t in threads:
            b = r.get("bench", {}).get(t)
            cells += ["-", "-", "-"] if b is None else [f"{b.median_ms:.2f}", f"{b.speedup:.2f}x",
                                                        _f(b.efficiency)]
        if r.get("error"):
            cells[2] = cells[2] + " (failed: " + r["error"] + ")"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _measure.add_run_args(ap, MODELS)
    ap.add_argument("--round-to", type=int, default=8)
    ap.add_argument("--build-repeat", type=int, default=3,
                    help="extra graph-build timings per tool in the warm worker (median reported)")
    ap.add_argument("--out", default=None, help="write the markdown fragment here")
    ap.add_argument("--no-peer", action="store_true", help="skip Torch-Pruning")
    ap.add_argument("--prune-hidden-size", action="store_true",
                    help="fxprune also prunes channels that LayerNorm statistics span (ConvNeXt's residual stream)")
    _measure.add_worker_args(ap, choices=["fxprune", "tp"])
    args = ap.parse_args(argv)

    if args._worker:
        return _measure.worker_main(args, worker_fxprune if args._worker == "fxprune" else worker_tp)

    import fxprune

    t_start = time.perf_counter()
    command = _measure.command_line(__file__)
    info = machine()
    peer_note = None
    if args.no_peer:
        peer_note = "peer skipped (--no-peer)"
    elif importlib.util.find_spec("torch_pruning") is None:
        peer_note = "peer skipped: torch_pruning is not importable (pip install torch-pruning==1.6.1)"
    run_peer = peer_note is None

    sections, rows = [], []
    all_reset = True
    for name in args.models:
        print(f"== {name}", flush=True)
        with tempfile.TemporaryDirectory(prefix=f"bench_cnn_{name}_") as tmp:
            fx = run_worker("fxprune", name, args, tmp)
            print(f"   fxprune: build {_f(fx.get('build_s'))} s, ideal {_f(fx.get('ideal'))}"
                  + (f", FAILED at {fx.get('error_stage')}: {_first_line(fx['error'])}" if fx.get("error") else ""),
                  flush=True)
            tp = None
            if run_peer:
                tp = run_worker("tp", name, args, tmp)
                print(f"   torch-pruning: build {_f(tp.get('build_s'))} s"
                      + (f", FAILED at {tp.get('error_stage')}: {_first_line(tp['error'])}" if tp.get("error") else ""),
                      flush=True)
            paths, macs = {}, {}
            if "dense_onnx" in fx:
                paths["dense"], macs["dense"] = fx["dense_onnx"]["path"], fx.get("macs_before")
            if "onnx" in fx:
                paths["fxprune"], macs["fxprune"] = fx["onnx"]["path"], fx["macs_after"]
            if tp is not None and "onnx" in tp:
                paths["torch-pruning"], macs["torch-pruning"] = tp["onnx"]["path"], tp["macs_after"]
            bench, bench_error = None, None
            if "dense" in paths and len(paths) > 1:
                if any(v is None for v in macs.values()):  # fxprune failed before its report: no ideal column
                    macs = None
                load_before = os.getloadavg()
                try:
                    bench = fxprune.benchmark(paths, threads=args.threads, warmup=args.warmup, repeat=args.repeat,
                                              macs=macs)
                    print(bench, flush=True)
                except Exception as exc:  # noqa: BLE001
                    bench_error = _err(exc)
                fx["loadavg"] = (load_before[0], os.getloadavg()[0])
            else:
                bench_error = "nothing to compare: the dense or every pruned ONNX export is missing"
        sections.append(model_section(name, fx, tp, bench, bench_error))
        all_reset = all_reset and all(r.get("peak_reset", True) for r in (fx, tp or {}))

        by = _measure.rows_by_label(bench)
        rows.append({"model": name, "method": "dense", "build_s": None, "peak_mib": None,
                     "params": fx.get("params_before"), "macs": fx.get("macs_before"), "ideal": 1.0,
                     "bench": by.get("dense", {})})
        rows.append({"model": name, "method": "fxprune", "build_s": fx.get("build_s"),
                     "build_repeats_s": fx.get("build_repeats_s"),
                     "peak_mib": fx.get("peak_after_build_mib"), "params": fx.get("params_after"),
                     "macs": fx.get("macs_after"), "ideal": fx.get("ideal"), "bench": by.get("fxprune", {}),
                     "error": fx.get("error") and f"{fx.get('error_stage')}"})
        if tp is not None:
            dm = fx.get("macs_before")
            rows.append({"model": name, "method": f"torch-pruning {tp.get('version', '')}".strip(),
                         "build_s": tp.get("build_s"), "build_repeats_s": tp.get("build_repeats_s"),
                         "peak_mib": tp.get("peak_after_build_mib"),
                         "params": tp.get("params_after"), "macs": tp.get("macs_after"),
                         "ideal": dm / tp["macs_after"] if dm and tp.get("macs_after") else None,
                         "bench": by.get("torch-pruning", {}),
                         "error": tp.get("error") and f"{tp.get('error_stage')}"})

    total = time.perf_counter() - t_start
    details = [
        f"- fxprune {fxprune.__version__}; config: target_sparsity={args.sparsity}, pattern=channelx1, "
        f"prune_domain=local, round_to={args.round_to}, prune_hidden_size={args.prune_hidden_size}, "
        "one-shot magnitude (L2)",
        (f"- peer: Torch-Pruning {importlib.metadata.version('torch-pruning')}, MagnitudePruner + "
         f"GroupMagnitudeImportance(p=2), pruning_ratio={args.sparsity}, round_to={args.round_to}, local"
         if run_peer else f"- {peer_note}"),
        f"- input {args.batch}x3x224x224 float32; onnxruntime CPUExecutionProvider, ORT_ENABLE_ALL, "
        f"threads {args.threads}, warmup {args.warmup}, repeat {args.repeat} (models interleaved per round)",
        "- build s: fxprune = `p.captured.seconds + p.grouping.seconds` (torch.export capture + group pass); "
        "Torch-Pruning = `DependencyGraph.build_dependency` inside `MagnitudePruner(...)`. 'cold' = the first build "
        f"in the fresh worker process (what a one-shot user pays), 'warm' = median of {args.build_repeat} more builds "
        "of a freshly built model in the same process",
        "- memory: each tool runs in a fresh worker process per model. Peak RSS = `VmHWM` of /proc/self/status "
        "(the kernel high-water mark that `getrusage().ru_maxrss` reports; ru_maxrss itself is not used because "
        "in a fork+exec'd worker it also counts the driver's RSS at exec), reset with /proc/self/clear_refs "
        "just before the graph build and read right after it (so it includes torch, transformers and the model "
        "already in memory); 'RSS increase' = that peak minus VmRSS just before the build"
        + ("" if all_reset else " (WARNING: the reset failed in some worker: its peak counts from process start)"),
        "- ideal = dense MACs / pruned MACs (conv/linear/matmul MACs counted by fxprune's counter on a "
        "torch.export graph, for both tools); speedup/ideal = measured speedup / ideal",
    ]
    _measure.write_report(args.out, "## CNN benchmark: fxprune vs Torch-Pruning (Hugging Face models, random init)",
                          command, info, details, total, combined_table(rows, args.threads), sections)
    return 0


if __name__ == "__main__":
    sys.exit(main())
