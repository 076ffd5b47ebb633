"""The rule table: one function per aten op family saying how channel dims couple.

A rule receives the node and the :class:`Couplings` being built and emits edges
(identity, offset, block, pairs) or freezes dims with a reason. An op with no rule
freezes every dim it touches: unknown means frozen, never guessed.

A dim may be coupled through a *reduction* only where a parameter sits on the
reducing side (conv/linear input channels, a matmul against a weight): masking that
parameter makes the removed channels contribute nothing, so removing them is exact.
Non-parametric reductions over a dim (softmax, mean, a matmul of two activations)
freeze it, because a zeroed channel would still change them. The exception is a
reduction inside a norm module (LayerNorm/RMSNorm statistics): it becomes a
:class:`NormSite`, and its group may be pruned on request, with the masked model
computing those statistics over kept channels only (:mod:`fxprune.norms`).
"""

from __future__ import annotations

import math
import operator

import networkx as nx
import numpy as np
import sympy
import torch
from torch.fx import Node

from fxprune.passes.couplings import Couplings, registrar, value_key

__all__ = ["RULES", "rule", "apply_rule", "resolve_reshapes"]

aten = torch.ops.aten
RULES: dict = {}
rule = registrar(RULES)  # every rule is registered in this module


def apply_rule(node: Node, c: Couplings) -> None:
    """Run the rule of one call_function node, or freeze what it touches if it has none."""
    c.node = node
    fn = RULES.get(node.target)
    if fn is not None:
        fn(node, c)
    elif c.output_keys(node):
        c.freeze_all(node, f"no rule for {_name(node.target)}")


def _name(target) -> str:
    return getattr(target, "__name__", str(target)) if not isinstance(target, torch._ops.OpOverload) else str(target)


