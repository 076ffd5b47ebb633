"""The channel groups of :func:`fxprune.explain` as a graph over the model's layers, and its pictures.

Layers (modules with parameters) are nodes in model order. Each group is a path through the layers
it couples, so the edges of one colour are one group; a frozen parameter dim sits on its layer's node
with its reason. ``.dot`` needs nothing beyond networkx; ``.svg``, ``.png`` and ``.html`` draw with
matplotlib (the ``plot`` extra). An ``.html`` file is self-contained: an inline SVG (hover a layer or
an arc for the details) and tables of the groups and frozen dims, with no script and no network.
"""

from __future__ import annotations

import html
import io
import os
import re

import networkx as nx

from fxprune.report import layer_of

__all__ = ["FORMATS", "graph_format", "groups_graph", "draw_groups", "group_status"]

FORMATS = (".html", ".svg", ".dot", ".png")
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
           "#7f7f7f", "#aec7e8", "#ffbb78", "#98df8a", "#c5b0d5", "#c49c94", "#f7b6d2", "#9edae5")
_FROZEN = "#d62728"


def graph_format(path) -> str:
    """The format ``path`` asks for, by its extension; a ValueError names the ones there are."""
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext not in FORMATS:
        raise ValueError(f"{os.fspath(path)!r}: cannot draw a graph as {ext or 'a file without an extension'!r}; "
                         f"name the file {', '.join('*' + f for f in FORMATS)}")
    return ext


def group_status(group) -> str:
    """Whether the default config prunes ``group``, and if not what it takes."""
    if not group.restrictable:
        stuck = sorted({n.module for n in group.norms if n.input_dim is None})
        return f"frozen: statistics in {', '.join(stuck)} span it and cannot be restricted to kept channels"
    if group.normalized:
        return "pruned only with prune_hidden_size=True (norm statistics span it)"
    return "prunable"


def groups_graph(explanation) -> nx.MultiGraph:
    """Layers as nodes (attributes ``order``, ``groups``, ``frozen``: ``{"name[dim]": reason}``), one path per group.

    Edges are keyed by group index and carry ``group``, ``color`` and ``status``; graph attribute
    ``groups`` maps each group index to the layers it couples, in model order.
    """
    graph = nx.MultiGraph(groups={})
    layers = list(explanation.layers)
    for g in explanation.groups:
        layers += [layer_of(m.name) for m in g.parameters]
    layers += [layer_of(name) for name, _ in explanation.frozen_dims()]
    for order, layer in enumerate(dict.fromkeys(layers)):
        graph.add_node(layer, order=order, groups=[], frozen={})
    for g in explanation.groups:
        members = sorted({layer_of(m.name) for m in g.parameters}, key=lambda n: graph.nodes[n]["order"])
        graph.graph["groups"][g.index] = members
        for layer in members:
            graph.nodes[layer]["groups"].append(g.index)
        for a, b in zip(members, members[1:]):
            graph.add_edge(a, b, key=g.index, group=g.index, color=_color(g.index), status=group_status(g))
    for (name, dim), reason in sorted(explanation.frozen_dims().items()):
        graph.nodes[layer_of(name)]["frozen"][f"{name}[{dim}]"] = reason
    return graph


