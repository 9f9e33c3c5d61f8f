"""Human-readable renderings of an :class:`Explanation`: heatmap overlays, an HTML report, a PNG figure.

Everything here depends on numpy and Pillow only, so a report can be written wherever an
explanation can be computed. The HTML report is one self-contained file (inline CSS, images as
``data:`` URIs, a few lines of vanilla JS) that shows the decomposition tree the way the figures
of "Deeply Explain CNN via Hierarchical Decomposition" do: each node is its evidence map laid
over the input, under the node it supports.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .explanation import Explanation, Node, upsample

__all__ = ["heatmap_overlay", "colorize", "format_share", "render_html", "render_png", "write_report"]

# ---------------------------------------------------------------------------------------------
# Colour
# ---------------------------------------------------------------------------------------------

# Anchors of Google's "turbo" (a perceptually smoothed jet), evenly spaced on [0, 1], without
# turbo's near-black first anchor: faint evidence then tints the picture blue instead of greying
# it. Chosen over inferno because the hot end (dark red) stays visible on white document pages,
# where inferno's pale yellow vanishes. Linear interpolation between the anchors is visually
# indistinguishable from the full table.
_TURBO = np.array(
    [
        (73, 88, 221), (47, 158, 245), (39, 215, 195), (78, 249, 131), (150, 250, 80),
        (223, 220, 50), (255, 163, 35), (244, 92, 23), (184, 32, 8), (122, 4, 3),
    ],
    dtype=np.float32,
)

GREY = 128  # canvas value when the explanation carries no picture
ALPHA = 0.6  # peak opacity of the overlays in reports


def colorize(heat: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to turbo RGB (float32 in [0, 255]) by interpolating the anchors."""
    heat = np.clip(np.nan_to_num(np.asarray(heat, dtype=np.float32)), 0.0, 1.0)
    return _LUT[np.rint(heat * (len(_LUT) - 1)).astype(np.intp)]


def _interpolated_lut(anchors: np.ndarray, size: int = 256) -> np.ndarray:
    """A ``size``-entry table, so colouring a map is one lookup instead of per-pixel interpolation."""
    position = np.linspace(0.0, len(anchors) - 1, size, dtype=np.float32)
    low = np.minimum(np.floor(position).astype(int), len(anchors) - 2)
    frac = (position - low)[:, None]
    return anchors[low] * (1.0 - frac) + anchors[low + 1] * frac


_LUT = _interpolated_lut(_TURBO)


