"""The HTML report: this module prepares the data, ``templates/report.html.j2`` lays it out.

The page is one self-contained file: the CSS and JS in ``static/`` are inlined at render time
and every image is a ``data:`` URI, so it opens offline and can be mailed around. Given the model's
channel atlas, each node also shows its channel's top patches (:mod:`.patches`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup

from ..atlas import Atlas
from ..colors import colorbar, data_uri
from ..explanation import Explanation, Node
from .labels import LEVEL_COLOURS, decision_text, format_number, format_share, short_name
from .overlay import Thumbnails, fit_size, picture_of, stretch
from .patches import GAP, ChannelPatches, channel_patches, grid_shape, grid_size
from .target import draw_target

THUMB = 144  # px, tree thumbnails
PANEL = 192  # px, header panels
_CAM_TITLES = {"gradcam": "Grad-CAM", "layercam": "LayerCAM"}


@dataclass
class NodeView:
    """A node as the tree shows it: its overlay and the children on display."""

    node: Node
    image: str  # data URI of the overlay
    path: str  # channel path from the decision, for the tooltip
    children: list[NodeView]
    hidden: int  # children cut off by max_nodes
    patches: ChannelPatches | None  # its channel's atlas entry, when the report has an atlas covering it

    @property
    def kind(self) -> str:
        """A "twig" has only leaves below it; the page lays them out in a row beside it, which
        keeps a 156-node tree a few screens tall."""
        if not self.node.children:
            return "leaf"
        return "twig" if all(not child.node.children for child in self.children) else "inner"

    @property
    def bar(self) -> float:
        """Width of the share bar in percent, clamped so odd shares never overflow the card."""
        return min(max(float(self.node.share), 0.0), 1.0) * 100.0


@dataclass
class LevelRow:
    """One line of the "Layers" fact: the layer a level decomposes, at its map resolution."""

    level: int
    layer: str
    resolution: str


@dataclass
class Panel:
    """One header figure: the input, the gAP map or a CAM baseline."""

    title: str
    caption: str
    layer: str | None  # shown in code type after the caption
    image: str


@lru_cache(maxsize=None)
def _asset(name: str) -> Markup:
    """A file of ``static/``, trusted as-is, for inlining into the page."""
    return Markup((resources.files(__package__) / "static" / name).read_text(encoding="utf-8"))


def _environment() -> Environment:
    env = Environment(loader=PackageLoader(__package__, "templates"), autoescape=True, trim_blocks=True,
                      lstrip_blocks=True, keep_trailing_newline=True, undefined=StrictUndefined)
    env.filters.update(share=format_share, number=format_number, short=short_name)
    env.globals.update(asset=_asset, level_colours=LEVEL_COLOURS)
    return env


_TEMPLATE = _environment().get_template("report.html.j2")


def _shown_nodes(explanation: Explanation, max_nodes: int) -> set[int]:
    """Ids of the first ``max_nodes`` nodes whose ancestors are all shown, so no subtree hangs loose."""
    shown: set[int] = set()
    for node in explanation.nodes[: max(int(max_nodes), 1)]:
        if node.parent is None or node.parent in shown:
            shown.add(node.id)
    return shown


def _node_view(explanation: Explanation, node: Node, thumbs: Thumbnails, shown: set[int],
               patches: dict[tuple[str, int], ChannelPatches]) -> NodeView:
    children = [_node_view(explanation, explanation.nodes[c], thumbs, shown, patches) for c in node.children if c in shown]
    heat = stretch(node.map) if node.parent is None else node.map
    path = " \u2192 ".join(str(c) for c in explanation.path(node.id)) or "decision"
    return NodeView(node, data_uri(thumbs.overlay(heat)), path, children, len(node.children) - len(children),
                    patches.get((node.layer, node.channel)) if node.parent is not None else None)


def _level_rows(explanation: Explanation) -> list[LevelRow]:
    """Layer and resolution per level, from the nodes themselves (the truth on display)."""
    rows = []
    for level in range(explanation.depth + 1):
        nodes = explanation.level(level)
        if nodes:
            resolution = "\u00d7".join(str(int(s)) for s in nodes[0].map.shape[-2:])
            rows.append(LevelRow(level, nodes[0].layer, resolution))
    return rows


def _panels(explanation: Explanation, panels: Thumbnails) -> list[Panel]:
    """Input, the root's gAP map, and the CAM baselines side by side at one size."""
    first = explanation.layers[0] if explanation.layers else explanation.root.layer
    figures = [Panel("Input", "what the model saw", None, data_uri(draw_target(panels.base, explanation))),
               Panel("gAP", "decision evidence at", first, data_uri(panels.overlay(stretch(explanation.root.map))))]
    for key, cam in explanation.cams.items():
        if key != "gap":  # identical to the root's map, already shown
            figures.append(Panel(_CAM_TITLES.get(key, key), "baseline, same layer", None,
                                 data_uri(panels.overlay(stretch(cam)))))
    return figures


def render_html(explanation: Explanation, title: str | None = None, max_nodes: int = 400,
                atlas: Atlas | None = None) -> str:
    """The explanation as one self-contained HTML page (inline CSS and PNG data URIs, no network).

    Only the first ``max_nodes`` nodes are drawn, so a very wide or deep tree still gives a page
    a browser opens; a note says how many were left out. With the model's ``atlas`` every node of
    a layer it covers shows its channel's top patches, with the channel's statistics on hover.
    """
    picture = picture_of(explanation)
    shown = _shown_nodes(explanation, max_nodes)
    thumb_hw = fit_size(picture.shape[:2], THUMB)
    panel_hw = fit_size(picture.shape[:2], PANEL)
    patches = channel_patches(atlas, [explanation.nodes[i] for i in sorted(shown)]) if atlas is not None else {}
    rows, columns = grid_shape(atlas.top) if atlas is not None else (0, 0)
    patches_w = grid_size(columns) + GAP if columns else 0
    return _TEMPLATE.render(
        explanation=explanation,
        title=title if title is not None else f"gAP explanation \u2014 {explanation.model}",
        decision=decision_text(explanation),
        thumb_hw=thumb_hw,
        panel_hw=panel_hw,
        name_chars=(thumb_hw[1] + patches_w) // 7,  # monospace characters that fit under a thumbnail
        levels=_level_rows(explanation),
        panels=_panels(explanation, Thumbnails(picture, panel_hw)),
        colorbar=data_uri(colorbar()),
        root=_node_view(explanation, explanation.root, Thumbnails(picture, thumb_hw), shown, patches),
        atlas=atlas,
        patch_grids=list(patches.values()),
        patches_w=patches_w,
        grid_hw=(grid_size(rows), grid_size(columns)),
        shown=len(shown),
        total=len(explanation.nodes),
        max_nodes=int(max_nodes),
    )
