"""gap-service: hierarchical gAP explanations for any ONNX CNN."""

from .errors import GapError
from .explainer import ExplainJob, Explainer
from .inputs import EncodedImage
from .options import DetectionTarget, ElementTarget, ExplainOptions, RegionTarget

__all__ = ["DetectionTarget", "ElementTarget", "EncodedImage", "ExplainJob", "ExplainOptions", "Explainer", "GapError", "RegionTarget"]
__version__ = "0.1.0"
