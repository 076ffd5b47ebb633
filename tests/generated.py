"""Random valid architectures for property tests of compaction.

An architecture is plain data, so a failing example prints as Python that can be
pasted into a regression test::

    {"input": (1, 3, 8, 8), "seed": 0,
     "program": [("conv", {"cout": 8, "k": 3, "stride": 1, "groups": 1, "bias": True, "norm": None, "act": None}),
                 ("dup", {}), ("act", {"fn": "relu"}), ("add", {"proj": False})]}

``program`` runs on a stack of tensors that starts with the model input. Each
op pops ``arity`` tensors, and pushes what its module returns. At the end the
stack holds the outputs (one tensor, or two returned as a tuple). Shapes are
known while drawing, so every drawn program is valid by construction.

Public API
----------
``architectures()``
    Hypothesis strategy of architecture dicts.
``build(arch, dtype=torch.float32)``
    ``(model, example_inputs)``: an ``nn.Module`` in eval mode with seeded random
    weights and non-trivial norm statistics, and a tuple with one input tensor.

Every op kind is one class below with ``applies`` (may it run on this stack?),
``draw`` (its random arguments), ``out`` (the shapes it pushes) and ``module``
(the ``nn.Module`` that computes it). Layouts: ``nchw`` images, ``nhwc``
channels-last images and ``nc`` feature vectors; the channel dim is 1, 3 and 1.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

from tests.models import randomize_norms

__all__ = ["architectures", "build", "KINDS", "Program"]

MIN_W, MAX_W = 2, 24  # channel widths drawn
MAX_STACK = 4  # live tensors at once
MAX_FLAT = 1536  # largest flatten -> linear input
ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "sigmoid": nn.Sigmoid, "hardswish": nn.Hardswish}


# -- shapes -------------------------------------------------------------------------------
# A stack entry is (layout, shape) with the batch dim included.

CHANNEL_DIM = {"nchw": 1, "nhwc": 3, "nc": 1}


def channels(t) -> int:
    layout, shape = t
    return shape[CHANNEL_DIM[layout]]


def with_channels(t, c: int):
    layout, shape = t
    shape = list(shape)
    shape[CHANNEL_DIM[layout]] = c
    return layout, tuple(shape)


def spatial(t) -> tuple:
    layout, shape = t
    return {"nchw": shape[2:], "nhwc": shape[1:3], "nc": ()}[layout]


def _conv_out(size: int, k: int, stride: int) -> int:
    return (size + 2 * (k // 2) - k) // stride + 1


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _width():
    return st.integers(MIN_W, MAX_W)


# -- op kinds -----------------------------------------------------------------------------

class Kind:
    """One op kind; ``arity`` tensors are popped (the last one was on top)."""

    arity = 1

    def applies(self, ins, depth: int, stack_len: int) -> bool:
        return True

    def draw(self, draw, ins, depth: int) -> dict:
        return {}

    def out(self, ins, a) -> list:
        return [ins[0]]

    def module(self, ins, a) -> nn.Module:
        raise NotImplementedError


class Act(Kind):
    def draw(self, draw, ins, depth):
        return {"fn": draw(st.sampled_from(sorted(ACTS)))}

    def module(self, ins, a):
        return ACTS[a["fn"]]()


class Conv(Kind):
    """Conv2d (groups 1, depthwise with multiplier 1-2, or grouped), optionally conv-norm-act as nn.Sequential."""

    def applies(self, ins, depth, n):
        return ins[0][0] == "nchw"

    def draw(self, draw, ins, depth):
        cin = channels(ins[0])
        kind = draw(st.sampled_from(["dense", "depthwise", "grouped"]))
        grouped = [g for g in _divisors(cin) if 1 < g < cin]
        if kind == "depthwise":
            groups = cin
            cout = cin * draw(st.sampled_from([1, 2] if 2 * cin <= MAX_W else [1]))
        elif kind == "grouped" and grouped:
            groups = draw(st.sampled_from(grouped))
            cout = groups * draw(st.integers(1, max(1, MAX_W // groups)))
        else:
            groups, cout = 1, draw(_width())
        small = min(spatial(ins[0])) < 2
        return {"cout": cout, "k": draw(st.sampled_from([1, 3])), "stride": 1 if small else draw(st.sampled_from([1, 2])),
                "groups": groups, "bias": draw(st.booleans()),
                "norm": draw(st.sampled_from([None, "bn"])), "act": draw(st.sampled_from([None, *sorted(ACTS)]))}

    def out(self, ins, a):
        n, _, h, w = ins[0][1]
        return [("nchw", (n, a["cout"], _conv_out(h, a["k"], a["stride"]), _conv_out(w, a["k"], a["stride"])))]

    def module(self, ins, a):
        conv = nn.Conv2d(channels(ins[0]), a["cout"], a["k"], a["stride"], a["k"] // 2, groups=a["groups"],
                         bias=a["bias"])
        if a["norm"] is None and a["act"] is None:
            return conv
        layers = [conv] + ([nn.BatchNorm2d(a["cout"])] if a["norm"] else []) + ([ACTS[a["act"]]()] if a["act"] else [])
        return nn.Sequential(*layers)


class Linear(Kind):
    """nn.Linear over the channel dim of channels-last images or feature vectors."""

    def applies(self, ins, depth, n):
        return ins[0][0] in ("nhwc", "nc")

    def draw(self, draw, ins, depth):
        return {"fout": draw(_width()), "bias": draw(st.booleans())}

    def out(self, ins, a):
        return [with_channels(ins[0], a["fout"])]

    def module(self, ins, a):
        return nn.Linear(channels(ins[0]), a["fout"], bias=a["bias"])


class BatchNorm(Kind):
    def applies(self, ins, depth, n):
        return ins[0][0] in ("nchw", "nc")

    def module(self, ins, a):
        return (nn.BatchNorm2d if ins[0][0] == "nchw" else nn.BatchNorm1d)(channels(ins[0]))


class LayerNorm(Kind):
    """LayerNorm or RMSNorm over the last dim (channels for nhwc / nc, width for nchw)."""

    def draw(self, draw, ins, depth):
        return {"affine": draw(st.booleans()), "rms": draw(st.booleans())}

    def module(self, ins, a):
        norm = nn.RMSNorm if a.get("rms") else nn.LayerNorm
        return norm(ins[0][1][-1], elementwise_affine=a["affine"])


class GroupNorm(Kind):
    """GroupNorm with groups dividing C, each group holding more than one value (torch requires it)."""

    def applies(self, ins, depth, n):
        return ins[0][0] == "nchw" and bool(self._groups(ins[0]))

    def _groups(self, t) -> list[int]:
        h, w = spatial(t)
        return [g for g in _divisors(channels(t)) if channels(t) // g * h * w > 1]

    def draw(self, draw, ins, depth):
        return {"groups": draw(st.sampled_from(self._groups(ins[0])))}

    def module(self, ins, a):
        return nn.GroupNorm(a["groups"], channels(ins[0]))


class Pool(Kind):
    """MaxPool2d / AvgPool2d, 2x2 stride 2 or 3x3 stride 1 padding 1."""

    def applies(self, ins, depth, n):
        return ins[0][0] == "nchw"

    def draw(self, draw, ins, depth):
        halve = min(spatial(ins[0])) >= 2 and draw(st.booleans())
        return {"fn": draw(st.sampled_from(["max", "avg"])), "k": 2 if halve else 3}

    def out(self, ins, a):
        n, c, h, w = ins[0][1]
        return [ins[0] if a["k"] == 3 else ("nchw", (n, c, h // 2, w // 2))]

    def module(self, ins, a):
        cls = nn.MaxPool2d if a["fn"] == "max" else nn.AvgPool2d
        return cls(2) if a["k"] == 2 else cls(3, 1, 1)


class _GlobalPool(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return x.mean(self.dims)


class GlobalPool(Kind):
    """Mean over the spatial dims: image -> feature vector."""

    def applies(self, ins, depth, n):
        return ins[0][0] != "nc"

    def out(self, ins, a):
        return [("nc", (ins[0][1][0], channels(ins[0])))]

    def module(self, ins, a):
        return _GlobalPool((2, 3) if ins[0][0] == "nchw" else (1, 2))


class _Permute(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return x.permute(*self.dims)


class ToChannelsLast(Kind):
    def applies(self, ins, depth, n):
        return ins[0][0] == "nchw"

    def out(self, ins, a):
        n, c, h, w = ins[0][1]
        return [("nhwc", (n, h, w, c))]

    def module(self, ins, a):
        return _Permute((0, 2, 3, 1))


class ToChannelsFirst(Kind):
    def applies(self, ins, depth, n):
        return ins[0][0] == "nhwc"

    def out(self, ins, a):
        n, h, w, c = ins[0][1]
        return [("nchw", (n, c, h, w))]

    def module(self, ins, a):
        return _Permute((0, 3, 1, 2))


def _numel(t) -> int:
    n = 1
    for s in t[1][1:]:
        n *= s
    return n


class Flatten(Kind):
    """torch.flatten(x, 1) of an image (channels-first or channels-last)."""

    def applies(self, ins, depth, n):
        return ins[0][0] != "nc" and _numel(ins[0]) <= MAX_FLAT

    def out(self, ins, a):
        return [("nc", (ins[0][1][0], _numel(ins[0])))]

    def module(self, ins, a):
        return nn.Flatten()


class Head(Flatten):
    """nn.Sequential(nn.Flatten(), nn.Linear(C*H*W, fout))."""

    def draw(self, draw, ins, depth):
        return {"fout": draw(_width())}

    def out(self, ins, a):
        return [("nc", (ins[0][1][0], a["fout"]))]

    def module(self, ins, a):
        return nn.Sequential(nn.Flatten(), nn.Linear(_numel(ins[0]), a["fout"]))


class _Slice(nn.Module):
    def __init__(self, layout, start, stop, step):
        super().__init__()
        self.layout, self.start, self.stop, self.step = layout, start, stop, step

    def forward(self, x):
        if self.layout == "nhwc":
            return x[..., self.start:self.stop:self.step]
        return x[:, self.start:self.stop:self.step]


class Slice(Kind):
    """x[:, a:b] (x[..., a:b] channels-last), sometimes with step 2."""

    def draw(self, draw, ins, depth):
        c = channels(ins[0])
        start = draw(st.integers(0, c - 1))
        stop = draw(st.integers(start + 1, c))
        return {"start": start, "stop": stop, "step": draw(st.sampled_from([1, 1, 1, 2]))}

    def out(self, ins, a):
        return [with_channels(ins[0], len(range(a["start"], a["stop"], a["step"])))]

    def module(self, ins, a):
        return _Slice(ins[0][0], a["start"], a["stop"], a["step"])


class _SEConv(nn.Module):
    def __init__(self, c, r):
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(c, r, 1), nn.Conv2d(r, c, 1)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(F.relu(self.reduce(s))))


class _SELinear(nn.Module):
    def __init__(self, c, r):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(c, r), nn.ReLU(), nn.Linear(r, c), nn.Sigmoid())

    def forward(self, x):
        s = self.fc(x.mean((2, 3)))
        return x * s[:, :, None, None]


class SqueezeExcite(Kind):
    """SE gate: mean over space, two 1x1 convs or linears, sigmoid, broadcast mul."""

    def applies(self, ins, depth, n):
        return ins[0][0] == "nchw"

    def draw(self, draw, ins, depth):
        return {"r": draw(_width()), "via": draw(st.sampled_from(["conv", "linear"]))}

    def module(self, ins, a):
        return (_SEConv if a["via"] == "conv" else _SELinear)(channels(ins[0]), a["r"])


# -- stack ops ---------------------------------------------------------------------------

class _Dup(nn.Module):
    def forward(self, x):
        return x, x


class Dup(Kind):
    """Branch: the top tensor is used twice."""

    def applies(self, ins, depth, n):
        return n < MAX_STACK

    def out(self, ins, a):
        return [ins[0], ins[0]]

    def module(self, ins, a):
        return _Dup()


class _Swap(nn.Module):
    def forward(self, a, b):
        return b, a


class Swap(Kind):
    arity = 2

    def out(self, ins, a):
        return [ins[1], ins[0]]

    def module(self, ins, a):
        return _Swap()


class _Split(nn.Module):
    def __init__(self, sizes, dim, chunk):
        super().__init__()
        self.sizes, self.dim, self.chunk = sizes, dim, chunk

    def forward(self, x):
        if self.chunk:
            return tuple(x.chunk(len(self.sizes), self.dim))
        return tuple(torch.split(x, self.sizes, self.dim))


class Split(Kind):
    """torch.split with random sizes, or chunk into equal pieces; pieces are pushed in order."""

    def applies(self, ins, depth, n):
        return channels(ins[0]) >= 2 and n < MAX_STACK

    def draw(self, draw, ins, depth):
        c = channels(ins[0])
        k = draw(st.integers(2, min(3, c)))
        if c % k == 0 and draw(st.booleans()):
            return {"sizes": [c // k] * k, "chunk": True}
        cuts = sorted(draw(st.sets(st.integers(1, c - 1), min_size=k - 1, max_size=k - 1)))
        return {"sizes": [b - a for a, b in zip([0] + cuts, cuts + [c])], "chunk": False}

    def out(self, ins, a):
        return [with_channels(ins[0], s) for s in a["sizes"]]

    def module(self, ins, a):
        return _Split(a["sizes"], CHANNEL_DIM[ins[0][0]], a["chunk"])


class _Add(nn.Module):
    def __init__(self, proj: nn.Module | None):
        super().__init__()
        self.proj = proj

    def forward(self, a, b):
        return a + (b if self.proj is None else self.proj(b))


class Add(Kind):
    """a + b of equal shapes, or a + conv1x1(b) when only the channel counts differ (images)."""

    arity = 2

    def applies(self, ins, depth, n):
        (la, sa), (lb, sb) = ins
        return sa == sb and la == lb or la == lb == "nchw" and spatial(ins[0]) == spatial(ins[1])

    def draw(self, draw, ins, depth):
        return {"proj": ins[0] != ins[1] or draw(st.booleans()) and ins[0][0] == "nchw"}

    def module(self, ins, a):
        return _Add(nn.Conv2d(channels(ins[1]), channels(ins[0]), 1) if a["proj"] else None)


class _Mul(nn.Module):
    def __init__(self, gate: bool):
        super().__init__()
        self.gate = gate

    def forward(self, a, b):
        return a * (torch.sigmoid(b) if self.gate else b)


class Mul(Kind):
    """a * sigmoid(b) (a gate from another branch) or a * b, equal shapes."""

    arity = 2

    def applies(self, ins, depth, n):
        return ins[0] == ins[1]

    def draw(self, draw, ins, depth):
        return {"gate": draw(st.booleans())}

    def module(self, ins, a):
        return _Mul(a["gate"])


class _Cat(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, a, b):
        return torch.cat([a, b], self.dim)


class Cat(Kind):
    """torch.cat along channels of two tensors with the same layout and other dims."""

    arity = 2

    def applies(self, ins, depth, n):
        return ins[0][0] == ins[1][0] and with_channels(ins[0], 0) == with_channels(ins[1], 0)

    def out(self, ins, a):
        return [with_channels(ins[0], channels(ins[0]) + channels(ins[1]))]

    def module(self, ins, a):
        return _Cat(CHANNEL_DIM[ins[0][0]])


class _Block(nn.Module):
    def __init__(self, body: "Program", proj: nn.Module | None, residual: bool):
        super().__init__()
        self.body, self.proj, self.residual = body, proj, residual

    def forward(self, x):
        y = self.body(x)
        if not self.residual:
            return y
        return y + (x if self.proj is None else self.proj(x))


class Block(Kind):
    """A nested custom submodule running a sub-program, with an optional residual (1x1 conv projection)."""

    def applies(self, ins, depth, n):
        return depth < 2

    def draw(self, draw, ins, depth):
        body, (out,) = draw(programs([ins[0]], 1, depth + 1, max_ops=4))
        if out[0] == ins[0][0] != "nhwc" and out != ins[0] and spatial(out) == spatial(ins[0]) and draw(st.booleans()):
            back = ("conv", {"cout": channels(ins[0]), "k": 1, "stride": 1, "groups": 1, "bias": True,
                             "norm": None, "act": None}) if out[0] == "nchw" else ("linear", {"fout": channels(ins[0]), "bias": True})
            body, out = body + [back], ins[0]  # a bottleneck: back to the input width, so the residual can be identity
        options = []
        if out == ins[0]:
            options += ["identity"] * 3
        if out[0] == ins[0][0] == "nchw" and spatial(out) == spatial(ins[0]):
            options += ["proj"] * 2
        return {"body": body, "residual": draw(st.sampled_from(options + ["none"]))}

    def out(self, ins, a):
        return run_shapes(a["body"], [ins[0]])

    def module(self, ins, a):
        (out,) = self.out(ins, a)
        proj = nn.Conv2d(channels(ins[0]), channels(out), 1) if a["residual"] == "proj" else None
        return _Block(Program(a["body"], [ins[0]]), proj, a["residual"] != "none")


class _CachedScale(nn.Module):
    """A per-channel scale read through a cache refreshed by ``train()``/``eval()`` (LeViT's attention biases):
    the captured graph reads the cache as a constant and never the parameter."""

    def __init__(self, c: int, layout: str):
        super().__init__()
        self.shape = (c, 1, 1) if layout == "nchw" else (c,)
        self.scale = nn.Parameter(torch.rand(c) + 0.5)
        self.cache = None

    @torch.no_grad()
    def train(self, mode: bool = True):
        super().train(mode)
        self.cache = None if mode else (2 * self.scale).view(self.shape)
        return self

    def forward(self, x):
        return x * ((2 * self.scale).view(self.shape) if self.training else self.cache)


class CachedScale(Kind):
    def module(self, ins, a):
        return _CachedScale(channels(ins[0]), ins[0][0])


KINDS: dict[str, Kind] = {
    "act": Act(), "conv": Conv(), "linear": Linear(), "batchnorm": BatchNorm(), "layernorm": LayerNorm(),
    "groupnorm": GroupNorm(), "pool": Pool(), "gpool": GlobalPool(), "to_nhwc": ToChannelsLast(),
    "to_nchw": ToChannelsFirst(), "flatten": Flatten(), "head": Head(), "slice": Slice(), "se": SqueezeExcite(),
    "dup": Dup(), "swap": Swap(), "split": Split(), "add": Add(), "mul": Mul(), "cat": Cat(), "block": Block(),
    "cached": CachedScale(),
}


# parametric layers are drawn more often, so that most programs have prunable channels; binary ops
# and the way back from channels-last are only offered when they apply, so they get a boost too
WEIGHTS = {"conv": 8, "linear": 6, "block": 3, "head": 2, "add": 4, "mul": 3, "cat": 2, "split": 2, "to_nchw": 3}


# -- programs -----------------------------------------------------------------------------

def _pop(stack: list, n: int) -> list:
    ins = stack[len(stack) - n:]
    del stack[len(stack) - n:]
    return ins


def run_shapes(program: list, stack: list) -> list:
    """The stack of (layout, shape) after running ``program`` on ``stack``."""
    stack = list(stack)
    for kind, a in program:
        k = KINDS[kind]
        stack.extend(k.out(_pop(stack, k.arity), a))
    return stack


class Program(nn.Module):
    """Runs a drawn program: a ModuleList with one module per op, on a stack of tensors."""

    def __init__(self, program: list, stack: list):
        super().__init__()
        self.ops = nn.ModuleList()
        self.arity = []
        stack = list(stack)
        for kind, a in program:
            k = KINDS[kind]
            ins = _pop(stack, k.arity)
            self.ops.append(k.module(ins, a))
            self.arity.append(k.arity)
            stack.extend(k.out(ins, a))

    def forward(self, *xs):
        stack = list(xs)
        for op, n in zip(self.ops, self.arity):
            out = op(*_pop(stack, n))
            stack.extend(out if isinstance(out, tuple) else (out,))
        return stack[0] if len(stack) == 1 else tuple(stack)


def _merge(stack: list, n_out: int) -> list:
    """Ops that reduce the stack to ``n_out`` tensors, using every tensor."""
    prog = []

    def do(kind, a):
        prog.append((kind, a))
        stack[:] = run_shapes([(kind, a)], stack)

    while len(stack) > n_out:
        a, b = stack[-2], stack[-1]
        if a == b:
            do("add", {"proj": False})
        elif KINDS["cat"].applies([a, b], 0, len(stack)):
            do("cat", {})
        else:
            if b[0] != "nc":
                do("gpool", {})
            do("swap", {})
            if a[0] != "nc":
                do("gpool", {})
            do("cat", {})
    if len(stack) < n_out:
        do("dup", {})
        do("act", {"fn": "sigmoid"})
    return prog


@st.composite
def programs(draw, stack: list, n_out: int, depth: int = 0, max_ops: int = 8, min_ops: int = 1):
    """(program, final stack) starting from ``stack`` and ending with ``n_out`` tensors."""
    stack = list(stack)
    program = []
    for _ in range(draw(st.integers(min_ops, max_ops))):
        choices = [name for name, k in KINDS.items()
                   if len(stack) >= k.arity and k.applies(stack[len(stack) - k.arity:], depth, len(stack))]
        kind = draw(st.sampled_from([name for name in choices for _ in range(WEIGHTS.get(name, 1))]))
        k = KINDS[kind]
        a = k.draw(draw, stack[len(stack) - k.arity:], depth)
        program.append((kind, a))
        stack = run_shapes([(kind, a)], stack)
    program += _merge(stack, n_out)
    return program, stack


@st.composite
def architectures(draw, min_ops: int = 2, max_ops: int = 10):
    """Architecture dicts: ``input`` shape, ``program`` (a stem conv/linear, then min_ops..max_ops drawn ops,
    then the ops that merge the stack into the outputs) and weight ``seed``."""
    if draw(st.sampled_from(["image", "image", "image", "mlp"])) == "image":
        shape = (1, 3, draw(st.sampled_from([8, 12, 16])), draw(st.sampled_from([8, 12, 16])))
        start = ("nchw", shape)
    else:
        shape = (2, draw(st.integers(MIN_W, MAX_W)))
        start = ("nc", shape)
    stem = ("conv" if start[0] == "nchw" else "linear",)  # a stem layer, so most programs have prunable channels
    stem += (KINDS[stem[0]].draw(draw, [start], 0),)
    program, _ = draw(programs(run_shapes([stem], [start]), draw(st.sampled_from([1, 2])), 0, max_ops, min_ops))
    return {"input": shape, "program": [stem] + program, "seed": draw(st.integers(0, 2**16))}


def build(arch: dict, dtype: torch.dtype = torch.float32):
    """``(model, (x,))`` for an architecture dict; seeded weights, random norm statistics, eval mode."""
    shape = tuple(arch["input"])
    start = ("nchw" if len(shape) == 4 else "nc", shape)
    torch.manual_seed(arch["seed"])
    model = randomize_norms(Program(arch["program"], [start]), seed=arch["seed"]).eval().to(dtype)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(arch["seed"] + 1), dtype=torch.float64)
    return model, (x.to(dtype),)
