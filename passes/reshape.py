"""Reshapes that merge or split dims: which channels survive, found by factoring sizes.

A dim-for-dim reshape couples at once (see :mod:`fxprune.passes.ops.layout`). One that
merges or splits dims ([B, H*D] -> [B*H, D]) is resolved here, after every other rule
has run, so that it knows which dims are already frozen: both sides are cut into their
common refinement of factors, and each dim carries at most one factor across (the
outermost one still free: the heads, not head_dim). Dynamic dims are handled on their
exact symbolic sizes, refined at two values so a factor that moves with the batch is
never tied.
"""

from __future__ import annotations

import math

import networkx as nx
import numpy as np
import sympy

from fxprune.passes.couplings import Couplings, value_key

__all__ = ["resolve_reshapes", "factor_groups", "matched", "same"]


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
        groups = factor_groups(c.sizes(x), c.sizes(node))
        if not matched(groups, c.sizes(x), c.sizes(node)):
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


def matched(groups, a, b) -> bool:
    """Every non-1 dim of both sides is in a group whose products are equal."""
    def product(sizes, dims):
        return math.prod((sizes[d][1] for d in dims), start=1)

    used_a = sum(len(ga) for ga, _ in groups)
    used_b = sum(len(gb) for _, gb in groups)
    ones_a = sum(same(s, 1) for _, s in a)
    ones_b = sum(same(s, 1) for _, s in b)
    return (used_a + ones_a == len(a) and used_b + ones_b == len(b)
            and all(same(product(a, ga), product(b, gb)) for ga, gb in groups))


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


def factor_groups(a, b):
    """Pair up runs of dims (size-1 dims skipped) whose products are equal.

    ``a`` and ``b`` give every dim as (example size, size), the size an int or a sympy
    expression of dynamic dims. Products are compared exactly; the example sizes only
    decide which side takes the next dim. A run whose products never match comes last.
    """
    ia = [d for d, (_, s) in enumerate(a) if not same(s, 1)]
    ib = [d for d, (_, s) in enumerate(b) if not same(s, 1)]
    groups, p, q = [], 0, 0
    while p < len(ia) and q < len(ib):
        ga, gb = [ia[p]], [ib[q]]
        (ha, pa), (hb, pb) = a[ia[p]], b[ib[q]]
        p, q = p + 1, q + 1
        while not same(pa, pb):
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


def same(x, y) -> bool:
    """Exact equality of two sizes (ints, or sympy expressions of dynamic dims)."""
    if isinstance(x, int) and isinstance(y, int):
        return x == y
    return sympy.expand(x - y) == 0
