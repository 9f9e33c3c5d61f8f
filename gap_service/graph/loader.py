"""Load any ONNX CNN and normalise it into one canonical form the rewriter can rely on.

Canonical form: default-domain opset >= 13, initializers not listed as graph inputs, concrete
input shapes (batch 1 unless asked otherwise), constant sub-graphs (weights made by
Constant/ConstantOfShape, shape arithmetic) folded into initializers, and a known static
shape and dtype for every tensor.
"""

from __future__ import annotations

import copy
import math
import os
from contextlib import contextmanager
from collections.abc import Iterator, Mapping, Sequence
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
    """Parse a model from a path, bytes or a proto, with a clear error if it is not ONNX.

    External data is read by ``_load_external_data`` (our own path guard, whatever onnx's
    version), and only for a model read from a file: bytes and protos have no folder to read from.
    """
    if isinstance(source, onnx.ModelProto):
        model = copy.deepcopy(source)
        _load_external_data(model, None)
        return model
    try:
        if isinstance(source, bytes):
            model = onnx.load_from_string(source)
        else:
            path = Path(source)
            if not path.is_file():
                raise InvalidModelError(f"model file not found: {path}")
            model = onnx.load(str(path), load_external_data=False)
    except InvalidModelError:
        raise
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise InvalidModelError(f"not a readable ONNX model: {exc}") from exc
    if not model.graph.node:
        raise InvalidModelError("the ONNX model has an empty graph")
    _load_external_data(model, None if isinstance(source, bytes) else Path(source).parent)
    return model


def _stored_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor whose values the file stores: initializers and Constant-like attributes, subgraphs too."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("sparse_tensor"):
                yield from (attribute.sparse_tensor.values, attribute.sparse_tensor.indices)
            for subgraph in [*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs]:
                yield from _stored_tensors(subgraph)


def _load_external_data(model: onnx.ModelProto, folder: Path | None) -> None:
    """Read the tensors kept in external files into the model, through ``external_data_path``."""
    for tensor in _stored_tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        where = f"tensor '{tensor.name}' keeps its data in external file '{info.get('location', '')}'"
        if folder is None:
            raise InvalidModelError(f"{where}, but the model was not read from a file; load it from its path")
        path = external_data_path(folder, info.get("location", ""), where)
        try:
            offset = int(info.get("offset", 0))
            size = os.stat(path).st_size
            length = int(info["length"]) if "length" in info else size - offset
        except (OSError, ValueError) as exc:
            raise InvalidModelError(f"{where}: {exc}") from exc
        if offset < 0 or length < 0 or offset + length > size:
            raise InvalidModelError(f"{where}: bytes {offset}..{offset + length} are outside the file's {size} bytes")
        expected = _stored_bytes(tensor)
        if expected is not None and expected != length:
            raise InvalidModelError(f"{where}: holds {length} bytes, but dims {list(tensor.dims)} need {expected}")
        with os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)), "rb") as file:
            file.seek(offset)
            tensor.raw_data = file.read(length)
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT


def external_data_path(folder: Path, location: str, where: str) -> Path:
    """The file named by an external-data ``location``, refused unless it is a plain file inside ``folder``.

    Relative, without '..', no symlink on the way, one hard link, its real path inside the
    folder: a model file cannot make the server read (and serve back as weights) any other file.
    """
    parts = location.replace("\\", "/").split("/")
    if not location or os.path.isabs(location) or location.startswith(("/", "\\")) or ":" in parts[0]:
        raise InvalidModelError(f"{where}: external data must be a relative path inside the model's folder")
    if ".." in parts:
        raise InvalidModelError(f"{where}: '..' is not allowed in an external-data path")
    path = folder
    for part in (p for p in parts if p not in ("", ".")):
        path = path / part
        if path.is_symlink():
            raise InvalidModelError(f"{where}: '{path.relative_to(folder)}' is a symbolic link; external data must be plain files")
    if not path.is_file():
        raise InvalidModelError(f"{where}: no such file in {folder}")
    if os.stat(path).st_nlink > 1:
        raise InvalidModelError(f"{where}: the file has several hard links; copy it into the model's folder")
    if os.path.commonpath([os.path.realpath(path), os.path.realpath(folder)]) != os.path.realpath(folder):
        raise InvalidModelError(f"{where}: resolves outside {folder}")
    return path


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
    refuse_large_tensors(_inferred(model))  # before folding computes (allocates) any of them
    model = _fold_constants(model)  # first: the version converter needs weights with known shapes
    if default_opset(model) < MIN_OPSET:
        # The converter's adapters add Constant nodes (e.g. axes moved from attributes to inputs).
        model = _fold_constants(_upgrade_opset(model))
    model = _infer_shapes(model)
    refuse_large_tensors(model)  # shapes that only folding made known
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


MAX_COMPUTED_TENSOR_BYTES = 256 * 2**20