def normalize(heat: np.ndarray) -> np.ndarray:
    """Scale a non-negative map by its maximum so each map uses the whole colour range.

    Negative and non-finite values count as no evidence; an all-zero map stays zero rather than
    being divided by zero into noise.
    """
    heat = np.nan_to_num(np.asarray(heat, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    heat = np.maximum(heat, 0.0)
    peak = float(heat.max()) if heat.size else 0.0
    return heat / peak if peak > 0 else np.zeros_like(heat)


def stretch(heat: np.ndarray) -> np.ndarray:
    """Shift a whole-layer map so its minimum is zero.

    Decision-level maps (the gAP root map, Grad-CAM, LayerCAM) of classifiers with a global
    pooling head are positive almost everywhere and vary by a few percent; shown as they are,
    they look uniformly hot. Per-channel node maps keep their zeros, which mean "no evidence".
    """
    heat = np.asarray(heat, dtype=np.float32)
    return heat - float(heat.min()) if heat.size else heat


def _as_rgb(picture: np.ndarray) -> np.ndarray:
    """Coerce greyscale, RGBA or float pictures to (H, W, 3) uint8, the only form we blend."""
    picture = np.asarray(picture)
    if picture.ndim == 2:
        picture = np.repeat(picture[..., None], 3, axis=2)
    if picture.ndim != 3 or picture.shape[2] not in (1, 3, 4):
        raise ValueError(f"picture must be (H, W), (H, W, 3) or (H, W, 4), got {picture.shape}")
    if picture.shape[2] == 1:
        picture = np.repeat(picture, 3, axis=2)
    picture = picture[..., :3]
    if picture.dtype != np.uint8:
        scale = 255.0 if np.issubdtype(picture.dtype, np.floating) and picture.max(initial=0) <= 1.0 else 1.0
        picture = np.clip(np.nan_to_num(picture.astype(np.float32) * scale), 0, 255).astype(np.uint8)
    return picture


def heatmap_overlay(picture: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Lay ``heat`` over ``picture`` in turbo colours; returns (H, W, 3) uint8.

    ``heat`` is normalised by its maximum and resized (bilinear) to the picture when its
    resolution differs. The opacity of each pixel is ``alpha * sqrt(heat)`` rather than a
    constant: where a channel has no evidence (heat == 0) the picture is left exactly as it was,
    so the eye reads "coloured = evidence here" and the page content stays visible elsewhere.
    The square root keeps weak but non-zero evidence visible.
    """
    rgb = _as_rgb(picture)
    heat = np.asarray(heat, dtype=np.float32)
    if heat.ndim != 2:
        heat = heat.reshape(heat.shape[-2:])
    if heat.shape != rgb.shape[:2]:
        heat = upsample(heat, rgb.shape[:2])
    heat = normalize(heat)
    opacity = (float(alpha) * np.sqrt(heat))[..., None]
    blended = rgb.astype(np.float32) * (1.0 - opacity) + colorize(heat) * opacity
    out = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    out[heat <= 0] = rgb[heat <= 0]  # exact, not merely within rounding
    return out


def colorbar(width: int = 256, height: int = 12) -> np.ndarray:
    """A horizontal strip of the colormap, for legends."""
    return colorize(np.tile(np.linspace(0.0, 1.0, width, dtype=np.float32), (height, 1))).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def _picture(explanation: Explanation) -> np.ndarray:
    """The picture the model saw, or a neutral grey canvas of the input size when unknown."""
    if explanation.picture is not None:
        return _as_rgb(explanation.picture)
    height, width = explanation.input_hw
    return np.full((int(height), int(width), 3), GREY, dtype=np.uint8)


def fit_size(hw: Sequence[int], base: int, max_ratio: float = 2.0) -> tuple[int, int]:
    """(height, width) with about ``base**2`` pixels and the input's aspect ratio.

    Equal area keeps square inputs at ``base`` and stops wide text-line inputs (48x320) from
    becoming slivers; the longer side is capped at ``max_ratio * base`` so they still fit a row.
    """
    height, width = max(int(hw[0]), 1), max(int(hw[1]), 1)
    aspect = width / height
    out_w, out_h = base * aspect**0.5, base / aspect**0.5
    cap = max_ratio * base
    shrink = min(1.0, cap / max(out_w, out_h))
    return max(int(round(out_h * shrink)), 1), max(int(round(out_w * shrink)), 1)


def _resize(rgb: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    if rgb.shape[:2] == tuple(hw):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((hw[1], hw[0]), Image.Resampling.LANCZOS))


class _Thumbnails:
    """Overlays of many maps on one picture at one size, downscaling the picture only once.

    Maps are upsampled straight from layer resolution to the thumbnail size, which is what
    upsampling to the input and then shrinking would give, at a fraction of the cost.
    """

    def __init__(self, picture: np.ndarray, hw: tuple[int, int]) -> None:
        self.hw = hw
        self.base = _resize(picture, hw)

    def overlay(self, heat: np.ndarray) -> np.ndarray:
        heat = np.asarray(heat, dtype=np.float32)
        heat = heat.reshape(heat.shape[-2:]) if heat.ndim != 2 else heat
        return heatmap_overlay(self.base, upsample(heat, self.hw), alpha=ALPHA)


def _png_bytes(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


def _data_uri(rgb: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(_png_bytes(rgb)).decode("ascii")


def format_share(share: float) -> str:
    """Share of the parent's positive evidence as a percentage, precise enough to tell siblings apart."""
    percent = 100.0 * float(share)
    if percent != 0.0 and abs(percent) < 0.1:
        return "<0.1%"
    return f"{percent:.1f}%"


def format_number(value: float | None) -> str:
    """Short, sign-aware number (4 significant digits) for scores and logits."""
    if value is None:
        return "n/a"
    return f"{float(value):.4g}"


def short_name(name: str, limit: int = 21) -> str:
    """Keep a layer name's tail: exported names share long prefixes and differ at the end."""
    return name if len(name) <= limit else "\u2026" + name[-(limit - 1):]


def _shown_nodes(explanation: Explanation, max_nodes: int) -> list[Node]:
    """The first ``max_nodes`` nodes whose ancestors are all shown, so no subtree hangs loose."""
    shown: dict[int, Node] = {}
    for node in explanation.nodes[: max(int(max_nodes), 1)]:
        if node.parent is None or node.parent in shown:
            shown[node.id] = node
    return list(shown.values())


def _level_layers(explanation: Explanation) -> list[tuple[int, str, str]]:
    """(level, layer, resolution) per level, from the nodes themselves (the truth on display)."""
    rows = []
    for level in range(explanation.depth + 1):
        nodes = explanation.level(level)
        if not nodes:
            continue
        shape = nodes[0].map.shape
        rows.append((level, nodes[0].layer, "\u00d7".join(str(int(s)) for s in shape[-2:])))
    return rows


def _decision_text(explanation: Explanation) -> str:
    label = f"\u201c{explanation.label}\u201d " if explanation.label is not None else ""
    return f"{label}(class {explanation.target})"


# ---------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------

THUMB = 144  # px, tree thumbnails
PANEL = 192  # px, header panels

_LEVEL_COLOURS = ["#1f2937", "#2563eb", "#059669", "#d97706", "#dc2626", "#7c3aed", "#0891b2", "#be185d"]

_CSS = """
:root { --card-w: calc(var(--thumb-w) + 16px); --card-h: calc(var(--thumb-h) + 92px);
  --line: #cbd5e1; --muted: #64748b; --ink: #0f172a; --bg: #f8fafc; }
* { box-sizing: border-box; }
body { margin: 0; padding: 28px 32px 48px; background: var(--bg); color: var(--ink);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
h1 { font-size: 22px; margin: 0 0 4px; font-weight: 650; letter-spacing: -0.01em; }
h2 { font-size: 16px; margin: 28px 0 12px; font-weight: 650; }
.sub { color: var(--muted); margin: 0 0 18px; }
.mono, code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12.5px; }
.top { display: grid; grid-template-columns: max-content minmax(0, 1fr); gap: 16px; align-items: start; }
@media (max-width: 900px) { .top { grid-template-columns: minmax(0, 1fr); } }
.facts { display: grid; grid-template-columns: max-content minmax(0, 1fr); gap: 3px 16px; margin: 0; align-content: start;
  background: #fff; border: 1px solid #e2e8f0; border-radius: 10px; padding: 12px 16px; width: 410px; max-width: 100%; font-size: 13px; }
.facts dt { color: var(--muted); }
.facts dd { margin: 0; overflow-wrap: anywhere; }
.levels { list-style: none; margin: 0; padding: 0; }
.levels li { display: flex; gap: 8px; align-items: baseline; margin: 2px 0; }
.levels .badge { flex: none; }
.levels code { overflow-wrap: anywhere; }
.levels .res { color: var(--muted); white-space: nowrap; }
.panels { display: flex; flex-wrap: wrap; gap: 16px; }
figure { margin: 0; background: #fff; border: 1px solid #e2e8f0; border-radius: 10px; padding: 8px; }
figure img { display: block; width: var(--panel-w); height: var(--panel-h); object-fit: contain;
  image-rendering: auto; border-radius: 6px; background: #e5e7eb; }
figcaption { font-size: 12.5px; color: var(--muted); margin-top: 6px; max-width: var(--panel-w); }
figcaption b { color: var(--ink); font-weight: 600; }
.legend { display: flex; align-items: center; gap: 8px; color: var(--muted); font-size: 12.5px; margin: 10px 0 0; }
.legend img { width: 180px; height: 10px; border-radius: 3px; }
.toolbar { display: flex; gap: 8px; align-items: center; margin: 0 0 14px; flex-wrap: wrap; }
.toolbar button { font: inherit; font-size: 13px; padding: 4px 12px; border: 1px solid #cbd5e1; border-radius: 6px;
  background: #fff; cursor: pointer; }
.toolbar button:hover { background: #f1f5f9; }
.note { background: #fff7ed; border: 1px solid #fed7aa; color: #9a3412; border-radius: 8px; padding: 8px 12px; margin: 0 0 14px; }
.badge { display: inline-block; min-width: 24px; text-align: center; color: #fff; border-radius: 4px;
  font-size: 11px; font-weight: 700; padding: 0 5px; line-height: 18px; }
details.node { margin: 0; }
details.node > summary { list-style: none; display: block; width: max-content; cursor: pointer; outline: none; }
details.node > summary::-webkit-details-marker { display: none; }
details.leaf > summary { cursor: default; }
.card { position: relative; width: var(--card-w); height: var(--card-h); background: #fff; border: 1px solid #e2e8f0;
  border-radius: 10px; padding: 7px; box-shadow: 0 1px 2px rgba(15, 23, 42, .05); overflow: hidden; }
summary:hover .card, summary:focus-visible .card { border-color: #94a3b8; }
.card img { display: block; width: var(--thumb-w); height: var(--thumb-h); object-fit: contain;
  border-radius: 5px; background: #e5e7eb; }
.card .head { display: flex; align-items: center; gap: 6px; margin-top: 6px; white-space: nowrap; }
.card .ch { font-weight: 650; font-size: 13.5px; }
.card .toggle { margin-left: auto; color: var(--muted); font-size: 11px; }
details[open] > summary .toggle::after { content: "\\25BE " attr(data-n); }
details:not([open]) > summary .toggle::after { content: "\\25B8 " attr(data-n); }
.share { display: flex; align-items: center; gap: 6px; margin-top: 4px; font-size: 12px; }
.bar { flex: 1; height: 6px; border-radius: 3px; background: #e2e8f0; overflow: hidden; }
.bar > span { display: block; height: 100%; min-width: 2px; border-radius: 3px; }
.pct { font-variant-numeric: tabular-nums; min-width: 42px; text-align: right; font-weight: 600; }
.card .score, .card .layer { font-size: 11.5px; color: var(--muted); white-space: nowrap; overflow: hidden;
  text-overflow: ellipsis; }
.kids { margin-left: 28px; padding-left: 22px; border-left: 2px solid var(--line); padding-top: 4px; }
.kids > details { position: relative; margin: 12px 0; }
.kids > details::before { content: ""; position: absolute; left: -22px; top: calc(var(--thumb-h) / 2 + 8px);
  width: 20px; border-top: 2px solid var(--line); }
.twig > .kids { border-left: 0; margin-left: calc(var(--card-w) + 8px); padding: 0 0 0 22px;
  margin-top: calc(-1 * var(--card-h)); min-height: var(--card-h); display: flex; flex-wrap: wrap; gap: 10px;
  position: relative; }
.twig > .kids::before { content: ""; position: absolute; left: 0; top: calc(var(--thumb-h) / 2 + 8px);
  width: 22px; border-top: 2px dashed var(--line); }
.twig > .kids > details { margin: 0; }
.twig > .kids > details::before { display: none; }
.hidden-kids { color: var(--muted); font-size: 12.5px; font-style: italic; align-self: center; padding: 6px 0; }
.tree { overflow-x: auto; padding-bottom: 8px; }
footer { margin-top: 28px; color: var(--muted); font-size: 12px; }
"""

_JS = """
function setAll(open) { document.querySelectorAll('details.node').forEach(function (d) { d.open = open; }); }
function toLevel(level) { document.querySelectorAll('details.node').forEach(function (d) {
  d.open = Number(d.dataset.level) < level; }); }
"""


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _level_badge(level: int) -> str:
    colour = _LEVEL_COLOURS[level % len(_LEVEL_COLOURS)]
    return f'<span class="badge" style="background:{colour}">L{level}</span>'


@dataclass
class _HtmlContext:
    """What every node's markup needs: the thumbnails and which nodes are on display."""

    explanation: Explanation
    thumbs: _Thumbnails
    shown: set[int]
    name_chars: int  # how many monospace characters fit under a thumbnail


def _node_card(ctx: _HtmlContext, node: Node, shown_children: int) -> str:
    """A node as a card: overlay, level badge, channel, share bar and %, score, layer."""
    explanation = ctx.explanation
    share = format_share(node.share)
    width = min(max(float(node.share), 0.0), 1.0) * 100.0
    colour = _LEVEL_COLOURS[node.level % len(_LEVEL_COLOURS)]
    path = " \u2192 ".join(str(c) for c in explanation.path(node.id)) or "decision"
    what = "class" if node.parent is None else "ch"
    tooltip = (f"{node.layer} | channel {node.channel} | score {node.score:.6g} | share {share} "
               f"of parent | path {path}")
    toggle = f'<span class="toggle" data-n="{shown_children}"></span>' if shown_children else ""
    return (
        f'<div class="card" title="{_esc(tooltip)}">'
        f'<img src="{_data_uri(ctx.thumbs.overlay(stretch(node.map) if node.parent is None else node.map))}" alt="{_esc(f"{node.layer} channel {node.channel}")}">'
        f'<div class="head">{_level_badge(node.level)}<span class="ch">{what} {node.channel}</span>{toggle}</div>'
        f'<div class="share"><span class="bar"><span style="width:{width:.2f}%;background:{colour}"></span></span>'
        f'<span class="pct">{_esc(share)}</span></div>'
        f'<div class="score">score {_esc(format_number(node.score))}</div>'
        f'<div class="layer mono">{_esc(short_name(node.layer, ctx.name_chars))}</div>'
        "</div>"
    )


def _node_html(ctx: _HtmlContext, node: Node) -> str:
    """One ``<details>`` per node, its children nested inside so collapsing hides the subtree.

    A node whose shown children are all leaves is a "twig": its leaves are laid out in a row
    beside it (one line per twig), which keeps a 156-node tree a few screens tall. Children
    cut off by ``max_nodes`` are counted in a note where they would have been.
    """
    nodes = ctx.explanation.nodes
    kids = [nodes[c] for c in node.children if c in ctx.shown]
    hidden = len(node.children) - len(kids)
    leaf = not node.children
    twig = not leaf and all(not child.children for child in kids)
    classes = "node " + ("leaf" if leaf else "twig" if twig else "inner")
    inner = "".join(_node_html(ctx, child) for child in kids)
    if hidden:
        inner += f'<div class="hidden-kids">+{hidden} more not shown</div>'
    body = f'<div class="kids">{inner}</div>' if inner else ""
    return (f'<details open class="{classes}" data-level="{node.level}" id="node-{node.id}">'
            f"<summary>{_node_card(ctx, node, len(kids))}</summary>{body}</details>")


def _facts_html(explanation: Explanation, shown: int) -> str:
    probability = "n/a" if explanation.probability is None else f"{explanation.probability:.4f}"
    levels = "".join(
        f'<li>{_level_badge(level)}<code>{_esc(layer)}</code><span class="res">{_esc(res)}</span></li>'
        for level, layer, res in _level_layers(explanation)
    )
    nodes = f"{len(explanation.nodes)}" if shown == len(explanation.nodes) else f"{shown} of {len(explanation.nodes)} shown"
    rows = [
        ("Model", _esc(explanation.model)),
        ("Target", f"<b>{_esc(_decision_text(explanation))}</b>"),
        ("Logit", _esc(format_number(explanation.logit))),
        ("Probability", _esc(probability)),
        ("Score mode", _esc(explanation.score_mode)),
        ("Input", _esc(f"{explanation.input_hw[0]}\u00d7{explanation.input_hw[1]}")),
        ("Nodes", _esc(nodes) + f" (depth {explanation.depth})"),
        ("Layers", f'<ul class="levels">{levels}</ul>'),
    ]
    return '<dl class="facts">' + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows) + "</dl>"


_CAM_TITLES = {"gradcam": "Grad-CAM", "layercam": "LayerCAM"}


def _panels_html(explanation: Explanation, panels: _Thumbnails) -> str:
    """Input, the root's gAP map, and the CAM baselines side by side at one size."""
    first = explanation.layers[0] if explanation.layers else explanation.root.layer
    figures = [("Input", "what the model saw", _data_uri(panels.base))]
    figures.append(("gAP", f"decision evidence at <code>{_esc(first)}</code>", _data_uri(panels.overlay(stretch(explanation.root.map)))))
    for key, cam in explanation.cams.items():
        if key == "gap":  # identical to the root's map, already shown
            continue
        figures.append((_CAM_TITLES.get(key, key), "baseline, same layer", _data_uri(panels.overlay(stretch(cam)))))
    return '<div class="panels">' + "".join(
        f'<figure><img src="{uri}" alt="{_esc(name)}"><figcaption><b>{_esc(name)}</b> \u00b7 {caption}</figcaption></figure>'
        for name, caption, uri in figures
    ) + "</div>"


def render_html(explanation: Explanation, title: str | None = None, max_nodes: int = 400) -> str:
    """The explanation as one self-contained HTML page (inline CSS and PNG data URIs, no network).

    Only the first ``max_nodes`` nodes are drawn, so a very wide or deep tree still gives a page
    a browser opens; a note says how many were left out.
    """
    picture = _picture(explanation)
    shown_nodes = _shown_nodes(explanation, max_nodes)
    thumb_hw = fit_size(picture.shape[:2], THUMB)
    panel_hw = fit_size(picture.shape[:2], PANEL)
    ctx = _HtmlContext(explanation, _Thumbnails(picture, thumb_hw), {n.id for n in shown_nodes}, thumb_hw[1] // 7)
    title = title if title is not None else f"gAP explanation \u2014 {explanation.model}"
    sizes = (f":root {{ --thumb-w: {thumb_hw[1]}px; --thumb-h: {thumb_hw[0]}px; "
             f"--panel-w: {panel_hw[1]}px; --panel-h: {panel_hw[0]}px; }}")
    note = ""
    if len(shown_nodes) < len(explanation.nodes):
        note = (f'<p class="note">Showing the first {len(shown_nodes)} of {len(explanation.nodes)} nodes '
                f"(max_nodes={int(max_nodes)}); the JSON output holds the full tree.</p>")
    level_buttons = "".join(f'<button type="button" onclick="toLevel({d})">Levels 0\u2013{d}</button>'
                            for d in range(1, explanation.depth))
    return "".join([
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(title)}</title><style>{sizes}{_CSS}</style></head><body>",
        f"<h1>{_esc(title)}</h1>",
        f'<p class="sub">Hierarchical gAP decomposition of the decision {_esc(_decision_text(explanation))}: '
        "each node is a channel of a lower layer, shown as where its positive evidence lies, "
        "with its share of its parent's positive evidence.</p>",
        '<div class="top">', _facts_html(explanation, len(shown_nodes)),
        _panels_html(explanation, _Thumbnails(picture, panel_hw)), "</div>",
        f'<div class="legend">low<img src="{_data_uri(colorbar())}" alt="colour scale">high evidence '
        "\u00b7 each map is scaled to its own maximum; uncoloured = no positive evidence</div>",
        "<h2>Decomposition tree</h2>",
        '<div class="toolbar"><button type="button" onclick="setAll(true)">Expand all</button>'
        f'<button type="button" onclick="setAll(false)">Collapse all</button>{level_buttons}</div>',
        note,
        f'<div class="tree">{_node_html(ctx, explanation.root)}</div>',
        "<footer>Share: fraction of the parent's positive contributions carried by this channel. "
        "Hover a card for the exact score and the channel path from the decision.</footer>",
        f"<script>{_JS}</script></body></html>\n",
    ])


# ---------------------------------------------------------------------------------------------
# PNG figure
# ---------------------------------------------------------------------------------------------

_INK = (15, 23, 42)
_MUTED = (100, 116, 139)
_LINE = (148, 163, 184)
_PAPER = (255, 255, 255)
MAX_FIGURE_WIDTH = 4000  # px the deepest row aims for before thumbnails shrink (not below MIN_THUMB)
MIN_THUMB = 56
MAX_CANVAS_WIDTH = 16000  # px; wider trees lose their deepest rows
TOP_THUMB = 192
LABEL_COLUMN = 190


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled font at ``size``; the fixed bitmap font on Pillow builds without FreeType."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _printable(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> str:
    """The bitmap fallback font only encodes Latin-1: replace what it cannot draw."""
    if isinstance(font, ImageFont.FreeTypeFont):
        return text
    return text.replace("\u2026", "...").encode("latin-1", "replace").decode("latin-1")


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: float) -> str:
    """Truncate with an ellipsis so labels never run into their neighbours."""
    text = _printable(text, font)
    if draw.textlength(text, font=font) <= width:
        return text
    ellipsis = _printable("\u2026", font)
    while text and draw.textlength(text + ellipsis, font=font) > width:
        text = text[:-1]
    return text + ellipsis


@dataclass
class _Box:
    """Where one node's thumbnail goes in the figure."""

    node: Node
    x: float  # centre
    y: float  # top
    hw: tuple[int, int]


def _level_thumb(count: int, level: int) -> int:
    """Thumbnail side for a row of ``count`` nodes: smaller when the row is crowded."""
    if level <= 1:
        return 128
    return int(max(MIN_THUMB, min(128, MAX_FIGURE_WIDTH // max(count, 1) - 16)))


def _caption_height(side: int) -> int:
    return 2 * (_caption_font_size(side) + 4) + 4


def _caption_font_size(side: int) -> int:
    return max(10, min(14, side // 9))


def _layout(explanation: Explanation, levels: int, sizes: dict[int, tuple[int, int]]) -> tuple[list[_Box], float]:
    """Tidy-tree placement: each subtree gets max(own width, children's widths) and is centred.

    Returns the boxes (x relative to the tree's left edge) and the tree's width.
    """
    nodes = explanation.nodes
    widths: dict[int, float] = {}

    def gap(level: int) -> float:
        return 10.0 if level >= levels else 26.0

    def kids(node: Node) -> list[Node]:
        return [nodes[c] for c in node.children] if node.level < levels else []

    def measure(node: Node) -> float:
        own = sizes[node.level][1] + 8.0
        children = kids(node)
        span = sum(measure(c) for c in children) + gap(node.level + 1) * max(len(children) - 1, 0)
        widths[node.id] = max(own, span)
        return widths[node.id]

    boxes: list[_Box] = []

    def place(node: Node, left: float, row_tops: dict[int, float]) -> None:
        boxes.append(_Box(node, left + widths[node.id] / 2, row_tops[node.level], sizes[node.level]))
        children = kids(node)
        span = sum(widths[c.id] for c in children) + gap(node.level + 1) * max(len(children) - 1, 0)
        cursor = left + (widths[node.id] - span) / 2
        for child in children:
            place(child, cursor, row_tops)
            cursor += widths[child.id] + gap(node.level + 1)

    total = measure(explanation.root)
    row_tops, y = {}, 0.0
    for level in range(levels + 1):
        row_tops[level] = y
        y += sizes[level][0] + _caption_height(sizes[level][0]) + 44
    place(explanation.root, 0.0, row_tops)
    return boxes, total


def _draw_connectors(draw: ImageDraw.ImageDraw, boxes: list[_Box], offset: tuple[float, float]) -> None:
    """Elbow lines from each parent's caption down to a bus over its children, then to each child."""
    by_id = {b.node.id: b for b in boxes}
    for box in boxes:
        children = [by_id[c] for c in box.node.children if c in by_id]
        if not children:
            continue
        ox, oy = offset
        top = oy + box.y + box.hw[0] + _caption_height(box.hw[0]) + 4
        child_top = oy + children[0].y - 4
        bus = (top + child_top) / 2
        xs = [ox + c.x for c in children]
        draw.line([(ox + box.x, top), (ox + box.x, bus)], fill=_LINE, width=2)
        draw.line([(min(xs + [ox + box.x]), bus), (max(xs + [ox + box.x]), bus)], fill=_LINE, width=2)
        for x in xs:
            draw.line([(x, bus), (x, child_top)], fill=_LINE, width=2)


def _draw_thumb(canvas: Image.Image, draw: ImageDraw.ImageDraw, image: np.ndarray, x: float, y: float,
                lines: Iterable[tuple[str, tuple[int, int, int], bool]], font_size: int) -> None:
    """Paste an image centred on ``x`` with a thin frame, and centred caption lines under it."""
    height, width = image.shape[:2]
    left = int(round(x - width / 2))
    top = int(round(y))
    canvas.paste(Image.fromarray(image), (left, top))
    draw.rectangle([left - 1, top - 1, left + width, top + height], outline=(203, 213, 225))
    line_y = top + height + 5
    for text, colour, bold in lines:
        font = _font(font_size + (1 if bold else 0))
        text = _fit_text(draw, text, font, max(width + 6, 40))
        # centred by measuring, not anchor="ma": Pillow's bitmap fallback font has no anchors
        draw.text((x - draw.textlength(text, font=font) / 2, line_y), text, fill=colour, font=font)
        line_y += font_size + 4


def _header_lines(explanation: Explanation, note: str = "") -> list[tuple[str, int, tuple[int, int, int]]]:
    probability = "" if explanation.probability is None else f" \u00b7 p {explanation.probability:.3f}"
    lines = [
        (f"gAP decomposition: {explanation.model}", 22, _INK),
        (f"target {_decision_text(explanation)} \u00b7 logit {format_number(explanation.logit)}{probability}"
         f" \u00b7 score mode {explanation.score_mode}", 15, _MUTED),
    ]
    return lines + ([(note, 13, (154, 52, 18))] if note else [])


def _row_sizes(explanation: Explanation, hw: Sequence[int], levels: int) -> dict[int, tuple[int, int]]:
    """Thumbnail (height, width) per level: large on top, shrinking in crowded rows."""
    sizes = {0: fit_size(hw, TOP_THUMB)}
    for level in range(1, levels + 1):
        sizes[level] = fit_size(hw, _level_thumb(len(explanation.level(level)), level))
    return sizes


def _fitting_levels(explanation: Explanation, hw: Sequence[int], levels: int) -> int:
    """The most levels (up to ``levels``) whose figure stays under MAX_CANVAS_WIDTH pixels.

    A wide tree (top_k 64) would otherwise ask Pillow for a canvas of hundreds of thousands of
    pixels; dropping the deepest rows keeps the figure useful instead of failing.
    """
    while levels > 1 and _layout(explanation, levels, _row_sizes(explanation, hw, levels))[1] > MAX_CANVAS_WIDTH:
        levels -= 1
    return levels


def render_png(explanation: Explanation, levels: int = 2, path: str | Path | None = None) -> bytes:
    """A paper-style figure of the top ``levels`` levels of the tree, as PNG bytes.

    Input and root heatmap on top, then one row per level with each node under its parent,
    captioned with its channel and share. Rows shrink their thumbnails when crowded so a
    depth-3 tree stays a manageable image. Written to ``path`` too when given.
    """
    picture = _picture(explanation)
    wanted = max(0, min(int(levels), explanation.depth))
    levels = _fitting_levels(explanation, picture.shape[:2], wanted)
    note = f"showing {levels} of {wanted} levels: deeper rows would make the figure too wide" if levels < wanted else ""
    sizes = _row_sizes(explanation, picture.shape[:2], levels)
    boxes, tree_width = _layout(explanation, levels, sizes)
    header_lines = _header_lines(explanation, note)

    margin = 28
    header = margin + sum(size + 10 for _, size, _ in header_lines) + 12
    root_w = sizes[0][1]
    # the input sits left of the root (centred over the tree), inside the label column if it fits
    left = margin + max(LABEL_COLUMN, 1.5 * root_w + 40 - tree_width / 2)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_width = max(probe.textlength(_printable(text, _font(size)), font=_font(size)) for text, size, _ in header_lines)
    width = int(max(left + max(tree_width, root_w + 16), margin + min(text_width, 1600)) + margin)
    height = int(header + max(b.y + b.hw[0] + _caption_height(b.hw[0]) for b in boxes) + margin)
    canvas = Image.new("RGB", (width, height), _PAPER)
    draw = ImageDraw.Draw(canvas)

    y = margin - 6
    for text, size, colour in header_lines:
        draw.text((margin, y), _fit_text(draw, text, _font(size), width - 2 * margin), fill=colour, font=_font(size))
        y += size + 10
    _draw_connectors(draw, boxes, (left, header))
    _draw_nodes(canvas, draw, picture, boxes, sizes, (left, header))
    _draw_level_labels(draw, explanation, boxes, levels, header, margin)
    data = _png_bytes(np.asarray(canvas))
    if path is not None:
        Path(path).write_bytes(data)
    return data


def _draw_nodes(canvas: Image.Image, draw: ImageDraw.ImageDraw, picture: np.ndarray, boxes: list[_Box],
                sizes: dict[int, tuple[int, int]], offset: tuple[float, float]) -> None:
    """Every node's overlay with its caption, and the input picture left of the root."""
    left, top = offset
    thumbs = {level: _Thumbnails(picture, hw) for level, hw in sizes.items()}
    for box in boxes:
        node = box.node
        if node.parent is None:
            caption = [("decision (gAP)", _INK, True),
                       (f"class {node.channel} \u00b7 logit {format_number(node.score)}", _MUTED, False)]
        else:
            caption = [(f"ch {node.channel}", _INK, True), (format_share(node.share), _MUTED, False)]
        heat = stretch(node.map) if node.parent is None else node.map
        _draw_thumb(canvas, draw, thumbs[node.level].overlay(heat), left + box.x, top + box.y, caption,
                    _caption_font_size(min(box.hw)))

    root, (root_h, root_w) = boxes[0], sizes[0]
    input_x = left + root.x - root_w - 40
    _draw_thumb(canvas, draw, thumbs[0].base, input_x, top + root.y,
                [("input", _INK, True), (f"{picture.shape[0]}x{picture.shape[1]}", _MUTED, False)],
                _caption_font_size(min(sizes[0])))
    arrow_y = top + root.y + root_h / 2
    draw.line([(input_x + root_w / 2 + 8, arrow_y), (left + root.x - root_w / 2 - 10, arrow_y)], fill=_LINE, width=2)


def _draw_level_labels(draw: ImageDraw.ImageDraw, explanation: Explanation, boxes: list[_Box], levels: int,
                       header: float, margin: int) -> None:
    """"L1 / layer name" at the left of each row, so readers know which layer a row shows."""
    tops = {}
    for box in boxes:
        tops.setdefault(box.node.level, (box.y, box.hw[0]))
    for level in range(1, levels + 1):
        if level not in tops:
            continue
        top, height = tops[level]
        layer = explanation.level(level)[0].layer
        y = header + top + height / 2 - 18
        colour = tuple(int(_LEVEL_COLOURS[level % len(_LEVEL_COLOURS)][i:i + 2], 16) for i in (1, 3, 5))
        draw.text((margin, y), f"Level {level}", fill=colour, font=_font(16))
        draw.text((margin, y + 22), _fit_text(draw, layer, _font(12), LABEL_COLUMN - 16), fill=_MUTED, font=_font(12))


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def write_report(explanation: Explanation, html_path: str | Path | None = None, png_path: str | Path | None = None,
                 json_path: str | Path | None = None) -> None:
    """Write whichever of the HTML report, PNG figure and JSON tree were asked for."""
    if html_path is not None:
        Path(html_path).write_text(render_html(explanation), encoding="utf-8")
    if png_path is not None:
        render_png(explanation, path=png_path)
    if json_path is not None:
        Path(json_path).write_text(json.dumps(explanation.to_dict(), indent=2), encoding="utf-8")
