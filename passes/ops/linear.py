"""Linear layers, matrix products and attention.

A contraction couples the two operands' reduced dims only where a parameter sits on
one side (``x @ W``): masking the parameter makes removed channels contribute nothing.
A product of two activations freezes its reduced dim, because a zeroed channel of one
would still be multiplied by the other's. Attention passes heads through (grouped-query
heads as blocks) and freezes the q.k contraction. A grouped matmul (mixture-of-experts
layers) multiplies each run of rows by its expert's matrix; the experts share the in and
out channels of their stacked weight, so an expert channel goes from every expert at once.
An einsum is read letter by letter: kept letters pass through, summed ones contract.
"""

from __future__ import annotations

import math

import torch
from torch.fx import Node

from fxprune.passes.ops.arguments import arg
from fxprune.passes.ops.registry import register

__all__ = ["param_backed", "GROUPED_MM"]

# transformers registers it when its MoE code is imported; the table names it, so nothing here imports transformers
GROUPED_MM = "transformers.grouped_mm_fallback.default"

aten = torch.ops.aten


def _linear_macs(args, out) -> int:
    return out.numel() * args[1].shape[1]


@register(aten.linear.default, macs=_linear_macs)
def _linear(node: Node, c) -> None:
    """y = x W^T + b: x[-1] = W cols, y[-1] = W rows = b; leading dims pass through."""
    x, w, b = node.args[0], node.args[1], arg(node, 2, "bias")
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


# ops that move or copy a tensor's elements without mixing them: a parameter seen through them still has
# its masked elements at zero (``x @ self.weight.T``)
_LAYOUT = {aten.t.default, aten.numpy_T.default, aten.transpose.int, aten.permute.default, aten.view.default,
           aten.reshape.default, aten._to_copy.default, aten.to.dtype, aten.contiguous.default, aten.clone.default,
           aten.alias.default, aten.index.Tensor}  # index: the experts' weights picked per row (``w[expert_ids]``)


def param_backed(value, c) -> bool:
    """A parameter, or a parameter seen through layout and dtype ops only."""
    while isinstance(value, Node) and not c.is_param(value):
        if value.op != "call_function" or value.target not in _LAYOUT:
            return False
        value = value.args[0]
    return isinstance(value, Node)


def _mm(node: Node, c, a, b) -> None:
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
    if param_backed(a, c) or param_backed(b, c):
        c.identity(a, -1, b, -2)
    else:
        c.freeze(a, -1, "matmul of two activations reduces over this dim")
        c.freeze(b, -2, "matmul of two activations reduces over this dim")


def _matmul_macs(args, out) -> int:
    return out.numel() * args[0].shape[-1]


@register(aten.matmul.default, aten.mm.default, aten.bmm.default, macs=_matmul_macs)
def _matmul(node: Node, c) -> None:
    """Batch dims pass through; a[-1] and b[-2] are the contraction."""
    _mm(node, c, node.args[0], node.args[1])


def _addmm_macs(args, out) -> int:
    return out.numel() * args[1].shape[-1]


@register(aten.addmm.default, macs=_addmm_macs)
def _addmm(node: Node, c) -> None:
    """bias + a @ b: the bias broadcasts to the product."""
    bias = node.args[0]
    _mm(node, c, node.args[1], node.args[2])
    bs = c.shape(bias)
    for i in range(1, len(bs) + 1):
        if bs[-i] == c.shape(node)[-i]:
            c.identity(bias, -i, node, -i)


def _grouped_mm_macs(args, out) -> int:
    return out.numel() * args[0].shape[-1]


