"""Proto <-> numpy / domain objects. Pure functions: no gRPC, no engine calls.

Requests become typed dataclasses (validated here, with field paths as the proto names them);
explanations become protos; and, for the client, protos become ``Explanation`` objects again.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from ..engine import MAX_TOP_K
from ..errors import FieldViolation, InvalidInputError, invalid
from ..explanation import Explanation, Node, upsample
from . import pb

T = pb.tensor
E = pb.explanation

# proto DataType <-> numpy dtype (little-endian).
DTYPES: dict[int, np.dtype] = {
    T.DATA_TYPE_FLOAT32: np.dtype("<f4"),
    T.DATA_TYPE_FLOAT16: np.dtype("<f2"),
    T.DATA_TYPE_FLOAT64: np.dtype("<f8"),
    T.DATA_TYPE_UINT8: np.dtype("u1"),
    T.DATA_TYPE_INT8: np.dtype("i1"),
    T.DATA_TYPE_INT32: np.dtype("<i4"),
    T.DATA_TYPE_INT64: np.dtype("<i8"),
}
_BY_KIND = {(dtype.kind, dtype.itemsize): code for code, dtype in DTYPES.items()}

SCORE_MODES = {E.SCORE_MODE_UNSPECIFIED: "net", E.SCORE_MODE_NET: "net", E.SCORE_MODE_POSITIVE: "positive"}
SCORE_ENUMS = {"net": E.SCORE_MODE_NET, "positive": E.SCORE_MODE_POSITIVE}

DEFAULT_TOP_K = 5
DEFAULT_DEPTH = 3
MAX_DIMS = 8


def dtype_code(dtype: np.dtype | type | str) -> int:
    dtype = np.dtype(dtype)
    code = _BY_KIND.get((dtype.kind, dtype.itemsize))
    if code is None:
        raise InvalidInputError(f"dtype {dtype} has no gap.v1.DataType")
    return code


def dtype_name(code: int) -> str:
    try:
        return T.DataType.Name(code)
    except ValueError:
        return str(code)


# -- tensors ------------------------------------------------------------------------------------
def to_tensor(array: np.ndarray, dtype: np.dtype | str | None = None, name: str = "") -> pb.tensor.Tensor:
    """A numpy array as a raw little-endian Tensor (optionally cast to ``dtype``)."""
    array = np.asarray(array)
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    code = dtype_code(array.dtype)
    data = np.ascontiguousarray(array, dtype=DTYPES[code]).tobytes()
    return T.Tensor(dtype=code, shape=list(array.shape), data=data, name=name)


def from_tensor(tensor: pb.tensor.Tensor, field: str = "tensor") -> np.ndarray:
    """A Tensor as a numpy array (native byte order), checking dtype, shape and byte count."""
    dtype = DTYPES.get(tensor.dtype)
    if dtype is None:
        raise invalid(f"{field}.dtype", f"{dtype_name(tensor.dtype)} is not a valid element type")
    shape = tuple(int(d) for d in tensor.shape)
    if len(shape) > MAX_DIMS:
        raise invalid(f"{field}.shape", f"rank {len(shape)} exceeds {MAX_DIMS}")
    if any(d < 0 for d in shape):
        raise invalid(f"{field}.shape", f"{list(shape)} has negative dimensions")
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    expected = count * dtype.itemsize
    if len(tensor.data) != expected:
        raise invalid(
            f"{field}.data",
            f"has {len(tensor.data)} bytes; shape {list(shape)} of {dtype_name(tensor.dtype)} needs {expected}",
        )
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="), copy=False)


# -- requests -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExplainParams:
    """ExplainOptions, validated, with defaults applied."""

    layers: tuple[str, ...] | None
    target: int | None
    top_k: int
    depth: int
    min_share: float
    score: str

    def worst_case_nodes(self, extra_levels: int = 0) -> int:
        """Most nodes a tree of this top_k and depth (+ extra levels above) can have."""
        levels = self.depth + extra_levels
        return sum(self.top_k**level for level in range(levels + 1))


@dataclass(frozen=True)
class OutputParams:
    map_dtype: np.dtype
    heatmaps: bool
    cams: bool
    picture: bool
    omit_maps: bool


def explain_params(options: pb.explanation.ExplainOptions, field: str = "options") -> ExplainParams:
    violations: list[FieldViolation] = []
    top_k = options.top_k if options.HasField("top_k") else DEFAULT_TOP_K
    depth = options.depth if options.HasField("depth") else DEFAULT_DEPTH
    target = options.target if options.HasField("target") else None
    if not 1 <= top_k <= MAX_TOP_K:
        violations.append(FieldViolation(f"{field}.top_k", f"{top_k} is out of range [1, {MAX_TOP_K}]"))
    if depth < 1:
        violations.append(FieldViolation(f"{field}.depth", f"{depth} must be at least 1"))
    if target is not None and target < 0:
        violations.append(FieldViolation(f"{field}.target", f"{target} must not be negative"))
    if not (0.0 <= options.min_share < 1.0):  # also rejects NaN
        violations.append(FieldViolation(f"{field}.min_share", f"{options.min_share} is out of range [0, 1)"))
    if options.score not in SCORE_MODES:
        violations.append(FieldViolation(f"{field}.score", f"{options.score} is not a ScoreMode"))
    for index, name in enumerate(options.layers):
        if not name:
            violations.append(FieldViolation(f"{field}.layers[{index}]", "is empty"))
    if len(set(options.layers)) != len(options.layers):
        violations.append(FieldViolation(f"{field}.layers", "names a layer twice"))
    _raise(violations)
    return ExplainParams(
        layers=tuple(options.layers) or None, target=target, top_k=top_k, depth=depth,
        min_share=float(options.min_share), score=SCORE_MODES[options.score],
    )


def output_params(output: pb.explanation.OutputOptions, field: str = "output") -> OutputParams:
    if output.map_dtype in (T.DATA_TYPE_UNSPECIFIED, T.DATA_TYPE_FLOAT32):
        map_dtype = np.dtype("<f4")
    elif output.map_dtype == T.DATA_TYPE_FLOAT16:
        map_dtype = np.dtype("<f2")
    else:
        raise invalid(f"{field}.map_dtype", f"{dtype_name(output.map_dtype)}: maps are DATA_TYPE_FLOAT32 or DATA_TYPE_FLOAT16")
    return OutputParams(map_dtype, output.heatmaps, output.cams, output.picture, output.omit_maps)


def require_model(model: str) -> None:
    if not model:
        raise invalid("model", "is required: the name of a model (see ListModels)")


def path_param(path: Sequence[int], field: str = "path") -> list[int]:
    violations = [FieldViolation(f"{field}[{i}]", f"channel {c} must not be negative") for i, c in enumerate(path) if c < 0]
    _raise(violations)
    return [int(c) for c in path]


def _raise(violations: list[FieldViolation]) -> None:
    if violations:
        message = "; ".join(f"{v.field}: {v.description}" for v in violations)
        raise InvalidInputError(message, tuple(violations))


# -- explanations -> protos ---------------------------------------------------------------------
def node_proto(node: Node, path: list[int], output: OutputParams, input_hw: tuple[int, int],
               ids: dict[int, int] | None = None, with_map: bool = True, with_children: bool = True) -> pb.explanation.Node:
    """One node; ``ids`` renumbers ids (subtrees), dropping parents/children outside it."""
    ids = ids if ids is not None else {}
    new_id = ids.get(node.id, node.id) if ids else node.id
    message = E.Node(
        id=new_id, level=node.level, layer=node.layer, channel=node.channel,
        score=float(node.score), share=float(node.share), path=path,
        children=[ids[c] if ids else c for c in node.children if not ids or c in ids] if with_children else [],
    )
    if node.parent is not None and (not ids or node.parent in ids):
        message.parent = ids[node.parent] if ids else node.parent
    if with_map and not output.omit_maps:
        message.map.CopyFrom(to_tensor(node.map, output.map_dtype))
    if with_map and output.heatmaps:
        message.heatmap_png = heatmap_png(node.map, input_hw)
    return message


def header_proto(explanation: Explanation, version: int, output: OutputParams) -> pb.explanation.Explanation:
    message = E.Explanation(
        model=explanation.model, version=version, target=explanation.target, label=explanation.label or "",
        logit=float(explanation.logit), layers=list(explanation.layers),
        score=SCORE_ENUMS.get(explanation.score_mode, E.SCORE_MODE_UNSPECIFIED),
        input_height=int(explanation.input_hw[0]), input_width=int(explanation.input_hw[1]),
    )
    if explanation.probability is not None:
        message.probability = float(explanation.probability)
    if output.picture and explanation.picture is not None:
        message.picture.CopyFrom(to_tensor(np.asarray(explanation.picture, dtype=np.uint8)))
    return message


def cams_protos(explanation: Explanation, output: OutputParams) -> dict[str, pb.tensor.Tensor]:
    if not output.cams:
        return {}
    return {name: to_tensor(values, output.map_dtype) for name, values in explanation.cams.items()}


def paths_of(explanation: Explanation) -> dict[int, list[int]]:
    paths: dict[int, list[int]] = {0: []}
    for node in explanation.nodes[1:]:
        paths[node.id] = [*paths[node.parent], node.channel]  # parents come before children
    return paths


def explanation_proto(explanation: Explanation, version: int, output: OutputParams) -> pb.explanation.Explanation:
    message = header_proto(explanation, version, output)
    paths = paths_of(explanation)
    message.nodes.extend(node_proto(n, paths[n.id], output, explanation.input_hw) for n in explanation.nodes)
    for name, tensor in cams_protos(explanation, output).items():
        message.cams[name].CopyFrom(tensor)
    return message


def find_path(explanation: Explanation, path: Sequence[int], field: str = "path") -> Node:
    """The node at ``path`` (channels from the root), or an InvalidInputError naming the step."""
    node = explanation.root
    for step, channel in enumerate(path):
        children = [explanation.nodes[c] for c in node.children]
        match = next((c for c in children if c.channel == channel), None)
        if match is None:
            kept = [c.channel for c in children]
            raise invalid(
                f"{field}[{step}]",
                f"channel {channel} of layer '{explanation.layers[step]}' is not a supporting channel of its parent "
                f"for these options (its children are channels {kept})",
            )
        node = match
    return node


def subtree_proto(explanation: Explanation, node: Node, path: list[int], version: int,
                  output: OutputParams) -> pb.explanation.Explanation:
    """The subtree below ``node`` as an Explanation whose nodes[0] is the node (ids renumbered)."""
    order = [node]
    for current in order:  # breadth-first, the same order as the engine creates nodes
        order.extend(explanation.nodes[c] for c in current.children)
    order.sort(key=lambda n: n.id)
    ids = {n.id: index for index, n in enumerate(order)}
    message = header_proto(explanation, version, output)
    paths = {node.id: list(path)}
    for n in order[1:]:
        paths[n.id] = [*paths[n.parent], n.channel]
    message.nodes.extend(node_proto(n, paths[n.id], output, explanation.input_hw, ids) for n in order)
    if not path:
        for name, tensor in cams_protos(explanation, output).items():
            message.cams[name].CopyFrom(tensor)
    return message


# -- heatmaps -----------------------------------------------------------------------------------
# A perceptually ordered colour map (dark purple -> red -> yellow), anchors of "inferno".
_ANCHORS = np.array([
    [0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21], [250, 193, 39], [252, 255, 164],
], dtype=np.float32)


def colormap(values: np.ndarray) -> np.ndarray:
    """[H, W] in [0, 1] -> [H, W, 3] uint8."""
    position = np.clip(values, 0, 1) * (len(_ANCHORS) - 1)
    low = np.floor(position).astype(int)
    high = np.minimum(low + 1, len(_ANCHORS) - 1)
    frac = (position - low)[..., None]
    return (_ANCHORS[low] * (1 - frac) + _ANCHORS[high] * frac).round().astype(np.uint8)


def heatmap_png(values: np.ndarray, size: tuple[int, int]) -> bytes:
    """A map upsampled to ``size`` (bilinear), scaled by its maximum, colour-mapped, as PNG."""
    from PIL import Image

    big = upsample(values, size)
    peak = float(big.max()) if big.size else 0.0
    scaled = big / peak if peak > 0 else np.zeros_like(big)
    buffer = io.BytesIO()
    Image.fromarray(colormap(scaled), "RGB").save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


def heatmap_bytes_bound(size: tuple[int, int]) -> int:
    """An upper bound of heatmap_png's size for an input of this size (raw RGB + PNG overhead)."""
    height, width = size
    raw = height * (width * 3 + 1)
    return raw + raw // 100 + 1024


