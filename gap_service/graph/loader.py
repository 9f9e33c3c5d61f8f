"""Load any ONNX CNN and normalise it into one canonical form the rewriter can rely on.

Canonical form: default-domain opset >= 13, initializers not listed as graph inputs, concrete
input shapes (batch 1 unless asked otherwise), constant sub-graphs (weights made by
Constant/ConstantOfShape, shape arithmetic) folded into initializers, and a known static
shape and dtype for every tensor.
"""

from __future__ import annotations

import copy
import os
from contextlib import contextmanager
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import version_converter
from onnx_graphsurgeon.logger import G_LOGGER

from ..errors import InvalidInputError, InvalidModelError

G_LOGGER.severity = G_LOGGER.ERROR  # its folding chatter is not for our users

MIN_OPSET = 13
UPGRADE_TO_OPSET = 17

ModelSource = str | os.PathLike | bytes | onnx.ModelProto


@dataclass(frozen=True)
class InputSpec:
    """A graph input as declared: dims are ints, or names/None where dynamic."""

    name: str
    dtype: np.dtype
    dims: tuple[int | str | None, ...]


@dataclass
class NormalizedModel:
    """A canonical model plus the static shape and dtype of every tensor in it."""

    model: onnx.ModelProto
    inputs: dict[str, tuple[int, ...]]
    outputs: list[str]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, np.dtype]
    opset: int

    def graph(self) -> gs.Graph:
        """A fresh onnx-graphsurgeon copy that the caller may mutate."""
        return gs.import_onnx(self.model)


def read_model(source: ModelSource) -> onnx.ModelProto:
    """Parse a model from a path, bytes or a proto, with a clear error if it is not ONNX."""
    if isinstance(source, onnx.ModelProto):
        return copy.deepcopy(source)
    try:
        if isinstance(source, bytes):
            model = onnx.load_from_string(source)
        else:
            path = Path(source)
            if not path.is_file():
                raise InvalidModelError(f"model file not found: {path}")
            model = onnx.load(str(path))
    except InvalidModelError:
        raise
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise InvalidModelError(f"not a readable ONNX model: {exc}") from exc
    if not model.graph.node:
        raise InvalidModelError("the ONNX model has an empty graph")
    return model