@register(GROUPED_MM, macs=_grouped_mm_macs)
def _grouped_mm(node: Node, c) -> None:
    """out[s] = x[s] @ w[e(s)], rows sorted by expert (Hugging Face MoE): x[0] = out[0], x[1] = w[1] is the
    contraction, w[2] = out[1]; which expert a row takes is data, so the experts dim is frozen."""
    x, w = node.args[0], node.args[1]
    xs, ws = c.shape(x), c.shape(w)
    if xs is None or ws is None or len(xs) != 2 or len(ws) != 3:
        c.freeze_all(node, "grouped matmul other than [rows, in] x [experts, in, out]")
        return
    c.identity(x, 0, node, 0)
    c.identity(w, 2, node, 1)
    c.freeze(w, 0, "experts of a grouped matmul (each row's expert is data)")
    if param_backed(w, c):
        c.identity(x, 1, w, 1)
    else:
        c.freeze(x, 1, "grouped matmul with weights that are not parameters")
        c.freeze(w, 1, "grouped matmul with weights that are not parameters")


def _einsum_letters(equation: str, ranks: list[int]) -> tuple[list[str], str] | None:
    """Each operand's letters and the output's, ``...`` spelled out as letters of its own; None if not parsable."""
    equation = equation.replace(" ", "")
    inputs, _, output = equation.partition("->")
    terms = inputs.split(",")
    if len(terms) != len(ranks) or not _:
        return None
    spare = [chr(c) for c in range(0x100, 0x100 + 64)]  # letters no equation uses, for the ellipsis dims
    widest = max((r - len(t.replace("...", "")) for t, r in zip(terms, ranks) if "..." in t), default=0)
    ellipsis = "".join(spare[:widest])

    def spell(term: str, rank: int | None) -> str:
        if "..." not in term:
            return term
        n = widest if rank is None else rank - len(term.replace("...", ""))
        return term.replace("...", ellipsis[len(ellipsis) - n:])  # broadcast from the right

    letters = [spell(t, r) for t, r in zip(terms, ranks)]
    if any(len(t) != r for t, r in zip(letters, ranks)):
        return None
    return letters, spell(output, None)


def _einsum_macs(args, out) -> int:
    equation, operands = args[0], args[1]
    parsed = _einsum_letters(equation, [t.dim() for t in operands])
    if parsed is None:
        return 0
    sizes = {}
    for letters, t in zip(parsed[0], operands):
        sizes.update({c: max(sizes.get(c, 1), n) for c, n in zip(letters, t.shape)})
    return math.prod(sizes.values()) if len(operands) > 1 else 0


@register(aten.einsum.default, macs=_einsum_macs)
def _einsum(node: Node, c) -> None:
    """A letter in the output passes through from every operand that has it; a letter summed away is a
    contraction, prunable only between two operands one of which is a parameter (as in a matmul)."""
    equation, operands = node.args[0], list(node.args[1])
    shapes = [c.shape(t) for t in operands]
    parsed = _einsum_letters(equation, [len(s) if s is not None else -1 for s in shapes])
    if parsed is None or any(len(set(t)) != len(t) for t in parsed[0]):
        c.freeze_all(node, "einsum with a repeated index or an equation not read")
        return
    letters, output = parsed
    where: dict[str, list] = {}
    for t, term in zip(operands, letters):
        for d, letter in enumerate(term):
            where.setdefault(letter, []).append((t, d))
    for letter, places in where.items():
        if letter in output:
            for t, d in places:
                c.identity(t, d, node, output.index(letter))
        elif len(places) == 2 and any(param_backed(t, c) for t, _ in places):
            (a, da), (b, db) = places
            c.identity(a, da, b, db)
        else:
            for t, d in places:
                c.freeze(t, d, "einsum sums over this dim without a parameter on one side")


def _sdpa_macs(args, out) -> int:
    q, k, v = args[:3]
    b_h_sq = q.numel() // q.shape[-1]
    return b_h_sq * k.shape[-2] * (q.shape[-1] + v.shape[-1])


@register(aten.scaled_dot_product_attention.default, macs=_sdpa_macs)
def _sdpa(node: Node, c) -> None:
    """Heads pass through (grouped-query heads as blocks); the q.k contraction dim is frozen."""
    q, k, v = node.args[:3]
    mask = arg(node, 3, "attn_mask")
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
