"""Predicted onnxruntime latency of a pruning plan, from per-layer tables timed on this machine.

Every convolution and linear layer of the captured graph is timed alone
(:mod:`fxprune.exporters.op_timing`) at a grid of its input and output widths, with the
batch and thread count the user deploys with (HALP's latency lookup table, on onnxruntime).
A plan's latency is the sum of its layers' interpolated times plus the rest of the model
(the dense model's measured latency less its layers' share, scaled by the fraction of the
other ops' activation elements the plan keeps: element-wise ops, norms and attention
products cost in proportion to the tensors they touch), mapped to milliseconds by a line
fit on two measured models. Both are also profiled, so each layer's table is mapped to its own
time inside the network (a wide conv runs faster there than alone, a narrow one does not; one
scale for all layers let the allocation pick the narrow widths whose tables promised too much).
The two models are the dense one and a probe pruned about as far as the target asks
(so a plan is predicted between two measured points, not extrapolated from them). The
prediction steers the allocation (:func:`fxprune.selection.latency_counts`); the compact
model's measured latency is the check (:meth:`LatencyModel.measure`).

Every time the latency model measures is the 10th percentile of interleaved runs: on a shared
or virtual machine the host slows runs for seconds at a time, and unevenly (a model touching
more memory loses more), which moves a median speedup by up to 10% between two measurements
of the same files; the fast runs are the model's own cost.
"""

from __future__ import annotations

import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fxprune.errors import ConfigError
from fxprune.exporters.onnx_export import _to_numpy
from fxprune.exporters.op_timing import OpShape, OpTimer, edge_shapes
from fxprune.passes.couplings import value_key
from fxprune.passes.ops.conv import CONV_ND
from fxprune.passes.shapes import dynamic_dims_of, flat_inputs

__all__ = ["LatencyModel", "Layer", "width_grid", "example_feed", "batch_of", "batch_is_dynamic", "setting",
           "LATENCY_AIM", "LATENCY_OVERSHOOT", "LATENCY_RECHECK", "LATENCY_TOLERANCE"]

aten = torch.ops.aten

SMOOTH = True  # tables are fit by a bilinear surface before use (see smooth)
# a conv's table holds its time inside a network: its time alone less the layout changes at the edges of a
# one-layer model (OpTimer.in_layout_ms); False: times alone
LAYOUT_EDGES = True
# each layer's table is mapped to its time inside the network, profiled in the dense model and the probe
# (exporters/ort_profile.py); False: the tables as timed (alone), one line fit for all. Read when the tables are
# built: a state loaded with load_state_dict plans as it was saved
IN_NETWORK = True
# profiled runs per model for the in-network times (per kernel, the median)
PROFILE_RUNS = 20
# widths timed per layer dim, as fractions of the dense width (aligned to 16 where the dim is wide enough)
FRACTIONS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
PROBE_FRACTIONS = np.linspace(0.1, 0.9, 33)  # uniform kept fractions a probe is chosen from
# a measured relative latency within 1% of the one asked for meets it: run-to-run noise of onnxruntime
# on an idle machine is about that
LATENCY_TOLERANCE = 1.01
# a compact model more than 5% faster than asked lost channels it did not need to: pruned again, less
LATENCY_OVERSHOOT = 0.95
# a compact model measured more than 10% off its prediction is timed again before its plan is changed (the
# prediction is within a few % at 1 thread; a miss that large is more often the host than the plan)
LATENCY_RECHECK = 0.10
# plans are aimed at the middle of the window the check accepts, not at its edge: the allocation fills its
# budget to the prediction's last chunk, so a plan aimed at the target itself misses it on half the noise
LATENCY_AIM = (LATENCY_OVERSHOOT + LATENCY_TOLERANCE) / 2


def setting(threads: int, batch: int) -> str:
    """How a latency was timed, for notes and reports: ``onnxruntime, 1 thread, batch 8``."""
    return f"onnxruntime, {threads} thread{'s' * (threads != 1)}, batch {batch}"


