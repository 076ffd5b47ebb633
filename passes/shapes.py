"""Dynamic input dims: which ones capture keeps symbolic, and how every later export keeps them so.

A compact model that only runs at the example's shape cannot be deployed. By default
the batch (dim 0 of every tensor input that shares the first input's batch) is captured
as a symbol; users can ask for more with torch.export's ``dynamic_shapes``. torch.export
specialises dims of size 1, so such dims are captured on an example repeated to size 2.

What capture made dynamic is recorded per input placeholder as plain data
(``{placeholder: {dim: (name, min, max)}}``) in the graph module's ``meta``: the compact
graph inherits it, and ``save_compact`` / ``export_onnx`` rebuild the same
``dynamic_shapes`` from it, so the ``.pt2`` and the ONNX file accept the same shapes.
"""

from __future__ import annotations

import inspect
import warnings

import torch
import torch.utils._pytree as pytree
from torch.export import Dim
from torch.utils._sympy.numbers import int_oo

__all__ = ["DYNAMIC_META", "default_dynamic_shapes", "bind_spec", "widen_size_one", "recorded_dims", "export_spec",
           "to_export_arg", "var_keyword_names", "export_program", "flat_inputs", "dynamic_dims_of", "grown_inputs",
           "in_capture_order"]

DYNAMIC_META = "fxprune_dynamic_dims"


def flat_inputs(args: tuple, kwargs: dict | None) -> list:
    """The leaves of (args, kwargs) in the order of the captured graph's placeholders."""
    return pytree.tree_leaves((tuple(args), dict(kwargs or {})))


def default_dynamic_shapes(args: tuple, kwargs: dict) -> tuple | None:
    """``(args_spec, kwargs_spec)`` making dim 0 dynamic for every tensor (nested ones too) whose dim 0 equals
    the first tensor's: the batch. None when there is no tensor input."""
    leaves = [t for t in flat_inputs(args, kwargs) if isinstance(t, torch.Tensor) and t.dim() >= 1]
    if not leaves:
        return None
    batch, dim = leaves[0].shape[0], Dim("batch")

    def spec(t):
        return {0: dim} if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == batch else None

    return (tuple(pytree.tree_map(spec, a) for a in args),
            {k: pytree.tree_map(spec, v) for k, v in kwargs.items()})


def bind_spec(model: torch.nn.Module, args: tuple, kwargs: dict, dynamic_shapes) -> tuple[tuple, dict]:
    """A user's ``dynamic_shapes`` (dict by argument name, or a tuple/list in signature order) split as (args, kwargs)."""
    if isinstance(dynamic_shapes, dict):
        try:
            names = list(inspect.signature(model.forward).bind(*args, **kwargs).arguments)
        except (TypeError, ValueError):
            names = []
        positional = names[:len(args)]
        return (tuple(dynamic_shapes.get(n) for n in positional),
                {k: dynamic_shapes.get(k) for k in kwargs})
    specs = list(dynamic_shapes)
    return tuple(specs[:len(args)]), dict(zip(kwargs, specs[len(args):]))


def widen_size_one(args: tuple, kwargs: dict, spec: tuple[tuple, dict]) -> tuple[tuple, dict]:
    """Repeat every dynamic dim of size 1 to size 2, where torch.export would specialise it.

    Tensors are matched with their spec (a ``{dim: Dim}`` dict) through nested tuples, lists and dicts.
    """
    def widen(t, s):
        if isinstance(t, torch.Tensor) and isinstance(s, dict):
            for d, v in s.items():
                if isinstance(d, int) and v is not None and t.dim() > d and t.shape[d] == 1:
                    t = torch.cat([t, t], dim=d)
            return t
        if isinstance(t, (tuple, list)) and isinstance(s, (tuple, list)) and len(t) == len(s):
            return type(t)(widen(a, b) for a, b in zip(t, s))
        if isinstance(t, dict) and isinstance(s, dict):
            return {k: widen(v, s.get(k)) for k, v in t.items()}
        return t

    return (tuple(widen(t, s) for t, s in zip(args, spec[0])),
            {k: widen(v, spec[1].get(k)) for k, v in kwargs.items()})