def _itemsize(elem_type: int) -> int | None:
    """Bytes per element of an ONNX element type; None for strings and types numpy does not know."""
    if elem_type == onnx.TensorProto.STRING:
        return None
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return None


def _stored_bytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes a stored tensor's dims call for (Python integers: no overflow); None if unknown."""
    itemsize = _itemsize(tensor.data_type)
    return None if itemsize is None else math.prod(tensor.dims) * itemsize


def refuse_large_tensors(model: onnx.ModelProto, limit: int = MAX_COMPUTED_TENSOR_BYTES) -> None:
    """Refuse a model whose computed tensors (not its stored weights) would exceed ``limit`` bytes.

    Judged from the shapes shape inference declared, so nothing is allocated: a 6 KB file with a
    ConstantOfShape [1, 32768, 32768] is refused here instead of costing 4 GiB to fold. Dims left
    unknown count as 1. Every such tensor is listed, with the node that makes it.
    """
    graph = model.graph
    stored = {t.name for t in graph.initializer}
    stored.update(n.output[0] for n in graph.node if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value")
    producers = {output: node for node in graph.node for output in node.output}
    found = []
    for value in [*graph.value_info, *graph.output]:
        tensor_type = value.type.tensor_type
        if value.name in stored or not tensor_type.elem_type:
            continue
        dims = [d.dim_value for d in tensor_type.shape.dim if d.HasField("dim_value") and d.dim_value > 0]
        size = math.prod(dims) * (_itemsize(tensor_type.elem_type) or 1)
        if size > limit:
            node = producers.get(value.name)
            made_by = f" (made by {node.op_type} node '{node.name}')" if node is not None else ""
            found.append(f"'{value.name}' {dims}{made_by}: {size / 2**20:.0f} MiB")
    _refuse(found, limit)


def _refuse(too_large: list[str], limit: int) -> None:
    if too_large:
        raise InvalidModelError(f"{len(too_large)} tensor(s) would exceed the limit of {limit // 2**20} MiB per "
                                f"computed tensor: {', '.join(too_large)}")


LARGE_TENSOR_BYTES = 1 << 16


def _weights(model: onnx.ModelProto) -> Iterator[tuple[str, onnx.TensorProto]]:
    """Initializers and Constant values, by a key unique in the graph."""
    yield from ((f"initializer {t.name}", t) for t in model.graph.initializer)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].HasField("t"):
            yield f"constant {node.output[0]}", node.attribute[0].t


def _large_weights(model: onnx.ModelProto) -> list[tuple[str, onnx.TensorProto]]:
    """The weights of LARGE_TENSOR_BYTES or more (raw data); ByteSize reads no bytes into Python."""
    return [(key, t) for key, t in _weights(model) if t.HasField("raw_data") and t.ByteSize() >= LARGE_TENSOR_BYTES]


def _set_aside(tensor: onnx.TensorProto) -> None:
    """Drop a tensor's bytes but keep it valid (dims, a placeholder external location)."""
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    tensor.external_data.add(key="location", value="gap-set-aside")


@contextmanager
def _weights_set_aside(model: onnx.ModelProto):
    """Let onnx's whole-model passes (version conversion, shape inference) skip large weights.

    They serialise the model, and a VGG's 550 MB of weights dominated normalisation time. Large
    initializers and Constant values are marked as external data for the duration (the passes
    need only their dims) and their bytes are put back afterwards; the caller receives a dict to
    restore into.
    """
    stored: dict[str, bytes] = {}
    for key, tensor in _large_weights(model):
        stored[key] = tensor.raw_data
        _set_aside(tensor)
    yield stored


def _restore_weights(model: onnx.ModelProto, stored: dict[str, bytes]) -> None:
    for key, tensor in _weights(model):
        if key in stored:
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
            tensor.raw_data = stored[key]


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


def _without_large_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose large weights keep their dims but not their bytes, for passes that need only shapes."""
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model)  # one copy in C; reading raw_data into Python would copy twice
    for _, tensor in _large_weights(skeleton):
        _set_aside(tensor)
    return skeleton


def _inferred(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX shape inference (with data propagation) on the model without its large weights."""
    try:
        return onnx.shape_inference.infer_shapes(_without_large_weights(model), strict_mode=False, data_prop=True)
    except Exception as exc:
        raise InvalidModelError(f"ONNX shape inference failed: {exc}") from exc


def _infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with the inferred shapes of its tensors (value_info and outputs)."""
    inferred = _inferred(model).graph
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.value_info)
    for output, typed in zip(model.graph.output, inferred.output):
        output.CopyFrom(typed)
    return model


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
    _refuse([f"'{name}' {list(value.shape)}: {value.nbytes / 2**20:.0f} MiB" for name, value in values.items()
             if value.nbytes > MAX_COMPUTED_TENSOR_BYTES], MAX_COMPUTED_TENSOR_BYTES)
    for name, value in values.items():
        shapes[name] = tuple(value.shape)
        dtypes[name] = value.dtype
