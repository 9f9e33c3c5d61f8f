"""gap-service: hierarchical gAP explanations for any ONNX CNN."""

from .errors import GapError
from .explainer import Explainer

__all__ = ["Explainer", "GapError"]
__version__ = "0.1.0"