def _arg(node: Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


# -- element-wise -------------------------------------------------------------------------

def _broadcast(node: Node, c: Couplings, out=None) -> None:
    """Each tensor argument's dims couple to the output's dims they broadcast to (right-aligned)."""
    out = node if out is None else out
    out_shape = c.shape(out)
    args = [a for a in list(node.args) + list(node.kwargs.values()) if c.is_tensor(a)]
    for a in args:
        shape = c.shape(a)
        if len(shape) > len(out_shape):
            c.freeze_all(node, "argument has more dims than the result")
            return
        for i in range(1, len(shape) + 1):
            if shape[-i] == out_shape[-i]:
                c.identity(a, -i, out, -i)
            elif shape[-i] != 1:
                c.freeze(a, -i, "unexpected broadcast")
                c.freeze(out, -i, "unexpected broadcast")


_ELEMENTWISE = [
    aten.relu.default, aten.relu_.default, aten.gelu.default, aten.gelu_.default, aten.silu.default,
    aten.silu_.default, aten.sigmoid.default, aten.sigmoid_.default, aten.tanh.default, aten.tanh_.default,
    aten.hardtanh.default, aten.hardtanh_.default, aten.hardswish.default, aten.hardswish_.default,
    aten.hardsigmoid.default, aten.hardsigmoid_.default, aten.leaky_relu.default, aten.leaky_relu_.default,
    aten.elu.default, aten.elu_.default, aten.mish.default, aten.softplus.default, aten.relu6.default,
    aten.prelu.default,
    aten.neg.default, aten.abs.default, aten.exp.default, aten.log.default, aten.sqrt.default,
    aten.rsqrt.default, aten.erf.default, aten.sin.default, aten.cos.default, aten.square.default,
    aten.reciprocal.default, aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default,
    aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor,
    aten.add.Tensor, aten.add_.Tensor, aten.sub.Tensor, aten.sub_.Tensor, aten.mul.Tensor, aten.mul_.Tensor,
    aten.div.Tensor, aten.div_.Tensor, aten.add.Scalar, aten.sub.Scalar, aten.mul.Scalar, aten.div.Scalar,
    aten.rsub.Scalar, aten.rsub.Tensor, aten.maximum.default, aten.minimum.default, aten.where.self,
    aten.masked_fill.Scalar, aten.masked_fill.Tensor,
    aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default,
    aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device,
    aten.dropout.default, aten.dropout_.default, aten.feature_dropout.default, aten.alpha_dropout.default,
    aten.zeros_like.default, aten.ones_like.default, aten.full_like.default, aten.empty_like.default,
    aten.lift_fresh_copy.default,
    aten.eq.Tensor, aten.eq.Scalar, aten.ne.Tensor, aten.ne.Scalar, aten.lt.Tensor, aten.lt.Scalar,
    aten.le.Tensor, aten.le.Scalar, aten.gt.Tensor, aten.gt.Scalar, aten.ge.Tensor, aten.ge.Scalar,
    aten.logical_and.default, aten.logical_or.default, aten.logical_not.default, aten.bitwise_and.Tensor,
    aten.bitwise_or.Tensor, aten.bitwise_not.default, aten.__and__.Tensor, aten.__or__.Tensor,
]
rule(*_ELEMENTWISE)(_broadcast)


@rule(aten.type_as.default)
def _type_as(node: Node, c: Couplings) -> None:
    """Output is the first argument, cast; the second only lends its dtype."""
    for d in range(len(c.shape(node))):
        c.identity(node.args[0], d, node, d)


# -- convolution --------------------------------------------------------------------------

@rule(aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.conv1d.padding,
      aten.conv2d.padding, aten.conv3d.padding)
def _conv_nd(node: Node, c: Couplings) -> None:
    """out channels = weight rows = bias; in channels = weight cols (per group); window dims frozen."""
    _conv(node, c, node.args[0], node.args[1], _arg(node, 2, "bias"), _arg(node, 6, "groups", 1), False)


@rule(aten.convolution.default)
def _convolution(node: Node, c: Couplings) -> None:
    _conv(node, c, node.args[0], node.args[1], node.args[2], node.args[8], bool(node.args[6]))


@rule(aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input)
def _conv_transpose(node: Node, c: Couplings) -> None:
    _conv(node, c, node.args[0], node.args[1], _arg(node, 2, "bias"), _arg(node, 6, "groups", 1), True)


def _conv(node, c, x, w, b, groups, transposed) -> None:
    xs, ws, os_ = c.shape(x), c.shape(w), c.shape(node)
    if len(xs) != len(ws) or not c.is_param(w):
        c.freeze_all(node, "convolution with an unbatched input or a weight that is not a parameter")
        return
    c.identity(x, 0, node, 0)
    for d in range(2, len(xs)):
        c.freeze(x, d, "convolution window")
        c.freeze(node, d, "convolution window")
        c.freeze(w, d, "convolution kernel")
    if isinstance(b, Node):
        c.identity(b, 0, node, 1)
    cin, cout = xs[1], os_[1]
    if transposed:
        if groups != 1:
            c.freeze_all(node, "grouped transposed convolution")
            return
        c.identity(x, 1, w, 0)
        c.identity(node, 1, w, 1)
        return
    c.identity(node, 1, w, 0)
    cin_g, cout_g = ws[1], cout // groups
    if groups == 1:
        c.identity(x, 1, w, 1)
    elif cin_g == 1:  # depthwise (channel multiplier cout_g)
        c.freeze(w, 1, "depthwise kernel has one input channel per group")
        c.block(x, 1, node, 1, cout_g)
    else:  # grouped: a whole group of in and out channels is one unit
        c.freeze(w, 1, "channels inside a convolution group")
        ci, co = np.arange(cin), np.arange(cout)
        c.pairs(x, 1, node, 1, ci, (ci // cin_g) * cout_g)
        c.pairs(node, 1, node, 1, co, (co // cout_g) * cout_g)


# -- linear algebra -----------------------------------------------------------------------

@rule(aten.linear.default)
def _linear(node: Node, c: Couplings) -> None:
    """y = x W^T + b: x[-1] = W cols, y[-1] = W rows = b; leading dims pass through."""
    x, w, b = node.args[0], node.args[1], _arg(node, 2, "bias")
    xs = c.shape(x)
    for d in range(len(xs) - 1):
        c.identity(x, d, node, d)
    c.identity(node, -1, w, 0)
    if isinstance(b, Node):
        c.identity(b, 0, node, -1)
    if c.is_param(w):
        c.identity(x, -1, w, 1)
    else:
        c.freeze(x, -1, "linear with a weight that is not a parameter")
        c.freeze(w, 1, "linear with a weight that is not a parameter")


@rule(aten.matmul.default, aten.mm.default, aten.bmm.default)
def _matmul(node: Node, c: Couplings) -> None:
    _mm(node, c, node.args[0], node.args[1])


@rule(aten.addmm.default)
def _addmm(node: Node, c: Couplings) -> None:
    bias = node.args[0]
    _mm(node, c, node.args[1], node.args[2])
    bs = c.shape(bias)
    for i in range(1, len(bs) + 1):
        if bs[-i] == c.shape(node)[-i]:
            c.identity(bias, -i, node, -i)


# ops that move or copy a tensor's elements without mixing them: a parameter seen through them still has
# its masked elements at zero (``x @ self.weight.T``)
_LAYOUT = {aten.t.default, aten.numpy_T.default, aten.transpose.int, aten.permute.default, aten.view.default,
           aten.reshape.default, aten._to_copy.default, aten.to.dtype, aten.contiguous.default, aten.clone.default,
           aten.alias.default}


def _param_backed(arg, c: Couplings) -> bool:
    """A parameter, or a parameter seen through layout and dtype ops only."""
    while isinstance(arg, Node) and not c.is_param(arg):
        if arg.op != "call_function" or arg.target not in _LAYOUT:
            return False
        arg = arg.args[0]
    return isinstance(arg, Node)


def _mm(node: Node, c: Couplings, a, b) -> None:
    as_, bs, os_ = c.shape(a), c.shape(b), c.shape(node)
    if len(as_) < 2 or len(bs) < 2:
        c.freeze_all(node, "matmul with a 1-D operand")
        return
    c.identity(a, -2, node, -2)
    c.identity(b, -1, node, -1)
    for operand, shape in ((a, as_), (b, bs)):
        for i in range(3, len(shape) + 1):
            if shape[-i] == os_[-i]:
                c.identity(operand, -i, node, -i)
    if _param_backed(a, c) or _param_backed(b, c):
        c.identity(a, -1, b, -2)
    else:
        c.freeze(a, -1, "matmul of two activations reduces over this dim")
        c.freeze(b, -2, "matmul of two activations reduces over this dim")


@rule(aten.scaled_dot_product_attention.default)
def _sdpa(node: Node, c: Couplings) -> None:
    """Heads pass through (grouped-query heads as blocks); the q.k contraction dim is frozen."""
    q, k, v = node.args[:3]
    mask = _arg(node, 3, "attn_mask")
    qs, ks = c.shape(q), c.shape(k)
    if len(qs) != 4 or len(ks) != 4:
        c.freeze_all(node, "attention on tensors that are not [batch, heads, seq, dim]")
        return
    for d in (0, 1, 2, 3):
        c.identity(q, d, node, d) if d != 3 else c.identity(v, 3, node, 3)
    c.identity(k, 0, v, 0)
    c.identity(k, 1, v, 1)
    c.identity(k, 2, v, 2)
    c.identity(q, 0, k, 0)
    if qs[1] == ks[1]:
        c.identity(q, 1, k, 1)
    elif ks[1] and qs[1] % ks[1] == 0:
        c.block(k, 1, q, 1, qs[1] // ks[1])
    else:
        c.freeze_all(node, "query heads are not a multiple of key/value heads")
    c.identity(q, 3, k, 3)
    c.freeze(q, 3, "attention scores contract over head_dim")
    if isinstance(mask, Node):
        ms = c.shape(mask)
        for i in range(1, len(ms) + 1):
            if i <= 2 or ms[-i] == 1:
                c.freeze(mask, -i, "attention mask")
            else:
                c.identity(mask, -i, node, -i)


# -- normalisation ------------------------------------------------------------------------

@rule(aten.batch_norm.default, aten.instance_norm.default, aten._native_batch_norm_legit_no_training.default)
def _batch_norm(node: Node, c: Couplings) -> None:
    """Per-channel statistics: weight, bias and running stats follow dim 1."""
    out = node if c.output_keys(node) == [node.name] else (node, 0)
    x = node.args[0]
    for d in range(len(c.shape(x))):
        c.identity(x, d, out, d)
    for p in node.args[1:5]:
        if isinstance(p, Node):
            c.identity(p, 0, out, 1)


@rule(aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default)
def _layer_norm(node: Node, c: Couplings) -> None:
    """Statistics span the normalised dims, so they are frozen; leading dims pass through."""
    out = node if c.output_keys(node) == [node.name] else (node, 0)
    x, shape = node.args[0], node.args[1]
    n = len(c.shape(x))
    for d in range(n):
        c.identity(x, d, out, d)
    for p in node.args[2:4]:
        if isinstance(p, Node):
            for i in range(1, len(c.shape(p)) + 1):
                c.identity(p, -i, out, -i)
    for d in range(n - len(shape), n):
        c.normalise(x, d, "normalisation statistics span this dim")


@rule(aten.group_norm.default)
def _group_norm(node: Node, c: Couplings) -> None:
    """Statistics span a group of channels: a whole group is one unit, so removing it is exact."""
    x, groups = node.args[0], node.args[1]
    xs = c.shape(x)
    for d in range(len(xs)):
        c.identity(x, d, node, d)
    for p in node.args[2:4]:
        if isinstance(p, Node):
            c.identity(p, 0, node, 1)
    size = xs[1] // groups
    ch = np.arange(xs[1])
    c.pairs(node, 1, node, 1, ch, (ch // size) * size)


# -- pooling and resampling ---------------------------------------------------------------

def _window(k: int):
    def window_rule(node: Node, c: Couplings) -> None:
        """Window ops act per channel: leading dims pass through, the last k are frozen."""
        outs = c.output_keys(node)
        out = node if outs == [node.name] else (node, 0)
        x = node.args[0]
        n = len(c.shape(x))
        for d in range(n - k):
            c.identity(x, d, out, d)
        for d in range(n - k, n):
            c.freeze(x, d, "pooling/resampling window")
            c.freeze(out, d, "pooling/resampling window")
        for extra in outs[1:]:
            c.freeze(extra, None, "pooling indices")

    return window_rule


rule(aten.max_pool1d.default, aten.avg_pool1d.default, aten.adaptive_avg_pool1d.default,
     aten.adaptive_max_pool1d.default)(_window(1))
rule(aten.max_pool2d.default, aten.avg_pool2d.default, aten.adaptive_avg_pool2d.default,
     aten.adaptive_max_pool2d.default, aten.max_pool2d_with_indices.default,
     aten.upsample_nearest2d.vec, aten.upsample_bilinear2d.vec, aten._adaptive_avg_pool2d.default)(_window(2))
rule(aten.max_pool3d.default, aten.avg_pool3d.default, aten.adaptive_avg_pool3d.default,
     aten.adaptive_max_pool3d.default)(_window(3))


@rule(aten.pad.default, aten.constant_pad_nd.default)
def _pad(node: Node, c: Couplings) -> None:
    """Padded dims are frozen; the rest pass through."""
    x, pad = node.args[0], node.args[1]
    n = len(c.shape(x))
    padded = {n - 1 - i // 2 for i, p in enumerate(pad) if p != 0}
    for d in range(n):
        if d in padded:
            c.freeze(x, d, "padded dim")
            c.freeze(node, d, "padded dim")
        else:
            c.identity(x, d, node, d)


# -- reductions ---------------------------------------------------------------------------

@rule(aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default, aten.var.correction,
      aten.std.correction, aten.var.dim, aten.std.dim, aten.logsumexp.default, aten.norm.ScalarOpt_dim)
def _reduce(node: Node, c: Couplings) -> None:
    """Reduced dims are frozen (a zeroed channel would change the result); kept dims pass through."""
    x = node.args[0]
    n = len(c.shape(x))
    dims = _arg(node, 1, "dim")
    if dims is None or dims == []:
        dims = list(range(n))
    dims = {d % n for d in ([dims] if isinstance(dims, int) else dims)}
    keep = len(c.shape(node)) == n
    j = 0
    for d in range(n):
        if d in dims:
            c.normalise(x, d, "reduction over this dim")
            j += keep
        else:
            c.identity(x, d, node, j)
            j += 1


@rule(aten.mean.default, aten.sum.default)
def _reduce_all(node: Node, c: Couplings) -> None:
    c.freeze(node.args[0], None, "reduction over all dims")


@rule(aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default,
      aten.cumsum.default)
def _softmax(node: Node, c: Couplings) -> None:
    x, dim = node.args[0], node.args[1]
    for d in range(len(c.shape(x))):
        c.identity(x, d, node, d)
    c.freeze(node, dim, "softmax/cumsum normalises over this dim")


# -- shape ops ----------------------------------------------------------------------------

@rule(aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
      aten.unflatten.int, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.unsqueeze.default,
      aten.view_as.default, aten.reshape_as.default)
def _reshape(node: Node, c: Couplings) -> None:
    """Dim-for-dim reshapes (squeeze, unsqueeze, views that keep every dim) couple now; ones that
    merge or split dims are decided after every other rule has run (see :func:`resolve_reshapes`)."""
    groups = _factor_groups(c.sizes(node.args[0]), c.sizes(node))
    if _matched(groups, c.sizes(node.args[0]), c.sizes(node)) and all(len(ga) == 1 and len(gb) == 1
                                                                       for ga, gb in groups):
        for (da,), (db,) in groups:
            c.identity(node.args[0], da, node, db)
    else:
        c.deferred.append(node)


def resolve_reshapes(c: Couplings) -> None:
    """Couple the dims of every reshape, in graph order.

    Dims are matched by products; where several dims merge or split, both sides are
    cut into their common refinement of factors (e.g. [B, H*D] -> [B*H, D] gives B, H,
    D). Each dim can carry one factor across, so that a channel stays one index set:
    the outermost factor whose two dims are not already frozen is tied (heads rather
    than head_dim, the flattened channel rather than its pixels, E of a packed
    [3, E] projection whose "3" is split by select); dims left without a factor are
    frozen. Frozen-ness so far is tracked with a union-find over spaces.
    """
    uf = nx.utils.UnionFind()
    for e in c.edges:
        uf.union(e.a, e.b)
    frozen_roots = {uf[s] for s in c.frozen}
    live: dict = {}  # root -> {dim size: (stride, size)} of the factor a merged dim carries

    def frozen(space):
        return uf[space] in frozen_roots

    def dead_factor(space, n, stride, size):
        """A sub-factor of a merged dim other than the one that dim carries (B of B*H, say)."""
        carried = live.get(uf[space], {}).get(n)
        return size < n and carried is not None and carried != (stride, size)

    for node in c.deferred:
        c.node = node
        x = node.args[0]
        a, b = c.shape(x), c.shape(node)
        kx, kn = value_key(x), node.name
        groups = _factor_groups(c.sizes(x), c.sizes(node))
        if not _matched(groups, c.sizes(x), c.sizes(node)):
            c.freeze_all(node, "reshape whose sizes do not match up")
            frozen_roots |= {uf[(k, d)] for k in (kx, kn) for d in range(len(c.shapes[k]))}
            continue
        for ga, gb in groups:
            if len(ga) == 1 and len(gb) == 1:
                c.identity(x, ga[0], node, gb[0])
                uf.union((kx, ga[0]), (kn, gb[0]))
                continue
            factors, dynamic = _static_refine(c, x, ga, node, gb)
            if factors is None:  # dynamic dims interleave with static ones: nothing can be cut out
                for key, dims in ((kx, ga), (kn, gb)):
                    for d in dims:
                        c.freeze(key, d, "dim merged with a dynamic dim by a reshape")
                        frozen_roots.add(uf[(key, d)])
                continue
            tied_a, tied_b = set(), set()
            for (size, da, sa, db, sb), moves in zip(factors, dynamic):
                if moves or da in tied_a or db in tied_b or frozen((kx, da)) or frozen((kn, db)):
                    continue
                if dead_factor((kx, da), a[da], sa, size) or dead_factor((kn, db), b[db], sb, size):
                    continue
                _tie_factor(c, x, da, a[da], sa, node, db, b[db], sb, size)
                merged = {**live.pop(uf[(kx, da)], {}), **live.pop(uf[(kn, db)], {})}
                uf.union((kx, da), (kn, db))
                for n, stride in ((a[da], sa), (b[db], sb)):
                    if size < n:
                        merged[n] = (stride, size)
                if merged:
                    live[uf[(kx, da)]] = merged
                tied_a.add(da)
                tied_b.add(db)
            for key, dims, tied, shape in ((kx, ga, tied_a, a), (kn, gb, tied_b, b)):
                for d in dims:
                    if d not in tied:
                        c.freeze(key, d, "dim split or merged by a reshape")
                        frozen_roots.add(uf[(key, d)])
                    elif frozen((key, d)):
                        frozen_roots.add(uf[(key, d)])


def _matched(groups, a, b) -> bool:
    """Every non-1 dim of both sides is in a group whose products are equal."""
    def product(sizes, dims):
        return math.prod((sizes[d][1] for d in dims), start=1)

    used_a = sum(len(ga) for ga, _ in groups)
    used_b = sum(len(gb) for _, gb in groups)
    ones_a = sum(_same(s, 1) for _, s in a)
    ones_b = sum(_same(s, 1) for _, s in b)
    return (used_a + ones_a == len(a) and used_b + ones_b == len(b)
            and all(_same(product(a, ga), product(b, gb)) for ga, gb in groups))


def _static_refine(c: Couplings, x, ga, node, gb):
    """:func:`_refine` of a group that may hold dynamic dims, done at two values of the dynamic dims.

    A factor whose size or position differs between the two (the batch of a batch*heads dim)
    follows a dynamic dim: it is flagged and never tied. A static factor at a fixed position
    (the heads inside it) can be. Returns (factors at the example sizes, flags), or (None, None)
    when the two refinements do not line up.
    """
    a, b = c.sizes(x), c.sizes(node)
    entries = [a[d] for d in ga] + [b[d] for d in gb]
    example = _refine([(d, a[d][0]) for d in ga], [(d, b[d][0]) for d in gb])
    if all(isinstance(e, int) for _, e in entries):
        return example, [False] * len(example)
    symbols = set().union(*(e.free_symbols for _, e in entries if not isinstance(e, int)))
    if not example or not symbols <= set(c.hints):
        return None, None
    shift = {sym: c.hints[sym] + 1 for sym in symbols}

    def at(entry):
        _, e = entry
        return e if isinstance(e, int) else int(e.subs(shift))

    other = _refine([(d, at(a[d])) for d in ga], [(d, at(b[d])) for d in gb])
    if len(other) != len(example) or any(f[1] != g[1] or f[3] != g[3] for f, g in zip(example, other)):
        return None, None
    return example, [f != g for f, g in zip(example, other)]


def _refine(dims_a, dims_b):
    """Common refinement of two factorisations of one size, outermost factor first.

    Yields (size, dim_a, stride_in_a, dim_b, stride_in_b) for each factor.
    """
    def strides(dims):
        out, s = [], 1
        for d, n in reversed(dims):
            out.append((d, s, n))
            s *= n
        return out, s

    sa, total = strides(dims_a)
    sb, _ = strides(dims_b)
    cuts = sorted({s for _, s, _ in sa} | {s for _, s, _ in sb} | {total})
    factors = []
    for lo, hi in zip(cuts, cuts[1:]):
        if hi % lo:
            return []
        da = next((d, lo // s) for d, s, n in sa if s <= lo < s * n)
        db = next((d, lo // s) for d, s, n in sb if s <= lo < s * n)
        factors.append((hi // lo, da[0], da[1], db[0], db[1]))
    return list(reversed(factors))


def _tie_factor(c: Couplings, x, da: int, na: int, sa: int, node, db: int, nb: int, sb: int, size: int) -> None:
    """Elements of both dims that share this factor's index are one channel."""
    ia, ib = np.arange(na), np.arange(nb)
    fa, fb = (ia // sa) % size, (ib // sb) % size
    c.pairs(x, da, node, db, ia, _first_with(fb, fa))
    c.pairs(node, db, node, db, ib, _first_with(fb, fb))


def _first_with(factor_index: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """For each wanted factor index, the first position of ``factor_index`` holding it."""
    first = np.full(factor_index.max() + 1, -1, dtype=np.int64)
    values, positions = np.unique(factor_index, return_index=True)
    first[values] = positions
    return first[wanted]


def _factor_groups(a, b):
    """Pair up runs of dims (size-1 dims skipped) whose products are equal.

    ``a`` and ``b`` give every dim as (example size, size), the size an int or a sympy
    expression of dynamic dims. Products are compared exactly; the example sizes only
    decide which side takes the next dim. A run whose products never match comes last.
    """
    ia = [d for d, (_, s) in enumerate(a) if not _same(s, 1)]
    ib = [d for d, (_, s) in enumerate(b) if not _same(s, 1)]
    groups, p, q = [], 0, 0
    while p < len(ia) and q < len(ib):
        ga, gb = [ia[p]], [ib[q]]
        (ha, pa), (hb, pb) = a[ia[p]], b[ib[q]]
        p, q = p + 1, q + 1
        while not _same(pa, pb):
            if ha is not None and hb is not None and ha < hb and p < len(ia):
                ga.append(ia[p])
                ha, pa = ha * a[ia[p]][0] if a[ia[p]][0] is not None else None, pa * a[ia[p]][1]
                p += 1
            elif ha is not None and hb is not None and hb < ha and q < len(ib):
                gb.append(ib[q])
                hb, pb = hb * b[ib[q]][0] if b[ib[q]][0] is not None else None, pb * b[ib[q]][1]
                q += 1
            else:
                return groups + [(ia[p - len(ga):], ib[q - len(gb):])]
        groups.append((ga, gb))
    return groups


def _same(x, y) -> bool:
    """Exact equality of two sizes (ints, or sympy expressions of dynamic dims)."""
    if isinstance(x, int) and isinstance(y, int):
        return x == y
    return sympy.expand(x - y) == 0


@rule(aten.permute.default)
def _permute(node: Node, c: Couplings) -> None:
    for i, d in enumerate(node.args[1]):
        c.identity(node.args[0], d, node, i)


@rule(aten.transpose.int, aten.swapaxes.default)
def _transpose(node: Node, c: Couplings) -> None:
    x = node.args[0]
    n = len(c.shape(x))
    d0, d1 = node.args[1] % n, node.args[2] % n
    for d in range(n):
        c.identity(x, d, node, d1 if d == d0 else d0 if d == d1 else d)


@rule(aten.t.default, aten.numpy_T.default)
def _t(node: Node, c: Couplings) -> None:
    x = node.args[0]
    n = len(c.shape(x))
    for d in range(n):
        c.identity(x, d, node, n - 1 - d)


@rule(aten.expand.default)
def _expand(node: Node, c: Couplings) -> None:
    _broadcast(node, c)


@rule(aten.cat.default, aten.concat.default)
def _cat(node: Node, c: Couplings) -> None:
    """Each input is a slice of the output along the cat dim."""
    tensors, dim = node.args[0], _arg(node, 1, "dim", 0)
    n = len(c.shape(node))
    dim %= n
    if any(c.is_dynamic(t, dim) for t in tensors if len(c.shape(t)) == n):
        c.freeze_all(node, "concatenation along a dynamic dim")
        return
    start = 0
    for t in tensors:
        shape = c.shape(t)
        if len(shape) != n:  # legacy empty tensors
            continue
        for d in range(n):
            if d == dim:
                c.offset(t, d, node, d, start)
            else:
                c.identity(t, d, node, d)
        start += shape[dim]


@rule(aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.split.sizes,
      aten.tensor_split.sections, aten.unsafe_split.Tensor)
def _split(node: Node, c: Couplings) -> None:
    """Each output is a slice of the input along the split dim."""
    x = node.args[0]
    dim = _arg(node, 2, "dim", 0) % len(c.shape(x))
    if c.is_dynamic(x, dim):
        c.freeze_all(node, "split along a dynamic dim")
        return
    start = 0
    for i, key in enumerate(c.output_keys(node)):
        shape = c.shapes[key]
        for d in range(len(shape)):
            if d == dim:
                c.offset(key, d, x, d, start)
            else:
                c.identity(key, d, x, d)
        start += shape[dim]


@rule(aten.slice.Tensor)
def _slice(node: Node, c: Couplings) -> None:
    x = node.args[0]
    n = len(c.shape(x))
    dim = _arg(node, 1, "dim", 0) % n
    if c.is_dynamic(x, dim) or any(isinstance(_arg(node, i, k), Node) for i, k in ((2, "start"), (3, "end"))):
        for d in range(n):
            if d != dim:
                c.identity(x, d, node, d)
        c.freeze(x, dim, "slice with a dynamic bound")
        c.freeze(node, dim, "slice with a dynamic bound")
        return
    start, _, step = _slice_bounds(node, c.shape(x)[dim])
    for d in range(n):
        if d != dim:
            c.identity(x, d, node, d)
        elif step == 1:
            c.offset(node, d, x, d, start)
        else:
            c.freeze(x, d, "strided slice")
            c.freeze(node, d, "strided slice")


def _slice_bounds(node: Node, size: int):
    start = _arg(node, 2, "start", None) or 0
    end = _arg(node, 3, "end", None)
    step = _arg(node, 4, "step", 1)
    start = start + size if start < 0 else min(start, size)
    end = size if end is None else (end + size if end < 0 else min(end, size))
    return start, end, step


@rule(aten.narrow.default)
def _narrow(node: Node, c: Couplings) -> None:
    """narrow(x, dim, start, length) is slice(x, dim, start, start + length)."""
    x, dim, start = node.args[0], node.args[1], node.args[2]
    n = len(c.shape(x))
    dim %= n
    if c.is_dynamic(x, dim) or isinstance(start, Node) or isinstance(node.args[3], Node):
        c.freeze_all(node, "narrow with a dynamic bound")
        return
    start = start + c.shape(x)[dim] if start < 0 else start
    for d in range(n):
        if d == dim:
            c.offset(node, d, x, d, start)
        else:
            c.identity(x, d, node, d)


@rule(aten.stack.default)
def _stack(node: Node, c: Couplings) -> None:
    """Every input's dims pass through; the new dim indexes the inputs (frozen: its size is their count)."""
    tensors, dim = node.args[0], _arg(node, 1, "dim", 0)
    n = len(c.shape(node))
    dim %= n
    for t in tensors:
        for d in range(n - 1):
            c.identity(t, d, node, d + (d >= dim))
    c.freeze(node, dim, "stacking dim")


@rule(aten.flip.default)
def _flip(node: Node, c: Couplings) -> None:
    """Flipped dims map index i to n-1-i."""
    x, dims = node.args[0], node.args[1]
    shape = c.shape(x)
    flipped = {d % len(shape) for d in dims}
    for d, size in enumerate(shape):
        if d in flipped and c.is_dynamic(x, d):
            c.freeze(x, d, "flip of a dynamic dim")
            c.freeze(node, d, "flip of a dynamic dim")
        elif d in flipped and size is not None:
            c.pairs(x, d, node, d, np.arange(size), size - 1 - np.arange(size))
        else:
            c.identity(x, d, node, d)


@rule(aten.select.int)
def _select(node: Node, c: Couplings) -> None:
    x, dim = node.args[0], node.args[1]
    n = len(c.shape(x))
    dim %= n
    c.freeze(x, dim, "select picks one index of this dim")
    for d in range(n):
        if d != dim:
            c.identity(x, d, node, d - (d > dim))


@rule(operator.getitem)
def _getitem(node: Node, c: Couplings) -> None:
    src, index = node.args
    if isinstance(src, Node) and isinstance(index, int) and c.is_tensor(node):
        key = f"{src.name}#{index}"
        if key in c.shapes:
            for d in range(len(c.shape(node))):
                c.identity(key, d, node, d)
            return
    if c.is_tensor(node):
        c.freeze(node, None, "indexing")


@rule(aten.embedding.default)
def _embedding(node: Node, c: Couplings) -> None:
    """Rows are the vocabulary (frozen); columns are the embedding channels."""
    w, idx = node.args[0], node.args[1]
    c.freeze(w, 0, "embedding vocabulary")
    c.identity(w, 1, node, -1)
    for d in range(len(c.shape(idx))):
        c.identity(idx, d, node, d)
