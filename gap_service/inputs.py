"""What a request gives as input, checked against the model: tensors or an encoded image.

An image goes through the model's preprocessing and also yields the picture the network saw
(for overlays). Field paths in errors are those of a request's ``input`` (``input.tensor.shape``,
``input.image``), the same in Python, on the command line and over gRPC.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import InvalidInputError, InvalidModelError, invalid, quoted
from .graph.loader import InputSpec
from .preprocess import DEFAULT_MAX_PIXELS, Preprocessing, decode_image, preprocess


@dataclass(frozen=True)
class EncodedImage:
    """An encoded image (PNG, JPEG, ...): the model's preprocessing makes the input tensor from it."""

    data: bytes


Inputs = np.ndarray | Mapping[str, np.ndarray] | EncodedImage


@dataclass(frozen=True)
class Prepared:
    """Validated feeds, and the RGB picture they show when the input was an image."""

    feeds: dict[str, np.ndarray]
    picture: np.ndarray | None = None


@dataclass(frozen=True)
class InputPolicy:
    """How a model takes inputs: its specs, preprocessing for images, and whether shapes are fixed."""

    specs: Sequence[InputSpec]
    preprocessing: Preprocessing | None = None
    fixed_shapes: Mapping[str, tuple[int, ...]] | None = None  # a served model: exactly these shapes
    max_image_pixels: int = DEFAULT_MAX_PIXELS

    def prepare(self, inputs: Inputs, picture: np.ndarray | None = None) -> Prepared:
        if isinstance(inputs, EncodedImage):
            return self._image(inputs)
        if isinstance(inputs, Mapping):
            return Prepared(self._tensors(dict(inputs)), picture)
        if len(self.specs) != 1:
            raise InvalidInputError(f"the model has {len(self.specs)} inputs {[s.name for s in self.specs]}; pass a dict")
        return Prepared(self._tensors({self.specs[0].name: inputs}), picture)

    def _image(self, image: EncodedImage) -> Prepared:
        if len(self.specs) != 1:
            raise invalid("input.image", f"the model has {len(self.specs)} inputs; send a tensor")
        if not image.data:
            raise invalid("input.image", "is empty")
        if self.preprocessing is None:
            raise invalid("input.image", "the model has no preprocessing configured; send a tensor")
        decoded = decode_image(image.data, self.max_image_pixels, field_name="input.image")
        tensor, picture = preprocess(decoded, self.preprocessing, self.max_image_pixels, field_name="input.image")
        spec = self.specs[0]
        expected = (self.fixed_shapes or {}).get(spec.name)
        if expected is not None and tuple(tensor.shape) != tuple(expected):
            raise InvalidModelError(f"its preprocessing makes a {list(tensor.shape)} tensor but the input "
                                    f"'{spec.name}' is {list(expected)}; fix the model's config.json")
        return Prepared({spec.name: tensor.astype(spec.dtype, copy=False)}, picture)

    def _tensors(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        specs = {s.name: s for s in self.specs}
        for name in feeds:
            if name not in specs:
                raise invalid("input.tensor.name", f"unknown input {quoted(name)}; the model's inputs are {sorted(specs)}")
        for name, spec in specs.items():
            if name not in feeds:
                raise invalid("input.tensor.name", f"missing input '{name}'")
            feeds[name] = self._tensor(name, spec, np.asarray(feeds[name]))
        return feeds

    def _tensor(self, name: str, spec: InputSpec, array: np.ndarray) -> np.ndarray:
        if array.dtype.kind not in "fiu":
            raise invalid("input.tensor.dtype", f"{array.dtype} is not numeric")
        if self.fixed_shapes is not None and array.dtype != np.dtype(spec.dtype):
            raise invalid("input.tensor.dtype", f"{array.dtype}; input '{name}' takes {np.dtype(spec.dtype)}")
        array = array.astype(spec.dtype, copy=False)
        expected = (self.fixed_shapes or {}).get(name)
        if expected is not None and tuple(array.shape) != tuple(expected):
            raise invalid("input.tensor.shape", f"{list(array.shape)}; input '{name}' is {list(expected)}")
        if array.ndim != len(spec.dims):
            raise invalid("input.tensor.shape", f"{list(array.shape)}; input '{name}' has rank {len(spec.dims)} {list(spec.dims)}")
        if array.shape and array.shape[0] != 1:
            raise invalid("input.tensor.shape", f"batch size {array.shape[0]}: explanations take one input at a time (batch 1)")
        if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
            raise invalid("input.tensor.data", "contains NaN or infinite values")
        return np.ascontiguousarray(array)