def default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    raise InvalidModelError("the model imports no default-domain (ai.onnx) opset")


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The real (non-initializer) graph inputs with their declared dims."""
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dims = tuple(
            d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or None)
            for d in tensor_type.shape.dim
        )
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        specs.append(InputSpec(value.name, np.dtype(dtype), dims))
    return specs


def resolve_input_shapes(
    specs: Sequence[InputSpec], requested: Mapping[str, Sequence[int]] | None
) -> dict[str, tuple[int, ...]]:
    """Concrete shapes: requested ones win, a dynamic leading (batch) dim becomes 1."""
    requested = dict(requested or {})
    unknown = set(requested) - {s.name for s in specs}
    if unknown:
        raise InvalidInputError(f"unknown model input(s) {sorted(unknown)}; inputs are {[s.name for s in specs]}")
    shapes = {}
    for spec in specs:
        if spec.name in requested:
            shape = tuple(int(d) for d in requested[spec.name])
            if len(shape) != len(spec.dims):
                raise InvalidInputError(
                    f"input '{spec.name}' has rank {len(spec.dims)} (dims {list(spec.dims)}), got shape {list(shape)}"
                )
            for axis, (want, got) in enumerate(zip(spec.dims, shape)):
                if isinstance(want, int) and want != got:
                    raise InvalidInputError(
                        f"input '{spec.name}' needs dim {axis} = {want} (dims {list(spec.dims)}), got shape {list(shape)}"
                    )
            shapes[spec.name] = shape
            continue
        dims = [d if isinstance(d, int) else (1 if axis == 0 else None) for axis, d in enumerate(spec.dims)]
        if any(d is None for d in dims):
            raise InvalidInputError(
                f"input '{spec.name}' has dynamic dims {list(spec.dims)}; give a concrete input shape"
            )
        shapes[spec.name] = tuple(dims)  # type: ignore[arg-type]
    return shapes


def normalize(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None = None) -> NormalizedModel:
    """Bring a parsed model into the canonical form described in the module docstring."""
    model = copy.deepcopy(model)
    _drop_initializer_inputs(model)
    shapes = resolve_input_shapes(input_specs(model), input_shapes)
    _fix_input_shapes(model, shapes)
    model = _fold_constants(model)  # first: the version converter needs weights with known shapes
    if default_opset(model) < MIN_OPSET:
        # The converter's adapters add Constant nodes (e.g. axes moved from attributes to inputs).
        model = _fold_constants(_upgrade_opset(model))
    model = _infer_shapes(model)
    tensor_shapes, tensor_dtypes = _collect_shapes(model)
    _probe_missing_shapes(model, shapes, tensor_shapes, tensor_dtypes)
    return NormalizedModel(
        model=model,
        inputs=shapes,
        outputs=[o.name for o in model.graph.output],
        shapes=tensor_shapes,
        dtypes=tensor_dtypes,
        opset=default_opset(model),
    )


def _drop_initializer_inputs(model: onnx.ModelProto) -> None:
    """Old exporters list every weight as a graph input too; weights are not inputs to us."""
    initializers = {t.name for t in model.graph.initializer}
    kept = [v for v in model.graph.input if v.name not in initializers]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    model.ir_version = max(model.ir_version, 4)  # IR >= 4 lets initializers stand alone


LARGE_TENSOR_BYTES = 1 << 16


@contextmanager
def _weights_set_aside(model: onnx.ModelProto):
    """Let onnx's whole-model passes (version conversion, shape inference) skip large weights.

    They serialise the model, and a VGG's 550 MB of weights dominated normalisation time. Large
    initializers are marked as external data for the duration (the passes need only their dims)
    and their bytes are put back by name afterwards; the caller receives a dict to restore into.
    """
    stored: dict[str, bytes] = {}
    for tensor in model.graph.initializer:
        if tensor.HasField("raw_data") and len(tensor.raw_data) >= LARGE_TENSOR_BYTES:
            stored[tensor.name] = tensor.raw_data
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
            del tensor.external_data[:]
            tensor.external_data.add(key="location", value="gap-set-aside")
    yield stored


def _restore_weights(model: onnx.ModelProto, stored: dict[str, bytes]) -> None:
    for tensor in model.graph.initializer:
        if tensor.name in stored:
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
            tensor.raw_data = stored[tensor.name]


def _upgrade_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    opset = default_opset(model)
    try:
        with _weights_set_aside(model) as stored:
            upgraded = version_converter.convert_version(model, UPGRADE_TO_OPSET)
        _restore_weights(upgraded, stored)
        _restore_weights(model, stored)
    except Exception as exc:
        raise InvalidModelError(
            f"cannot upgrade the model from opset {opset} to {UPGRADE_TO_OPSET} with onnx's version converter: {exc}"
        ) from exc
    return upgraded


def _fix_input_shapes(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]]) -> None:
    for value in model.graph.input:
        if value.name not in shapes:
            continue
        dims = value.type.tensor_type.shape.dim
        for dim, size in zip(dims, shapes[value.name]):
            dim.Clear()
            dim.dim_value = size
    # Shapes recorded by the exporter may carry the old symbolic batch; recompute them all.
    del model.graph.value_info[:]
    for value in model.graph.output:
        value.type.tensor_type.ClearField("shape")


def _fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold weights and shape arithmetic with onnx-graphsurgeon (it evaluates with onnxruntime)."""
    try:
        graph = gs.import_onnx(model)
        graph.fold_constants(fold_shapes=True, error_ok=False).cleanup(remove_unused_graph_inputs=False).toposort()
        folded = gs.export_onnx(graph, do_type_check=False)
    except Exception as exc:
        raise InvalidModelError(f"constant folding failed: {exc}") from exc
    folded.ir_version = model.ir_version
    del folded.opset_import[:]
    folded.opset_import.extend(model.opset_import)
    return folded


def _infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        with _weights_set_aside(model) as stored:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
        _restore_weights(inferred, stored)
        _restore_weights(model, stored)
        return inferred
    except Exception as exc:
        raise InvalidModelError(f"ONNX shape inference failed: {exc}") from exc


def _value_shape(value: onnx.ValueInfoProto) -> tuple[int, ...] | None:
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    dims = []
    for d in tensor_type.shape.dim:
        if not d.HasField("dim_value"):
            return None
        dims.append(d.dim_value)
    return tuple(dims)


def _collect_shapes(model: onnx.ModelProto) -> tuple[dict[str, tuple[int, ...]], dict[str, np.dtype]]:
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, np.dtype] = {}
    for value in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        elem = value.type.tensor_type.elem_type
        if elem:
            dtypes[value.name] = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem))
        shape = _value_shape(value)
        if shape is not None:
            shapes[value.name] = shape
    for init in model.graph.initializer:
        shapes[init.name] = tuple(init.dims)
        dtypes[init.name] = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type))
    return shapes, dtypes


def _probe_missing_shapes(
    model: onnx.ModelProto,
    input_shapes: Mapping[str, tuple[int, ...]],
    shapes: dict[str, tuple[int, ...]],
    dtypes: dict[str, np.dtype],
) -> None:
    """Where static inference gave up, run the model once and read the real shapes."""
    missing = [o for n in model.graph.node for o in n.output if o and (o not in shapes or o not in dtypes)]
    if not missing:
        return
    from ..runtime import run_probe  # local import: runtime depends on this module's types

    values = run_probe(model, input_shapes, missing)
    for name, value in values.items():
        shapes[name] = tuple(value.shape)
        dtypes[name] = value.dtype
