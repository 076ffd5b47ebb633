#!/usr/bin/env python
"""fxprune on Hugging Face transformers (BERT-base, ViT-base): compile cost, size, MACs, ORT latency.

Models are built from their default configs with random weights (nothing is downloaded):

    bert-base  BertModel(BertConfig())  input_ids (1, 128) int64, random ints < vocab_size (positional)
    vit-base   ViTModel(ViTConfig())    pixel_values (1, 3, 224, 224) float32, standard normal

For every model, in a fresh worker process (a crash is recorded instead of ending the run):

1. ``fxprune.compile`` (torch.export capture + channel-group pass) with target_sparsity 0.5,
   pattern channelx1, prune_domain local and ``round_to`` 1 by default: per encoder layer fxprune
   finds one group of ``num_attention_heads`` (12) attention heads (q/k/v rows + output-projection
   columns) and one of ``intermediate_size`` (3072) FFN channels; with local pruning every group
   loses half its channels, i.e. 6 of 12 heads and 1536 of 3072 FFN channels per layer. round_to=8
   (the CNN benchmark's value) would round the 6 kept heads up to 8, hence round_to=1 here.
2. one-shot magnitude ``prune()``, ``compact()``, ``report()``: trace and group seconds, params and
   MACs before/after, ideal = dense MACs / compact MACs.
3. The dense captured graph (``p.captured.graph_module``) and the compact graph are exported to ONNX
   (``fxprune.export_onnx`` checks onnxruntime against torch).
4. dense and compact ONNX files are timed in one interleaved ``fxprune.benchmark`` call per model on
   the same input the model was compiled with (thread counts from ``--threads``).

The measured steps above, the worker plumbing and the helpers (peak-RSS probes, ONNX export with
retry, formatting, machine description) are shared with ``bench_cnn.py`` through ``_measure.py``
in this folder.

Usage::

    python benchmarks/bench_transformers.py --models bert-base --repeat 5               # quick
    python benchmarks/bench_transformers.py --repeat 40 --out benchmarks/results_transformers.md
    python benchmarks/bench_transformers.py --models bert-base-cls vit-base-cls --hidden-sparsity 0.25 \\
        --out benchmarks/results_transformers_hidden.md                                 # + hidden size
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _measure  # noqa: E402
from _measure import _checksum, _err, _f, _first_line, _mb, machine  # noqa: E402

MODELS = {
    "bert-base": ("BertModel", "BertConfig"),
    "vit-base": ("ViTModel", "ViTConfig"),
    # with a classification head the hidden size is not a model output, so --hidden-sparsity can prune it
    "bert-base-cls": ("BertForSequenceClassification", "BertConfig"),
    "vit-base-cls": ("ViTForImageClassification", "ViTConfig"),
}
DEFAULT_MODELS = ["bert-base", "vit-base"]
SEED = 0
BUILD_TARGET_S = {"bert-base": 2.0}  # trace + group target
EFFICIENCY_TARGET = 0.9  # speedup / ideal


def _build(name: str, batch: int):
    import torch
    import transformers

    model_cls, config_cls = MODELS[name]
    torch.manual_seed(SEED)
    config = getattr(transformers, config_cls)()
    model = getattr(transformers, model_cls)(config).eval()
    gen = torch.Generator().manual_seed(SEED)
    if name.startswith("bert"):
        x = torch.randint(0, config.vocab_size, (batch, 128), generator=gen, dtype=torch.long)
    else:
        x = torch.randn(batch, config.num_channels, config.image_size, config.image_size, generator=gen)
    return model, x, config


def _group_summary(p, config) -> dict:
    """Sizes of the groups and how many channels each kept after prune()."""
    import collections

    kept = p.kept_channels
    sizes = collections.Counter(g.size for g in p.groups)
    after = collections.defaultdict(collections.Counter)
    for g in p.groups:
        after[g.size][len(kept[g.index])] += 1
    return {"group_sizes": {str(k): v for k, v in sorted(sizes.items())},
            "kept_by_size": {str(k): {str(n): c for n, c in sorted(v.items())} for k, v in sorted(after.items())},
            "num_heads": config.num_attention_heads, "intermediate": config.intermediate_size,
            "layers": config.num_hidden_layers}


# ------------------------------------------------------------------------------------------
# worker
# ------------------------------------------------------------------------------------------
def worker(args) -> dict:
    import numpy as np

    import fxprune

    out: dict = {"tool": "fxprune", "version": fxprune.__version__}
    model, x, config = _build(args.model, args.batch)
    out["input_shape"] = list(x.shape)
    out["input_dtype"] = str(x.dtype).replace("torch.", "")
    np.save(os.path.join(args.tmp, "input.npy"), x.numpy())
    out["checksum"] = _checksum(model)
    cfg = {"target_sparsity": args.sparsity, "pattern": "channelx1", "prune_domain": "local",
           "round_to": args.round_to}
    if args.hidden_sparsity:  # heads and FFN as above, plus the hidden size in multiples of 64
        cfg["pruners"] = [{}, {"prune_hidden_size": True, "target_sparsity": args.hidden_sparsity, "round_to": 64}]
    out["config"] = cfg
    model_box = [model]
    del model  # the pipeline drops the model once compile() has copied it

    def warm(m):  # the dense output scale, for the ONNX error figures; also warms the eager path
        out["output_absmax"] = float(m(x)[0].abs().max())

    _measure.fxprune_pipeline(out, model_box, x, cfg, args.tmp, warm=warm,
                              after_prune=lambda p: _group_summary(p, config), reasons_top=6)
    return out


# ------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------
def run_worker(model: str, args, tmp: str) -> dict:
    return _measure.run_worker(__file__, "fxprune", model, args, tmp,
                               ["--_worker", "--hidden-sparsity", str(args.hidden_sparsity)])


def _onnx_input_names(path: str) -> list[str]:
    import onnx

    proto = onnx.load(path, load_external_data=False)
    inits = {i.name for i in proto.graph.initializer}
    return [i.name for i in proto.graph.input if i.name not in inits]


def _yes(ok: bool | None) -> str:
    return "-" if ok is None else ("yes" if ok else "**no**")


def model_section(name: str, fx: dict, bench, bench_error: str | None, threads: list[int]) -> str:
    model_cls, config_cls = MODELS[name]

    def row(label, fn):
        try:
            cell = fn(fx)
        except (KeyError, TypeError, ZeroDivisionError):
            cell = "-"
        return f"| {label} | {cell} |"

    shape = "x".join(str(s) for s in fx.get("input_shape", []))
    lines = [f"### {name}: `{model_cls}({config_cls}())`, input {shape} {fx.get('input_dtype', '')}", ""]
    lines += ["| figure | fxprune |", "|---|---:|"]
    target = BUILD_TARGET_S.get(name)
    lines.append(row("trace s (`p.captured.seconds`, torch.export)", lambda r: _f(r["capture_s"])))
    lines.append(row("group s (`p.grouping.seconds`)", lambda r: _f(r["group_s"])))
    lines.append(row("trace + group s" + (f" (target < {target:g} s)" if target else ""),
                     lambda r: _f(r["build_s"]) + (f" ({'met' if r['build_s'] < target else '**missed**'})"
                                                   if target else "")))
    lines.append(row("compile() wall s (incl. deepcopy of the model)", lambda r: _f(r["compile_wall_s"])))
    lines.append(row("prune s / compact s / report s",
                     lambda r: f"{r['prune_s']:.2f} / {r['compact_s']:.2f} / {r['report_s']:.2f}"))
    lines.append(row("groups (size: count)",
                     lambda r: ", ".join(f"{k}: {v}" for k, v in r["group_sizes"].items())))
    lines.append(row("kept channels per group after prune() (size → kept: count)",
                     lambda r: "; ".join(f"{k} → " + ", ".join(f"{n}: {c}" for n, c in v.items())
                                         for k, v in r["kept_by_size"].items())))
    lines.append(row("channel sparsity", lambda r: f"{r['channel_sparsity']:.1%}"))
    lines.append(row("params before → after (M)",
                     lambda r: f"{_mb(r['params_before']):.2f} → {_mb(r['params_after']):.2f}"))
    lines.append(row("params ratio", lambda r: _f(r["params_ratio"])))
    lines.append(row("GMACs before → after",
                     lambda r: f"{r['macs_before'] / 1e9:.3f} → {r['macs_after'] / 1e9:.3f}"))
    lines.append(row("ideal (dense MACs / compact MACs)", lambda r: _f(r["ideal"], ".3f")))
    for label, key in [("dense", "dense_onnx"), ("compact", "onnx")]:
        lines.append(row(f"ONNX {label}: nodes / MB / export s",
                         lambda r, k=key: f"{r[k]['num_nodes']} / {r[k]['size_bytes'] / 1e6:.1f} / {r[k]['seconds']:.1f}"))
        lines.append(row(f"ONNX {label}: max abs error vs torch",
                         lambda r, k=key: _f(r[k]["max_abs_error"], ".1e")
                         + (" (default check failed, see below)" if r[k].get("check_error") else "")))
    lines.append(row("compact vs masked model max abs error", lambda r: _f(r["compact_error"], ".1e")))
    lines.append(row("RSS before compile / peak during compile MiB",
                     lambda r: f"{r['rss_before_mib']:.0f} / {r['peak_after_build_mib']:.0f}"))
    lines.append(row("peak RSS to end of worker MiB", lambda r: _f(r["peak_end_mib"], ".0f")))
    lines.append(row("worker wall s", lambda r: _f(r.get("worker_s"), ".1f")))

    notes = _measure.run_notes(fx, " (random init); `export_onnx` tolerance is atol 1e-4 x max(1, max|y|).",
                               f" ({os.cpu_count()} cores).")
    if fx.get("blocked_reasons"):
        notes.append(f"{fx.get('blocked', 0)} blocked parameter dims, most common reasons: "
                     + "; ".join(f"{n}x {why}" for why, n in fx["blocked_reasons"]) + ".")
    if fx.get("input_names"):
        notes.append("ORT feed: " + ", ".join(f"`{n}`" for n in fx["input_names"])
                     + " = the compile input (same array for dense and compact).")
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    if bench is not None:
        lines += ["", "onnxruntime CPU latency (dense and compact interleaved, one `fxprune.benchmark` call):", "",
                  bench.to_markdown()]
    elif bench_error:
        lines += ["", f"benchmark failed: `{_first_line(bench_error)}`", "", "```", bench_error, "```"]
    for label, r in [("dense export", fx.get("dense_onnx")), ("compact export", fx.get("onnx"))]:
        if r and r.get("check_error"):
            lines += ["", f"**{label}: `fxprune.export_onnx` raised with its default atol=1e-4; redone with "
                      f"atol={r['retry_atol']:.3g}, max abs error then {r['max_abs_error']:.2e}:**",
                      "", "```", r["check_error"], "```"]
    if fx.get("error"):
        lines += ["", f"**fxprune failed at stage `{fx.get('error_stage')}`:**", "", "```", fx["error"], "```"]
    return "\n".join(lines)


def summary_table(results: list[tuple[str, dict, dict]], threads: list[int]) -> str:
    head = ["model", "trace s", "group s", "trace+group s", "params M before → after", "GMACs before → after",
            "ideal"]
    for t in threads:
        head += [f"dense ms @{t}t", f"compact ms @{t}t", f"speedup @{t}t", f"speedup/ideal @{t}t"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name, fx, by in results:
        target = BUILD_TARGET_S.get(name)
        build = _f(fx.get("build_s"))
        if target and fx.get("build_s") is not None:
            build += " ✓" if fx["build_s"] < target else f" ✗ (target < {target:g})"
        params = (f"{_mb(fx['params_before']):.2f} → {_mb(fx['params_after']):.2f}"
                  if fx.get("params_after") else "-")
        macs = (f"{fx['macs_before'] / 1e9:.2f} → {fx['macs_after'] / 1e9:.2f}" if fx.get("macs_after") else "-")
        cells = [name, _f(fx.get("capture_s")), _f(fx.get("group_s")), build, params, macs,
                 _f(fx.get("ideal"), ".3f")]
        for t in threads:
            d, c = by.get("dense", {}).get(t), by.get("fxprune", {}).get(t)
            if d is None or c is None:
                cells += ["-"] * 4
                continue
            eff = _f(c.efficiency)
            if c.efficiency is not None:
                eff += " ✓" if c.efficiency >= EFFICIENCY_TARGET else " ✗"
            cells += [f"{d.median_ms:.2f}", f"{c.median_ms:.2f}", f"{c.speedup:.2f}x", eff]
        if fx.get("error"):
            cells[0] += f" (fxprune failed at `{fx.get('error_stage')}`)"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _measure.add_run_args(ap, MODELS)
    ap.add_argument("--round-to", type=int, default=1,
                    help="fxprune round_to (default 1: with 12 heads, 8 would keep 8 heads instead of 6)")
    ap.add_argument("--hidden-sparsity", type=float, default=0.0,
                    help="also prune this fraction of the hidden size (prune_hidden_size; use a *-cls model)")
    ap.add_argument("--out", default=None, help="write the markdown fragment here")
    ap.set_defaults(models=DEFAULT_MODELS)
    _measure.add_worker_args(ap, action="store_true")
    args = ap.parse_args(argv)

    if args._worker:
        return _measure.worker_main(args, worker)

    import numpy as np

    import fxprune

    t_start = time.perf_counter()
    load_start = os.getloadavg()
    command = _measure.command_line(__file__)
    info = machine()

    sections, results = [], []
    for name in args.models:
        print(f"== {name}", flush=True)
        with tempfile.TemporaryDirectory(prefix=f"bench_tf_{name}_") as tmp:
            fx = run_worker(name, args, tmp)
            print(f"   fxprune: trace {_f(fx.get('capture_s'))} s, group {_f(fx.get('group_s'))} s, "
                  f"ideal {_f(fx.get('ideal'), '.3f')}"
                  + (f", FAILED at {fx.get('error_stage')}: {_first_line(fx['error'])}" if fx.get("error") else ""),
                  flush=True)
            bench, bench_error = None, None
            if "dense_onnx" in fx and "onnx" in fx:
                paths = {"dense": fx["dense_onnx"]["path"], "fxprune": fx["onnx"]["path"]}
                macs = {"dense": fx["macs_before"], "fxprune": fx["macs_after"]}
                load_before = os.getloadavg()
                try:
                    names = {label: _onnx_input_names(p) for label, p in paths.items()}
                    if len(set(map(tuple, names.values()))) != 1 or len(names["dense"]) != 1:
                        raise RuntimeError(f"ONNX graph inputs differ or are not a single tensor: {names}")
                    fx["input_names"] = names["dense"]
                    feed = {names["dense"][0]: np.load(os.path.join(tmp, "input.npy"))}
                    bench = fxprune.benchmark(paths, threads=args.threads, warmup=args.warmup, repeat=args.repeat,
                                              macs=macs, inputs=feed)
                    print(bench, flush=True)
                except Exception as exc:  # noqa: BLE001
                    bench_error = _err(exc)
                    print(f"   benchmark FAILED: {_first_line(bench_error)}", flush=True)
                fx["loadavg"] = (load_before[0], os.getloadavg()[0])
            else:
                bench_error = "nothing to compare: the dense or the compact ONNX export is missing"
        sections.append(model_section(name, fx, bench, bench_error, args.threads))
        by = _measure.rows_by_label(bench)
        results.append((name, fx, by))

    total = time.perf_counter() - t_start
    load_end = os.getloadavg()
    details = [
        f"- load average (1/5/15 min) at start: {' / '.join(f'{v:.2f}' for v in load_start)}; at end: "
        f"{' / '.join(f'{v:.2f}' for v in load_end)} (other processes shared the {os.cpu_count()} cores)",
        f"- fxprune {fxprune.__version__}; config: target_sparsity={args.sparsity}, pattern=channelx1, "
        f"prune_domain=local, round_to={args.round_to}, one-shot magnitude `prune()`"
        + (f"; hidden size: a second pruner with prune_hidden_size=True, target_sparsity={args.hidden_sparsity}, "
           "round_to=64" if args.hidden_sparsity else "") + ". round_to=1 because "
        "a head group has only 12 channels (heads): round_to=8 would round the 6 kept heads up to 8.",
        "- per encoder layer fxprune groups the 12 attention heads (q/k/v output rows + attention-output "
        "input columns, 64 weight rows per head) and the 3072 FFN channels; local pruning halves each group.",
        f"- inputs: bert-base input_ids 1x128 int64 (random ints < vocab_size, seed {SEED}), vit-base pixel_values "
        f"1x3x224x224 float32 (standard normal); batch {args.batch}",
        f"- onnxruntime CPUExecutionProvider, ORT_ENABLE_ALL, threads {args.threads}, warmup {args.warmup}, "
        f"repeat {args.repeat} (dense and compact interleaved per round); dense = ONNX of "
        "`p.captured.graph_module`, compact = ONNX of `p.compact()`",
        "- trace s = `p.captured.seconds` (torch.export), group s = `p.grouping.seconds`; target for bert-base: "
        f"trace + group < {BUILD_TARGET_S['bert-base']:g} s",
        "- ideal = dense MACs / compact MACs (fxprune's counter: linear/conv/matmul MACs incl. attention "
        f"matmuls); speedup/ideal = measured speedup / ideal (target >= {EFFICIENCY_TARGET})",
    ]
    _measure.write_report(
        args.out, "## Transformer benchmark: fxprune on BERT-base and ViT-base (Hugging Face models, random init)",
        command, info, details, total, summary_table(results, args.threads), sections)
    return 0


if __name__ == "__main__":
    sys.exit(main())