def draw_groups(explanation, path) -> None:
    """Write the groups graph to ``path`` as ``.html``, ``.svg``, ``.png`` or ``.dot`` (by its extension)."""
    ext = graph_format(path)
    graph = groups_graph(explanation)
    if ext == ".dot":
        text = _dot(graph, explanation)
    elif ext == ".png":
        _figure(graph, explanation, path)
        return
    else:
        svg = _svg(graph, explanation)
        text = svg if ext == ".svg" else _html(graph, explanation, svg)
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _color(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def _node_tip(graph, layer: str) -> str:
    data = graph.nodes[layer]
    lines = [layer, f"groups: {', '.join(map(str, data['groups'])) or 'none'}"]
    lines += [f"frozen {dim}: {reason}" for dim, reason in data["frozen"].items()]
    return "\n".join(lines)


def _group_tips(explanation) -> dict[int, str]:
    return {g.index: "\n".join([f"group {g.index}: {g.size} channels, {group_status(g)}"]
                               + [f"{m.name}[{m.dim}]" for m in g.parameters]) for g in explanation.groups}


# -- .dot ----------------------------------------------------------------------------------------
def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _dot(graph, explanation) -> str:
    """DOT by hand: networkx's writer needs pydot or pygraphviz, neither a dependency."""
    tips = _group_tips(explanation)
    lines = ["graph fxprune_groups {", "  graph [rankdir=LR, fontname=Helvetica];",
             '  node [shape=box, style="rounded,filled", fillcolor=white, fontname=Helvetica, fontsize=10];',
             "  edge [fontname=Helvetica, fontsize=8, penwidth=2];"]
    for layer, data in graph.nodes(data=True):
        attrs = {"tooltip": _quote(_node_tip(graph, layer))}
        if data["frozen"]:
            attrs.update(label=_quote("\n".join([layer, "frozen: " + ", ".join(data["frozen"])])),
                         color=_quote(_FROZEN), fillcolor=_quote("#fde0e0"))
        lines.append(f"  {_quote(layer)} [{', '.join(f'{k}={v}' for k, v in attrs.items())}];")
    for a, b, data in graph.edges(data=True):
        style = "solid" if data["status"] == "prunable" else "dashed"
        lines.append(f"  {_quote(a)} -- {_quote(b)} [color={_quote(data['color'])}, label=\"g{data['group']}\", "
                     f"style={style}, tooltip={_quote(tips[data['group']])}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


# -- matplotlib: an arc diagram --------------------------------------------------------------------
def _figure(graph, explanation, path=None):
    """Layers on a line in model order, each group's edges as arcs above it; returns the figure if no path."""
    from matplotlib.patches import Patch, PathPatch
    from matplotlib.path import Path

    from fxprune.plots import pyplot, save_figure

    plt = pyplot()
    x = {layer: data["order"] for layer, data in graph.nodes(data=True)}
    arcs = {}  # group -> [(start, stop, height)]
    for gi, members in graph.graph["groups"].items():
        pairs = list(zip(members, members[1:])) or [(members[0], members[0])]  # a group inside one layer: a loop
        arcs[gi] = [(x[a] - 0.2 * (a == b), x[b] + 0.2 * (a == b),
                     0.5 * max(x[b] - x[a], 0.25) ** 0.5 * (1 + 0.1 * (gi % 4))) for a, b in pairs]
    n = len(x)
    peak = max((h for spans in arcs.values() for *_, h in spans), default=0.5)
    fig, ax = plt.subplots(figsize=(min(max(6.0, 0.32 * n + 1.5), 60.0), 1.6 + 1.1 * peak))
    groups = {g.index: g for g in explanation.groups}
    handles = []
    for gi, spans in arcs.items():
        verts = [v for xa, xb, h in spans for v in ((xa, 0.0), ((xa + xb) / 2, 2 * h), (xb, 0.0))]
        codes = [Path.MOVETO, Path.CURVE3, Path.CURVE3] * len(spans)
        patch = PathPatch(Path(verts, codes), facecolor="none", edgecolor=_color(gi), linewidth=1.8, alpha=0.9,
                          linestyle="-" if group_status(groups[gi]) == "prunable" else "--")
        patch.set_gid(f"group-{gi}")
        ax.add_patch(patch)
        if len(handles) < 24:
            handles.append(Patch(color=_color(gi), label=f"group {gi} ({groups[gi].size} ch)"))
    pos = {layer: (order, 0.0) for layer, order in x.items()}
    for layer, data in graph.nodes(data=True):
        frozen = bool(data["frozen"])
        nodes = nx.draw_networkx_nodes(graph, pos, nodelist=[layer], ax=ax, node_size=60 if frozen else 40,
                                       node_color="#fde0e0" if frozen else "white",
                                       edgecolors=_FROZEN if frozen else "#333333", linewidths=1.2)
        nodes.set_gid(f"layer-{data['order']}")
        ax.text(x[layer], -0.08 * peak - 0.05, layer, rotation=90, ha="center", va="top", fontsize=7,
                color=_FROZEN if frozen else "#222222")
    if any(data["frozen"] for _, data in graph.nodes(data=True)):
        handles.append(Patch(facecolor="#fde0e0", edgecolor=_FROZEN, label="layer with frozen dims"))
    ax.set_xlim(-0.8, n - 0.2)
    ax.set_ylim(-0.05 * peak - 0.05, peak * 1.05 + 0.05)
    ax.axis("off")
    ax.set_title(f"{len(explanation.groups)} channel groups over {n} layers (a colour: one group; dashed: not "
                 "pruned by default)", fontsize=10, pad=8 + 12 * ((len(handles) + 5) // 6))
    if handles:
        ax.legend(handles=handles, fontsize=7, ncol=min(len(handles), 6), loc="lower left", frameon=False,
                  bbox_to_anchor=(0.0, 1.0))
    if path is None:
        return fig
    save_figure(fig, path, dpi=110, bbox_inches="tight")
    return None


def _svg(graph, explanation) -> str:
    """The arc diagram as SVG text, with a ``<title>`` tooltip on every layer and every group's arcs."""
    from fxprune.plots import pyplot, save_figure

    plt = pyplot()
    buffer = io.StringIO()
    with plt.rc_context({"svg.fonttype": "none", "svg.hashsalt": "fxprune"}):
        save_figure(_figure(graph, explanation), buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    tips = {f"group-{gi}": tip for gi, tip in _group_tips(explanation).items()}
    tips.update({f"layer-{data['order']}": _node_tip(graph, layer) for layer, data in graph.nodes(data=True)})

    def titled(match: re.Match) -> str:
        tip = tips.get(match.group(1))
        return match.group(0) if tip is None else f"{match.group(0)}\n<title>{html.escape(tip)}</title>"

    return re.sub(r'<g id="((?:group|layer)-\d+)">', titled, buffer.getvalue())


# -- .html ---------------------------------------------------------------------------------------
_STYLE = """body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin:.5em 0 1.5em}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top;font-size:13px}
th{background:#f4f4f4}.swatch{display:inline-block;width:1.2em;height:.8em;margin-right:.4em}
.frozen{color:#d62728}.figure{overflow-x:auto;border:1px solid #eee}code{font-size:12px}"""


def _html(graph, explanation, svg: str) -> str:
    esc = html.escape
    svg = svg[svg.index("<svg"):]  # inline: without the XML prolog and doctype
    rows = []
    for g in explanation.groups:
        members = "<br>".join(f"<code>{esc(m.name)}[{m.dim}]</code>" for m in g.parameters)
        layers = ", ".join(esc(layer) for layer in graph.graph["groups"][g.index])
        rows.append(f'<tr><td><span class="swatch" style="background:{_color(g.index)}"></span>{g.index}</td>'
                    f"<td>{g.size}</td><td>{esc(group_status(g))}</td><td>{layers}</td><td>{members}</td></tr>")
    frozen = [f'<tr><td class="frozen"><code>{esc(name)}[{dim}]</code></td><td>{esc(layer_of(name))}</td>'
              f"<td>{esc(reason)}</td></tr>" for (name, dim), reason in sorted(explanation.frozen_dims().items())]
    unruled = [f"<li><code>{esc(op)}</code>: {count}</li>" for op, count in explanation.ops_blocking.most_common()]
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             "<title>fxprune: channel groups</title>", f"<style>{_STYLE}</style></head><body>",
             "<h1>Channel groups</h1>",
             f"<p>{len(explanation.groups)} groups over {graph.number_of_nodes()} layers. The channels of a group are "
             "removed together from every layer it couples; hover a layer or an arc for its details.</p>",
             f'<div class="figure">{svg}</div>', "<h2>Groups</h2>",
             "<table><tr><th>group</th><th>channels</th><th>status</th><th>layers</th><th>members (parameter[dim])"
             "</th></tr>", *rows, "</table>", "<h2>Frozen parameter dims</h2>"]
    if frozen:
        parts += ["<table><tr><th>parameter[dim]</th><th>layer</th><th>why</th></tr>", *frozen, "</table>"]
    else:
        parts.append("<p>none</p>")
    if unruled:
        parts += ["<h2>Ops without a rule</h2><p>The channels they touch are frozen.</p><ul>", *unruled, "</ul>"]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