def recorded_dims(gm: torch.fx.GraphModule, range_constraints: dict) -> dict[str, dict[int, tuple]]:
    """Per input placeholder, its symbolic dims as ``{dim: (name, min, max)}`` (max None: unbounded).

    Keyed by the placeholder's target, ``forward``'s argument name, which a re-export binds and the
    ONNX input is called; its node name can differ (torch.export names ``nn.Sequential``'s ``input``
    argument ``input_1``, away from the builtin). Dims that share a symbol share a name, so equal
    sizes stay equal in every export.
    """
    names: dict = {}
    out: dict[str, dict[int, tuple]] = {}
    for node in gm.graph.nodes:
        if node.op != "placeholder" or not isinstance(node.meta.get("val"), torch.Tensor):
            continue
        arg = str(node.target)
        for d, size in enumerate(node.meta["val"].shape):
            if not isinstance(size, torch.SymInt):
                continue
            expr = size.node.expr
            if not expr.is_symbol:
                continue  # a derived size (2*s0): left to torch.export to infer
            if expr not in names:
                names[expr] = "batch" if d == 0 and "batch" not in names.values() else f"{arg}_dim{d}"
            vr = range_constraints.get(expr)
            lo, hi = (_bound(vr.lower), _bound(vr.upper)) if vr is not None else (0, None)
            lo = lo or 0
            out.setdefault(arg, {})[d] = (names[expr], lo, hi)
    return out


def _bound(value) -> int | None:
    """A range bound as an int, None when unbounded (torch's int_oo)."""
    if value in (int_oo, -int_oo):
        return None
    return int(value)