def width_grid(size: int, step: int = 1) -> list[int]:
    """The widths a table times for a dim of ``size`` whose widths move in multiples of ``step``."""
    unit = step * max(1, 16 // step) if size >= 64 * step else step
    points = {max(unit, int(round(f * size / unit)) * unit) for f in FRACTIONS}
    return sorted(p for p in points | {size} if p <= size)


@dataclass
class Layer:
    """A timed layer: its shape at the dense widths and the channel spaces its widths follow.

    ``tied`` is the input channels per convolution group of a grouped or depthwise conv, whose
    output width follows its input width (one table dim); None when the two widths are free.
    """

    node: str
    base: OpShape
    x_space: tuple
    y_space: tuple
    tied: int | None = None

    def shape(self, cin: int, cout: int) -> OpShape:
        b = self.base
        if b.kind == "matmul":
            return OpShape("matmul", b.x[:-1] + (cin,), (cin, cout), b.bias)
        if self.tied is not None:
            groups = cin // self.tied
            cout = groups * (b.w[0] // b.group)
            return OpShape("conv", (b.x[0], cin) + b.x[2:], (cout,) + b.w[1:], b.bias, b.strides, b.pads,
                           b.dilations, groups)
        return OpShape("conv", (b.x[0], cin) + b.x[2:], (cout, cin) + b.w[2:], b.bias, b.strides, b.pads,
                       b.dilations, 1)


def _pads(padding, kernel, dilation) -> list[int]:
    if isinstance(padding, str):
        if padding == "valid":
            return [0] * (2 * len(kernel))
        total = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return [t // 2 for t in total] + [t - t // 2 for t in total]
    return list(padding) * 2


def find_layers(gm: torch.fx.GraphModule, shapes: dict, batch_scale: float) -> list[Layer]:
    """Convolutions and parameter matmuls (linear, addmm, mm/matmul by a weight) of the graph."""
    layers = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        args = list(node.args)
        if node.target in CONV_ND and len(args) >= 2 and getattr(args[1], "op", None) == "get_attr":
            x, w = value_key(args[0]), value_key(args[1])
            xs, ws = shapes.get(x), shapes.get(w)
            if xs is None or len(xs) != len(ws) or len(xs) < 3:
                continue
            nd = len(xs) - 2
            get = lambda i, name, d: args[i] if len(args) > i else node.kwargs.get(name, d)  # noqa: E731
            stride, padding, dilation, groups = (get(3, "stride", [1]), get(4, "padding", [0]),
                                                 get(5, "dilation", [1]), get(6, "groups", 1))
            expand = lambda v: list(v) * nd if len(v) == 1 else list(v)  # noqa: E731
            bias = get(2, "bias", None) is not None
            pads = _pads(padding if isinstance(padding, str) else expand(padding), ws[2:], expand(dilation))
            base = OpShape("conv", (max(1, round(xs[0] * batch_scale)),) + tuple(xs[1:]), tuple(ws), bias,
                           tuple(expand(stride)), tuple(pads), tuple(expand(dilation)), int(groups))
            layers.append(Layer(node.name, base, (x, 1), (node.name, 1), ws[1] if groups != 1 else None))
        elif node.target in (aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default):
            xi, wi = (1, 2) if node.target == aten.addmm.default else (0, 1)
            if len(args) <= wi or getattr(args[wi], "op", None) != "get_attr":
                continue
            x, w = value_key(args[xi]), value_key(args[wi])
            xs, ws, ys = shapes.get(x), shapes.get(w), shapes.get(node.name)
            if not xs or not ws or not ys or len(ws) != 2:
                continue
            k, o = (ws[1], ws[0]) if node.target == aten.linear.default else (ws[0], ws[1])
            bias = node.target == aten.addmm.default or (len(args) > 2 and args[2] is not None)
            lead = (max(1, round(xs[0] * batch_scale)),) + tuple(xs[1:-1])
            layers.append(Layer(node.name, OpShape("matmul", lead + (k,), (k, o), bool(bias)),
                                (x, len(xs) - 1), (node.name, len(ys) - 1)))
    return layers


class _Space:
    """Width of a channel space as a function of each group's kept fraction."""

    def __init__(self, size: int, frozen: int, elems: dict[int, int]):
        self.size, self.frozen, self.elems = size, frozen, elems

    def width(self, frac: np.ndarray) -> float:
        return self.frozen + sum(n * frac[g] for g, n in self.elems.items())


class LatencyModel:
    """Latency tables of one captured model at one batch and thread count.

    Built by :meth:`build` (times the dense model and every layer width not in the cache,
    with a progress bar); :meth:`predict` then gives a plan's latency in ms from the kept
    fraction of every group, and :meth:`measure` times a compact model against the dense one.
    """

    def __init__(self, pruning, threads: int = 1, batch: int | None = None, cache_dir=None, progress: bool | None = None,
                 groups: list[int] | None = None, target_speedup: float | None = None,
                 target_ms: float | None = None, round_to: int | str = "auto"):
        self.pruning, self.threads, self.progress = pruning, threads, progress
        self.round_to = round_to  # the pruner's: the probe's widths are aligned as its plans are
        self.target_speedup, self.target_ms = target_speedup, target_ms  # where the probe is placed
        self.groups = list(range(len(pruning.groups))) if groups is None else list(groups)  # the ones pruned
        self.cache_dir = cache_dir
        self.example_batch = batch_of(pruning)
        self.batch = batch or self.example_batch
        if self.batch != self.example_batch and not batch_is_dynamic(pruning):
            raise ConfigError(f"latency_batch={batch} differs from the example's batch ({self.example_batch}), but the "
                              "capture fixed the batch: leave latency_batch unset or capture with a dynamic batch")
        grouping = pruning.grouping
        self.sizes = np.array([g.size for g in pruning.groups], dtype=float)
        # the graph's shapes may be at another batch than the example (a size-1 batch is captured at 2)
        placeholders = [n.name for n in pruning.captured.graph_module.graph.nodes if n.op == "placeholder"
                        and len(grouping.shapes.get(n.name) or ()) >= 1]
        graph_batch = grouping.shapes[placeholders[0]][0] if placeholders else self.example_batch
        self.layers = find_layers(pruning.captured.graph_module, grouping.shapes, self.batch / graph_batch)
        self.spaces: dict[tuple, _Space] = {}
        layer_nodes = {layer.node for layer in self.layers}
        self.values: list[tuple[float, list[_Space]]] = []  # (dense elements, spaces of its pruned dims)
        for node in pruning.captured.graph_module.graph.nodes:
            shape = grouping.shapes.get(node.name)
            if node.op != "call_function" or node.name in layer_nodes or not shape:
                continue
            dims = [self._space((node.name, d)) for d in range(len(shape))]
            self.values.append((float(np.prod(shape)), [s for s in dims if s.elems]))
        self.rest_elements = sum(n for n, _ in self.values)
        self.tables: list[tuple[list[int], list[int], np.ndarray]] = []
        self.dense_ms: float | None = None
        self.rest_ms = 0.0
        self.scale, self.offset = 1.0, 0.0  # predicted ms = scale * (tables + rest) + offset, fit on two models
        self.probe: dict = {}
        # per layer (its table ms, its profiled ms) in the probe and in the dense model, flat (None: as timed)
        self.in_network: list[tuple[float, float, float, float] | None] | None = None
        self.correction = 1.0  # how much lower than asked the prediction is aimed (from the last measurement)
        self._onnx = None  # folder of the dense model's ONNX file, exported once
        self._exported = None  # a weak reference to the compact model whose ONNX file the folder holds
        self._input_names: list[str] | None = None  # the dense ONNX file's input names, read once
        self._touch = self._by_group()

    def _space(self, key: tuple) -> _Space:
        if key not in self.spaces:
            g = self.pruning.grouping
            size = g.shapes[key[0]][key[1]]
            atoms = g.space_atoms.get(key)
            if atoms is None:
                self.spaces[key] = _Space(size, size, {})
            else:
                groups = np.where(atoms >= 0, g.atom_group[np.maximum(atoms, 0)], -1)
                counts = np.bincount(groups[groups >= 0], minlength=len(self.sizes)) if (groups >= 0).any() else []
                self.spaces[key] = _Space(size, int((groups < 0).sum()),
                                          {int(i): int(n) for i, n in enumerate(counts) if n})
        return self.spaces[key]

    def _by_group(self) -> dict[int, tuple[list[int], list[int]]]:
        """Group -> (indices of the layers, indices of the other values) whose widths it changes."""
        touch: dict[int, tuple[list[int], list[int]]] = {}
        for i, layer in enumerate(self.layers):
            for g in set(self._space(layer.x_space).elems) | set(self._space(layer.y_space).elems):
                touch.setdefault(g, ([], []))[0].append(i)
        for j, (_, spaces) in enumerate(self.values):
            for g in {g for s in spaces for g in s.elems}:
                touch.setdefault(g, ([], []))[1].append(j)
        return touch

    # -- building the tables ----------------------------------------------------------------
    def build(self) -> "LatencyModel":
        """Time the dense model and every layer width the cache lacks (once; later calls return at once)."""
        if self.dense_ms is not None:
            return self
        grids = self._grids()

        def time_tables():
            timer = OpTimer(self.threads, self.cache_dir)
            shapes = [layer.shape(a, b) for layer, (gi, go) in zip(self.layers, grids) for a in gi
                      for b in (go or [None])]
            if LAYOUT_EDGES:
                shapes += [e for s in shapes if s.kind == "conv" for t in (s.x, s.y()) for e in edge_shapes(t)]
            todo = list({s.key(): s for s in shapes if s not in timer}.values())
            cost = timer.in_layout_ms if LAYOUT_EDGES else timer
            for shape in tqdm(todo, desc="latency tables", unit="shape", disable=self._quiet(), leave=False):
                timer(shape)
            if todo:
                timer.save()
            return [np.array([[cost(layer.shape(a, b)) for b in (go or [None])] for a in gi])
                    for layer, (gi, go) in zip(self.layers, grids)], timer.measured

        tables, self.timed_shapes = _share(time_tables)
        self.tables = [(gi, go, smooth(gi, go, t) if SMOOTH else t) for (gi, go), t in zip(grids, tables)]
        # two measured models fit the prediction: the dense one and a probe with every pruned group at one
        # kept fraction, chosen so the tables predict about the target's speedup for it. A layer timed alone
        # pays its own layout changes and call, and the whole model has costs no width changes (dispatch,
        # thread-pool sync), so the tables give the shape of the curve, not its scale and offset; the offset
        # is negative where the measured model falls faster than the tables (a > 1), and a plan pruned
        # further than the probe is then predicted in proportion from the probe, never below zero
        # a rough dense time (a few runs) sizes the rest for placing the probe; the fit times it again
        dense_ms = self.measure(repeat=3)[0] if (self.target_speedup or self.target_ms) and self.groups else None
        self.rest_ms = max((dense_ms or 0.0) - self._tables_ms(np.ones(len(self.sizes))), 0.0)
        probe_frac, probe = self._probe(self._probe_fraction(dense_ms))
        self.dense_ms, probe_ms = self.measure(probe)
        if IN_NETWORK:
            self.in_network = self._profile_layers(probe_frac, probe)
        self.rest_ms = max(self.dense_ms - self._tables_ms(np.ones(len(self.sizes))), 0.0)
        raw_dense, raw_probe = self._raw(np.ones(len(self.sizes))), self._raw(probe_frac)
        a = (self.dense_ms - probe_ms) / (raw_dense - raw_probe) if raw_dense > raw_probe else 0.0
        c = self.dense_ms - a * raw_dense
        if a <= 0:  # the probe timed no faster than the dense model (noise, or a small model's fixed costs): the
            # tables' shape scaled through the dense model's measured time, the one point to trust
            a, c = self.dense_ms / raw_dense, 0.0
        self.scale, self.offset = a, c
        self.probe = {"kept_fraction": float(np.mean(probe_frac[self.groups])) if self.groups else 1.0,
                      "raw": raw_probe, "measured_ms": probe_ms, "predicted_ms": self._to_ms(raw_probe)}
        return self

    def _profile_layers(self, probe_frac: np.ndarray, probe: torch.fx.GraphModule) -> list:
        """Per layer ``(table ms at the probe's widths, in-network ms in the probe, table ms at the dense widths,
        in-network ms in the dense model)``. A layer whose kernels were not found in both profiles takes the median
        in-network over table ratio of the layers found (None, its table as timed, if none was)."""
        in_probe, in_dense = self.profile(probe)
        ones = np.ones(len(self.sizes))
        tables = [(self._table_ms(i, probe_frac), self._table_ms(i, ones)) for i in range(len(self.layers))]
        found = [(in_probe.get(layer.node, 0.0), in_dense.get(layer.node, 0.0)) for layer in self.layers]
        ratios = [(p + d) / (tp + td) for (tp, td), (p, d) in zip(tables, found) if p > 0 and d > 0]
        if not ratios:
            return None
        r = float(np.median(ratios))
        return [(tp, p, td, d) if p > 0 and d > 0 else (tp, tp * r, td, td * r)
                for (tp, td), (p, d) in zip(tables, found)]

    def _tables_ms(self, frac: np.ndarray) -> float:
        return sum(self.layer_ms(i, frac) for i in range(len(self.layers)))

    def _probe_fraction(self, dense_ms: float | None) -> float:
        """The uniform kept fraction whose probe the tables and rest (unscaled) predict nearest the target's speedup
        (``target_speedup``, or the measured dense latency over ``target_latency_ms``); 0.5 without a target."""
        want = self.target_speedup or (dense_ms / self.target_ms if dense_ms and self.target_ms else None)
        if not want or want <= 1.0 or not self.groups:
            return 0.5
        raw_dense = self._raw(np.ones(len(self.sizes)))
        errors = [abs(np.log(raw_dense / max(self._raw(self._probe_kept(f)[1]), 1e-12) / want))
                  for f in PROBE_FRACTIONS]
        return float(PROBE_FRACTIONS[int(np.argmin(errors))])

    def _probe_kept(self, fraction: float) -> tuple[dict[int, np.ndarray], np.ndarray]:
        """Every pruned group at about ``fraction`` of its channels (aligned, concat branches non-empty): the kept
        masks and every group's kept fraction."""
        from fxprune.selection import align_narrow, aligned_widths, choose_kept

        p = self.pruning
        kept = {g: k.copy() for g, k in p._kept.items()}
        narrow = align_narrow([p.groups[g] for g in self.groups], True)  # as a latency target's plans align them
        auto = self.round_to == "auto"
        for g in self.groups:
            group = p.groups[g]
            step, least = aligned_widths(group, narrow) if auto else (self.round_to, 1)
            keep = (max(step, int(round(group.size * fraction / step)) * step) if group.size > step
                    else max(1, int(round(group.size * fraction))))
            keep = max(keep, least)
            kept[g] = choose_kept(-np.arange(group.size, dtype=float), group.size - keep, group.parts, step)
        return kept, np.array([k.mean() for k in kept.values()])

    def _probe(self, fraction: float = 0.5) -> tuple[np.ndarray, torch.fx.GraphModule]:
        """The probe at ``fraction`` (:meth:`_probe_kept`): its kept fractions and its compact graph, built without
        touching the masked model."""
        from fxprune.passes.compact import compact_graph

        p = self.pruning
        kept, frac = self._probe_kept(fraction)
        return frac, compact_graph(p.captured.graph_module, p.grouping, p._atom_kept(kept), dict(p.model.state_dict()))

    def _grids(self) -> list[tuple[list[int], list[int] | None]]:
        """Per layer, the input and output widths its table times (None: the output follows the input)."""
        grids = []
        for layer in self.layers:
            x, y = self._space(layer.x_space), self._space(layer.y_space)
            if layer.tied is not None:
                grids.append((width_grid(x.size, layer.tied) if x.elems else [x.size], None))
            else:
                grids.append((width_grid(x.size) if x.elems else [x.size],
                              width_grid(y.size) if y.elems else [y.size]))
        return grids

    def state_dict(self) -> dict:
        """What the predictions depend on (tables, fit, correction), so a resumed run plans as the first did
        instead of timing again and planning on other noise."""
        if self.dense_ms is None:
            return {}
        return {"tables": [t.tolist() for _, _, t in self.tables], "dense_ms": self.dense_ms, "rest_ms": self.rest_ms,
                "scale": self.scale, "offset": self.offset, "correction": self.correction, "probe": dict(self.probe),
                "in_network": self.in_network, "layers": [layer.base.key() for layer in self.layers]}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        if state["layers"] != [layer.base.key() for layer in self.layers]:
            raise ConfigError("the saved latency tables are of other layers (another model, batch or capture)")
        grids = [(gi, go) for gi, go, _ in self.tables] or self._grids()
        self.tables = [(gi, go, np.array(t)) for (gi, go), t in zip(grids, state["tables"])]
        self.dense_ms, self.rest_ms = state["dense_ms"], state["rest_ms"]
        self.scale, self.offset, self.correction = state["scale"], state["offset"], state["correction"]
        self.probe = dict(state["probe"])
        self.in_network = state.get("in_network")

    def _quiet(self) -> bool | None:
        return None if self.progress is None else not self.progress

    # -- prediction -------------------------------------------------------------------------
    def layer_ms(self, i: int, frac: np.ndarray) -> float:
        """Layer ``i``'s ms at the widths ``frac`` gives it: its table's time mapped to its time inside the network
        (:func:`in_network_ms`)."""
        fit = self.in_network[i] if self.in_network else None
        table = self._table_ms(i, frac)
        return table if fit is None else in_network_ms(table, *fit)

    def _table_ms(self, i: int, frac: np.ndarray) -> float:
        layer, (gi, go, table) = self.layers[i], self.tables[i]
        a = self._space(layer.x_space).width(frac)
        if go is None:
            return _interp(gi, table[:, 0], a)
        b = self._space(layer.y_space).width(frac)
        column = np.array([_interp(go, row, b) for row in table])
        return _interp(gi, column, a)

    def _value_elements(self, j: int, frac: np.ndarray) -> float:
        n, spaces = self.values[j]
        for s in spaces:
            n *= s.width(frac) / s.size
        return n

    def _raw(self, frac: np.ndarray) -> float:
        kept = sum(self._value_elements(j, frac) for j in range(len(self.values)))
        return self._tables_ms(frac) + self.rest_ms * (kept / self.rest_elements if self.rest_elements else 1.0)

    def _to_ms(self, raw: float) -> float:
        """The fitted line; with a negative offset, below the probe the line through the origin and the probe."""
        line = self.scale * raw + self.offset
        if self.offset < 0 and self.probe and raw < self.probe["raw"]:
            return raw * (self.scale * self.probe["raw"] + self.offset) / self.probe["raw"]
        return line

    def predict(self, frac: np.ndarray) -> float:
        """Latency in ms of the model with each group keeping ``frac[g]`` of its channels."""
        self.build()
        return self._to_ms(self._raw(frac))

    def delta(self, g: int, new: float, frac: np.ndarray) -> float:
        """Predicted ms saved when group ``g`` goes from ``frac[g]`` to ``new`` (others unchanged), at the fitted
        line's slope (an upper bound below a probe with a negative offset: :func:`latency_counts` checks
        :meth:`predict` where the sum of these says the target is reached)."""
        layer_ids, value_ids = self._touch.get(g, ((), ()))
        after = frac.copy()
        after[g] = new
        saved = sum(self.layer_ms(i, frac) - self.layer_ms(i, after) for i in layer_ids)
        if self.rest_elements:
            saved += self.rest_ms / self.rest_elements * sum(
                self._value_elements(j, frac) - self._value_elements(j, after) for j in value_ids)
        return self.scale * saved

    # -- measurement ------------------------------------------------------------------------
    def measure(self, compact: torch.nn.Module | None = None, repeat: int = 30) -> tuple[float, float | None]:
        """onnxruntime ms (the 10th percentile of interleaved runs) of the dense model and of ``compact``, at
        this batch and threads."""
        from fxprune.exporters.ort_benchmark import benchmark

        def timed():
            models = self._files(compact)
            result = benchmark(models, threads=[self.threads], warmup=5, repeat=repeat,
                               inputs=self._feed(self._input_names))
            ms = {row.label: row.p10_ms for row in result.rows}
            return ms["dense"], ms.get("compact")

        return _share(timed)

    def profile(self, compact: torch.nn.Module) -> tuple[dict[str, float], dict[str, float]]:
        """Kernel ms per layer node inside ``compact`` and inside the dense model (onnxruntime's profiler, each
        file run alone, :mod:`fxprune.exporters.ort_profile`), at this batch and threads. Under torch.distributed
        every rank calls it (rank 0 profiles, the others receive its figures), as :meth:`measure`."""
        from fxprune.exporters.ort_profile import attribute, kernel_ms, layer_weights

        def profiled():
            files, nodes = self._files(compact, reuse=True), [layer.node for layer in self.layers]
            feed = self._feed(self._input_names)
            return tuple(attribute(kernel_ms(files[label], feed, self.threads, PROFILE_RUNS), files[label], nodes,
                                   layer_weights(gm, nodes))
                         for label, gm in (("compact", compact), ("dense", self.pruning.captured.graph_module)))

        return _share(profiled)

    def _files(self, compact: torch.nn.Module | None, reuse: bool = False) -> dict[str, str]:
        """The dense ONNX file (exported once) and ``compact``'s (with ``reuse``, not again if it was the last
        one exported: the profile of the model just timed)."""
        from fxprune.exporters.onnx_export import export_onnx

        p = self.pruning
        if self._onnx is None:
            self._onnx = tempfile.TemporaryDirectory(prefix="fxprune-latency-")
        models = {"dense": str(Path(self._onnx.name) / "dense.onnx")}
        if not Path(models["dense"]).is_file():
            export_onnx(p.captured.graph_module, models["dense"], p.example_inputs, p.example_kwargs, check=False)
        if compact is not None:
            models["compact"] = str(Path(self._onnx.name) / "compact.onnx")
            if not (reuse and self._exported is not None and self._exported() is compact):
                self._exported = None  # until the file is the one of ``compact``
                export_onnx(compact, models["compact"], p.example_inputs, p.example_kwargs, check=False)
                self._exported = weakref.ref(compact)
        if self._input_names is None:  # read once: a session on the dense file costs ~0.2 s on ResNet-50
            import onnxruntime as ort

            session = ort.InferenceSession(models["dense"], providers=["CPUExecutionProvider"])
            self._input_names = [i.name for i in session.get_inputs()]
        return models

    def _feed(self, names: list[str]) -> dict[str, np.ndarray]:
        p = self.pruning
        return example_feed(p.example_inputs, p.example_kwargs, names, self.batch, self.example_batch)


def example_feed(example_inputs: tuple, example_kwargs: dict | None, names: list[str], batch: int,
                 example_batch: int) -> dict[str, np.ndarray]:
    """The example's tensors as an onnxruntime feed under ``names``, at ``batch``: tensors whose first dim is
    the example's batch repeat their rows cyclically, so every timed row is real data."""
    tensors = [t for t in flat_inputs(example_inputs, example_kwargs) if isinstance(t, torch.Tensor)]
    if len(tensors) != len(names):
        raise ConfigError(f"the exported model takes {len(names)} inputs and the example has {len(tensors)} "
                          "tensors; timing needs every example tensor to be a model input")
    feed = {}
    for name, t in zip(names, tensors):
        t = t.detach().cpu()
        if batch != example_batch and t.dim() >= 1 and t.shape[0] == example_batch:
            t = t[torch.arange(batch) % example_batch]
        feed[name] = _to_numpy(t)
    return feed


def in_network_ms(t: float, t_probe: float, probe: float, t_dense: float, dense: float) -> float:
    """A layer's time inside the network for table time ``t``, from its table and profiled times at the probe's and
    the dense widths: the line through the two profiled points, so each layer has its own scale and its own fixed
    cost (a narrow layer is slower inside the network, for its table, than a wide one). Below the probe the line
    goes on where it meets zero table time at or above zero ms; where it would meet it below zero, the time is in
    proportion to the table (the probe's in-network over table ratio), never below zero. Where the probe did not cut
    the layer's table by a tenth, the slope would be profiling noise over a small difference, and where the two
    points do not rise (noise), one ratio for both is used, so the time still grows with the width."""
    if t_probe < 0.9 * t_dense and dense > probe:
        slope = (dense - probe) / (t_dense - t_probe)
        if t >= t_probe or probe >= slope * t_probe:
            return probe + slope * (t - t_probe)
        return t * probe / t_probe
    return t * (probe + dense) / (t_probe + t_dense)


def smooth(grid_in: list[int], grid_out: list[int] | None, table: np.ndarray) -> np.ndarray:
    """The table replaced by its least-squares fit ``c0 + c1 a + c2 b + c3 a b`` (relative error): a layer's time
    is near-bilinear in its widths, and the allocation, which picks the chunks whose tables promise the most,
    would otherwise pick timing noise (a width that happened to time fast alone) first."""
    a = np.repeat(np.asarray(grid_in, float), table.shape[1])
    b = np.tile(np.asarray(grid_out if grid_out is not None else [1], float), table.shape[0])
    y = table.ravel()
    if y.size < 4:
        return table
    basis = np.stack([np.ones_like(a), a, b, a * b], 1) if grid_out is not None else np.stack([np.ones_like(a), a], 1)
    coef, *_ = np.linalg.lstsq(basis / y[:, None], np.ones_like(y), rcond=None)
    fitted = basis @ coef
    return np.maximum(fitted, 0.5 * y.min()).reshape(table.shape)


def _interp(grid: list[int], values: np.ndarray, x: float) -> float:
    """Piecewise-linear in width; below the narrowest width timed, in proportion to the width."""
    if len(grid) == 1:
        return float(values[0])
    if x < grid[0]:
        return float(values[0]) * x / grid[0]
    return float(np.interp(x, grid, values))


def batch_of(pruning) -> int:
    """The example's batch: the first dim of its first tensor input (1 without one)."""
    tensors = [t for t in flat_inputs(pruning.example_inputs, pruning.example_kwargs)
               if isinstance(t, torch.Tensor) and t.dim() >= 1]
    return int(tensors[0].shape[0]) if tensors else 1


def batch_is_dynamic(pruning) -> bool:
    """Whether the capture left the batch dim dynamic, so the exported files take other batches."""
    return any(0 in dims for dims in dynamic_dims_of(pruning.captured.graph_module).values())


def _share(value):
    """Under torch.distributed, rank 0's measurement for every rank (timing noise must not make ranks' plans
    differ); ``value`` is a number or a function that measures (run on rank 0 only)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return value() if callable(value) else value
    box = [(value() if callable(value) else value) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
