"""Human-readable renderings of an :class:`Explanation`: heatmap overlays, an HTML report, a PNG figure.

The HTML report (:mod:`.page`, a Jinja2 template with its CSS and JS beside it) is one
self-contained file that shows the decomposition tree the way the figures of "Deeply Explain
CNN via Hierarchical Decomposition" do: each node is its evidence map laid over the input, under
the node it supports, beside the image patches its channel responds to when the model's channel
atlas is given (:mod:`.patches`). The PNG figure (:mod:`.figure`) draws the top levels of the same tree.
Colours come from :mod:`gap_service.colors`, shared with the server's heatmaps.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..atlas import Atlas
from ..colors import colorize
from ..explanation import Explanation
from .figure import render_png
from .labels import format_share
from .overlay import heatmap_overlay
from .page import render_html

__all__ = ["heatmap_overlay", "colorize", "format_share", "render_html", "render_png", "write_report"]


def write_report(explanation: Explanation, html_path: str | Path | None = None, png_path: str | Path | None = None,
                 json_path: str | Path | None = None, atlas: Atlas | None = None) -> None:
    """Write whichever of the HTML report (with ``atlas``, patches per node), PNG figure and JSON tree were asked for."""
    if html_path is not None:
        Path(html_path).write_text(render_html(explanation, atlas=atlas), encoding="utf-8")
    if png_path is not None:
        render_png(explanation, path=png_path)
    if json_path is not None:
        Path(json_path).write_text(json.dumps(explanation.to_dict(), indent=2), encoding="utf-8")