def grown_inputs(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """The example with every dynamic dim one larger (within its range), or None if none is dynamic.

    The compact pass is checked there too: a size rewritten wrongly for a dynamic dim would
    pass at the example's shape and fail at this one.
    """
    dims = dynamic_dims_of(module)
    names = _input_names(module) if dims else []
    leaves, spec = pytree.tree_flatten((tuple(args), in_capture_order(module, kwargs)))
    if not dims or len(names) != len(leaves):
        return None
    grown = []
    for name, t in zip(names, leaves):
        for d, (_, _, hi) in sorted(dims.get(name, {}).items()):
            if isinstance(t, torch.Tensor) and (hi is None or t.shape[d] < hi):
                t = torch.cat([t, t.narrow(d, 0, 1)], dim=d)
        grown.append(t)
    return pytree.tree_unflatten(grown, spec)


def _input_names(module: torch.fx.GraphModule) -> list[str]:
    """The graph's input placeholders in order, by target: the names :func:`recorded_dims` keys its dims by."""
    return [str(n.target) for n in module.graph.nodes if n.op == "placeholder"]


def in_capture_order(module: torch.nn.Module, kwargs: dict) -> dict:
    """``kwargs`` in the order of the captured graph's keyword placeholders (torch.export's input tree), so their
    leaves pair with the placeholders whatever order the caller wrote them in; as given where there is no tree."""
    in_spec = getattr(module, "_in_spec", None)
    keys = list(in_spec.child(1).context or []) if in_spec is not None and in_spec.num_children == 2 else []
    return {k: kwargs[k] for k in keys} if set(keys) == set(kwargs) else dict(kwargs)


def dynamic_dims_of(module: torch.nn.Module) -> dict[str, dict[int, tuple]]:
    """What :func:`recorded_dims` stored on a captured (or compacted) graph module; {} for other modules."""
    meta = getattr(module, "meta", None)
    return dict(meta.get(DYNAMIC_META, {})) if isinstance(meta, dict) else {}


def export_spec(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """``(args_spec, kwargs_spec)`` that re-exports ``module`` with the dims its capture made dynamic, or None.

    A captured graph has one placeholder per tensor leaf of the inputs: a tuple or dict argument's
    tensors are placeholders of their own (``pair_0``, ``inputs_mask``). Where the graph carries
    torch.export's input tree, each leaf's dims go back to its place in that tree, so nested inputs
    stay dynamic; otherwise dims are matched to ``forward``'s argument names.
    """
    dims = dynamic_dims_of(module)
    if not dims:
        return None
    made: dict[str, Dim] = {}

    def dim(name, lo, hi):
        if name not in made:
            made[name] = Dim(name, min=lo, max=hi) if hi is not None else Dim(name, min=lo)
        return made[name]

    def leaf(name):
        return {d: dim(*v) for d, v in dims[name].items()} if name in dims else None

    by_tree = _spec_by_input_tree(module, args, kwargs, leaf)
    if by_tree is not None:
        return by_tree
    try:
        names = list(inspect.signature(module.forward).bind(*args, **kwargs).arguments)
    except (TypeError, ValueError):
        names = []
    spec = {n: leaf(n) for n in names}
    if not any(spec.values()):  # never export the example's shapes in silence
        warnings.warn(f"the dynamic dims recorded at capture ({', '.join(sorted(dims))}) match no argument of "
                      f"{type(module).__name__}.forward ({', '.join(names) or 'the inputs do not bind'}), so this "
                      "export accepts only the example's shapes; pass dynamic_shapes= to choose them", UserWarning,
                      stacklevel=3)
        return None
    return tuple(spec[n] for n in names[:len(args)]), {k: spec.get(k) for k in kwargs}


def _spec_by_input_tree(module: torch.nn.Module, args: tuple, kwargs: dict, leaf) -> tuple[tuple, dict] | None:
    """The per-leaf specs put back in the structure of the inputs, through the input tree torch.export
    left on the unlifted graph (``_in_spec``); None where that tree is missing or does not fit these inputs."""
    in_spec = getattr(module, "_in_spec", None)
    placeholders = _input_names(module) if isinstance(module, torch.fx.GraphModule) else []
    if in_spec is None or in_spec.num_leaves != len(placeholders):
        return None
    try:  # the inputs given here must have the captured structure (keyword order aside)
        given = pytree.tree_structure((tuple(args), in_capture_order(module, kwargs)))
    except Exception:  # noqa: BLE001 - an input pytree cannot flatten: fall back to argument names
        return None
    if given != in_spec:
        return None
    args_spec, kwargs_spec = pytree.tree_unflatten([leaf(name) for name in placeholders], in_spec)
    return tuple(args_spec), {k: kwargs_spec[k] for k in kwargs}


def to_export_arg(module: torch.nn.Module, spec: tuple[tuple, dict], args: tuple, kwargs: dict):
    """``(args_spec, kwargs_spec)`` as the dict by ``forward``'s parameter names that ``torch.export`` takes
    (a ``*args`` parameter gets the tuple of its arguments' specs, a ``**kwargs`` one the dict of its)."""
    args_spec, kwargs_spec = spec
    signature = inspect.signature(module.forward)
    out, i = {}, 0
    for name, value in signature.bind(*args, **kwargs).arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            out[name], i = tuple(args_spec[i:i + len(value)]), i + len(value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            out[name] = {k: kwargs_spec.get(k) for k in value}
        elif name in kwargs:
            out[name] = kwargs_spec.get(name)
        else:
            out[name], i = args_spec[i], i + 1
    return out


def var_keyword_names(module: torch.nn.Module, args: tuple, kwargs: dict) -> list[str]:
    """Keyword inputs that land in ``forward``'s ``**kwargs`` (torch.export cannot pair dynamic shapes with them)."""
    try:
        signature = inspect.signature(module.forward)
        bound = signature.bind(*args, **kwargs).arguments
    except (TypeError, ValueError):
        return []
    return [k for name, value in bound.items() if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD
            for k in value]


def export_program(module: torch.nn.Module, args: tuple, kwargs: dict | None = None,
                   dynamic_shapes=None) -> torch.export.ExportedProgram:
    """``torch.export`` of ``module``, keeping dynamic the dims its capture made dynamic (or ``dynamic_shapes``).

    A captured or compact graph module re-exports with the dims recorded at capture, so
    its ``.pt2`` and ONNX file accept the same shapes as the graph itself.
    """
    kwargs = in_capture_order(module, dict(kwargs or {}))
    if dynamic_shapes is not None:
        return torch.export.export(module, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    spec = export_spec(module, args, kwargs)
    if spec is None:
        return torch.export.export(module, args, kwargs, strict=False)
    wide_args, wide_kwargs = widen_size_one(args, kwargs, spec)
    return torch.export.export(module, wide_args, wide_kwargs, strict=False,
                               dynamic_shapes=to_export_arg(module, spec, wide_args, wide_kwargs))
