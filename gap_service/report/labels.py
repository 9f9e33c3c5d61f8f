"""What the page and the figure write beside the maps: numbers, names, the decision, level colours."""

from __future__ import annotations

from ..explanation import Explanation

# One colour per tree level (badges, share bars, figure row labels), cycling past eight levels.
LEVEL_COLOURS = ["#1f2937", "#2563eb", "#059669", "#d97706", "#dc2626", "#7c3aed", "#0891b2", "#be185d"]


def level_colour(level: int) -> str:
    """The level's colour as ``#rrggbb``."""
    return LEVEL_COLOURS[level % len(LEVEL_COLOURS)]


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


def decision_text(explanation: Explanation) -> str:
    """The explained decision as readers name it: the label when known, and the class index (or
    what other target it is: a detection, a region, an element, a seed)."""
    explained = explanation.explained
    if explained is not None and explained.kind != "class":
        return explained.describe(explanation.label)
    label = f"\u201c{explanation.label}\u201d " if explanation.label is not None else ""
    return f"{label}(class {explanation.target})"
