"""gap-service: hierarchical gAP explanations for any ONNX CNN."""

from .errors import GapError
from .explainer import Explainer
from .inputs import EncodedImage
from .options import ExplainOptions

__all__ = ["EncodedImage", "ExplainOptions", "Explainer", "GapError"]
__version__ = "0.1.0"