# -- protos -> domain (client side) -------------------------------------------------------------
def explanation_from_proto(message: pb.explanation.Explanation, cams: Iterable[tuple[str, pb.tensor.Tensor]] = ()) -> Explanation:
    """Rebuild an ``Explanation`` from its proto (maps as float32; missing maps as zeros)."""
    nodes: list[Node] = []
    for index, n in enumerate(message.nodes):
        if n.id != index:
            raise ValueError(f"node {index} has id {n.id}: ids must index the node list")
        nodes.append(node_from_proto(n))
    picture = from_tensor(message.picture, "picture") if message.HasField("picture") else None
    all_cams = {name: from_tensor(t, f"cams[{name}]").astype(np.float32) for name, t in message.cams.items()}
    all_cams.update({name: from_tensor(t, f"cams[{name}]").astype(np.float32) for name, t in cams})
    return Explanation(
        model=message.model, target=message.target, label=message.label or None, logit=message.logit,
        probability=message.probability if message.HasField("probability") else None,
        layers=list(message.layers), score_mode=SCORE_MODES.get(message.score, "net"), nodes=nodes,
        input_hw=(message.input_height, message.input_width), picture=picture, cams=all_cams,
    )


def node_from_proto(n: pb.explanation.Node) -> Node:
    values = from_tensor(n.map, f"nodes[{n.id}].map").astype(np.float32) if n.HasField("map") else np.zeros((0, 0), np.float32)
    return Node(
        id=n.id, parent=n.parent if n.HasField("parent") else None, level=n.level, layer=n.layer,
        channel=n.channel, score=n.score, share=n.share, map=values, children=list(n.children),
    )
