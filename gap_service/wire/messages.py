"""gap.v1 messages <-> the library's types, both ways (the server reads what the clients write).

Pure functions: no gRPC, no model. Values are not validated here beyond what the wire format
itself requires (a oneof set, a known enum, a well-formed tensor); the library validates them
once, with the same field paths (``options.top_k``, ``input.tensor.shape``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from ..atlas import Atlas, ChannelEntry, ChannelStats, Patch
from ..colors import heatmap_png
from ..errors import FieldViolation, InvalidInputError, ResourceLimitError, invalid
from ..explainer import ModelDescription
from ..explanation import ExplainedTarget, Explanation, Node
from ..inputs import EncodedImage, Inputs
from ..options import DetectionTarget, ElementTarget, ExplainOptions, RegionTarget, Target
from ..prediction import DEFAULT_TOP_CLASSES, ClassScore, DetectedBox, Prediction
from ..targets import Task
from ..preprocess import decode_image
from . import pb
from .tensors import dtype_code, dtype_name, from_tensor, to_tensor

S = pb.service
E = pb.explanation
M = pb.model
T = pb.tensor

SCORE_MODES = {E.SCORE_MODE_UNSPECIFIED: "net", E.SCORE_MODE_NET: "net", E.SCORE_MODE_POSITIVE: "positive"}
SCORE_ENUMS = {"net": E.SCORE_MODE_NET, "positive": E.SCORE_MODE_POSITIVE}
_DEFAULTS = ExplainOptions()


# -- requests -----------------------------------------------------------------------------------
def options_from_proto(message: pb.explanation.ExplainOptions) -> ExplainOptions:
    """Unset fields take ExplainOptions' defaults; an unknown ScoreMode is left for validation to name."""
    return ExplainOptions(
        layers=tuple(message.layers) or None,
        target=target_from_proto(message.target) if message.HasField("target") else None,
        output=message.output or None,
        seed=from_tensor(message.seed, "options.seed") if message.HasField("seed") else None,
        top_k=message.top_k if message.HasField("top_k") else _DEFAULTS.top_k,
        depth=message.depth if message.HasField("depth") else _DEFAULTS.depth,
        min_share=float(message.min_share),
        score=SCORE_MODES.get(message.score, f"ScoreMode {message.score}"),
    )


def options_to_proto(options: ExplainOptions) -> pb.explanation.ExplainOptions:
    """The wire's part of the options (memory bounds and precision are the server's business)."""
    message = E.ExplainOptions(layers=list(options.layers or ()), top_k=options.top_k, depth=options.depth,
                               min_share=options.min_share, score=SCORE_ENUMS[options.score], output=options.output or "")
    if options.target is not None:
        message.target.CopyFrom(target_to_proto(options.target))
    if options.seed is not None:
        message.seed.CopyFrom(to_tensor(np.asarray(options.seed, np.float32)))
    return message


def target_from_proto(message: pb.explanation.Target) -> Target:
    kind = message.WhichOneof("kind")
    if kind is None:
        raise invalid("options.target", "set one of class_index, detection, region or element (or leave target unset)")
    if kind == "class_index":
        return message.class_index
    if kind == "detection":
        detection = message.detection
        return DetectionTarget(detection.index, detection.class_index if detection.HasField("class_index") else None,
                               detection.spread)
    if kind == "region":
        region = message.region
        mask = from_tensor(region.mask, "options.target.region.mask") if region.HasField("mask") else None
        return RegionTarget(region.channel, tuple(region.box) if region.box else None, mask)  # type: ignore[arg-type]
    return ElementTarget(tuple(message.element.index))


def target_to_proto(target: Target) -> pb.explanation.Target:
    if isinstance(target, DetectionTarget):
        detection = E.DetectionTarget(index=target.index, spread=target.spread)
        if target.class_index is not None:
            detection.class_index = target.class_index
        return E.Target(detection=detection)
    if isinstance(target, RegionTarget):
        mask = None if target.mask is None else np.asarray(target.mask)
        tensor = to_tensor(mask.astype(np.uint8) if mask.dtype == bool else mask) if mask is not None else None
        return E.Target(region=E.RegionTarget(channel=target.channel, box=list(target.box or ()), mask=tensor))
    if isinstance(target, ElementTarget):
        return E.Target(element=E.ElementTarget(index=list(target.index)))
    return E.Target(class_index=int(target))


def input_from_proto(message: pb.service.Input, field: str = "input") -> Inputs:
    """One Input; errors name it as ``field`` (``input``, ``inputs[3]``)."""
    source = message.WhichOneof("source")
    if source is None:
        raise invalid(field, "set either image (encoded PNG/JPEG) or tensor")
    if source == "image":
        return EncodedImage(message.image)
    array = from_tensor(message.tensor, f"{field}.tensor")
    return {message.tensor.name: array} if message.tensor.name else array


def inputs_from_proto(message: pb.service.PredictRequest | pb.service.ExplainRequest) -> tuple[tuple[Inputs, ...], bool]:
    """A request's inputs and whether it used ``inputs`` (several) rather than ``input``: exactly one
    of the two is set. Each is decoded, in order; the first bad one fails with its index."""
    if message.HasField("input") and len(message.inputs):
        description = "set either input (one) or inputs (several), not both"
        raise InvalidInputError(f"input, inputs: {description}", (FieldViolation("input", description),
                                                                   FieldViolation("inputs", description)))
    if len(message.inputs):
        return tuple(input_from_proto(item, f"inputs[{index}]") for index, item in enumerate(message.inputs)), True
    return (input_from_proto(message.input),), False


def input_to_proto(image: bytes | str | Path | None = None, tensor: np.ndarray | None = None,
                   name: str = "") -> pb.service.Input:
    """An Input from an encoded image (bytes or a file path) or a tensor: exactly one of them."""
    if (image is None) == (tensor is None):
        raise ValueError("pass exactly one of image (encoded bytes or a file path) or tensor (numpy array)")
    if image is not None:
        return S.Input(image=image if isinstance(image, bytes) else Path(image).read_bytes())
    return S.Input(tensor=to_tensor(np.asarray(tensor), name=name))


def inputs_to_proto(items: Sequence[bytes | str | Path | np.ndarray]) -> list[pb.service.Input]:
    """A request's ``inputs``: each item an encoded image (bytes or a file path) or a tensor (a numpy array)."""
    if isinstance(items, (bytes, str, Path, np.ndarray)):
        raise TypeError("inputs is a sequence of images (encoded bytes or file paths) and tensors (numpy arrays)")
    messages = [input_to_proto(tensor=item) if isinstance(item, np.ndarray) else input_to_proto(image=item) for item in items]
    if not messages:
        raise ValueError("inputs is empty: pass at least one image or tensor")
    return messages


@dataclass(frozen=True)
class OutputOptions:
    """What a response carries besides the tree (gap.v1.OutputOptions)."""

    map_dtype: str = "float32"
    heatmaps: bool = False
    cams: bool = False
    picture: bool = False
    omit_maps: bool = False
    report: bool = False  # Explain only: the HTML report (ExplainResponse.report_html)
    map_levels: int | None = None  # maps only for nodes of levels 0..map_levels (None: every node)

    def has_map(self, level: int) -> bool:
        """Whether a node of this level carries its map (and heatmap)."""
        return self.map_levels is None or level <= self.map_levels


def output_from_proto(message: pb.explanation.OutputOptions) -> OutputOptions:
    if message.map_dtype in (T.DATA_TYPE_UNSPECIFIED, T.DATA_TYPE_FLOAT32):
        map_dtype = "float32"
    elif message.map_dtype == T.DATA_TYPE_FLOAT16:
        map_dtype = "float16"
    else:
        raise invalid("output.map_dtype", f"{dtype_name(message.map_dtype)}: maps are DATA_TYPE_FLOAT32 or DATA_TYPE_FLOAT16")
    map_levels = message.map_levels if message.HasField("map_levels") else None
    if map_levels is not None and map_levels < 0:
        raise invalid("output.map_levels", f"{map_levels} must not be negative (0: the root's map only; unset: every node's)")
    return OutputOptions(map_dtype, message.heatmaps, message.cams, message.picture, message.omit_maps, message.report,
                         map_levels)


def output_to_proto(output: OutputOptions) -> pb.explanation.OutputOptions:
    values = {f.name: getattr(output, f.name) for f in fields(output)}
    values["map_dtype"] = dtype_code(np.dtype(output.map_dtype))
    if values["map_levels"] is None:
        del values["map_levels"]
    return E.OutputOptions(**values)


@dataclass(frozen=True)
class ExplainQuery:
    """An ExplainRequest, decoded (ExplainStream and Expand embed one)."""

    model: str
    version: int
    inputs: tuple[Inputs, ...]  # one per input: the request's ``input``, or each of its ``inputs``
    options: ExplainOptions
    output: OutputOptions
    several: bool = False  # the request used ``inputs``: the answer is one tree per input


def explain_from_proto(message: pb.service.ExplainRequest) -> ExplainQuery:
    inputs, several = inputs_from_proto(message)
    return ExplainQuery(message.model, message.version, inputs, options_from_proto(message.options),
                        output_from_proto(message.output), several)


# -- explanations -> messages ---------------------------------------------------------------------
def node_proto(node: Node, path: list[int], output: OutputOptions, input_hw: tuple[int, int],
               with_map: bool = True, with_children: bool = True) -> pb.explanation.Node:
    message = E.Node(id=node.id, level=node.level, layer=node.layer, channel=node.channel, score=float(node.score),
                     share=float(node.share), path=path, children=list(node.children) if with_children else [])
    if node.parent is not None:
        message.parent = node.parent
    with_map = with_map and output.has_map(node.level)
    if with_map and not output.omit_maps:
        message.map.CopyFrom(to_tensor(node.map, output.map_dtype))
    if with_map and output.heatmaps:
        message.heatmap_png = heatmap_png(node.map, input_hw)
    return message


def header_proto(explanation: Explanation, version: int, output: OutputOptions) -> pb.explanation.Explanation:
    """The explanation without its nodes and CAMs."""
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
    if explanation.explained is not None:
        message.explained.CopyFrom(explained_proto(explanation.explained))
    return message


def explained_proto(explained: ExplainedTarget) -> pb.explanation.ExplainedTarget:
    message = E.ExplainedTarget(kind=explained.kind, outputs=list(explained.outputs), channel=explained.channel,
                                score=explained.score, box=list(explained.box or ()), map_shape=list(explained.map_hw or ()),
                                index=list(explained.index or ()))
    if explained.probability is not None:
        message.probability = explained.probability
    if explained.mask is not None:
        message.mask.CopyFrom(to_tensor(explained.mask.astype(np.float32)))
    if explained.detection is not None:
        message.detection = explained.detection
    return message


def explained_from_proto(message: pb.explanation.ExplainedTarget) -> ExplainedTarget:
    return ExplainedTarget(
        kind=message.kind, outputs=tuple(message.outputs), channel=message.channel, score=message.score,
        probability=message.probability if message.HasField("probability") else None,
        box=tuple(message.box) if message.box else None,  # type: ignore[arg-type]
        mask=from_tensor(message.mask, "explained.mask") if message.HasField("mask") else None,
        map_hw=tuple(message.map_shape) if message.map_shape else None,  # type: ignore[arg-type]
        detection=message.detection if message.HasField("detection") else None,
        index=tuple(message.index) if message.index else None,
    )


def cams_protos(explanation: Explanation, output: OutputOptions) -> dict[str, pb.tensor.Tensor]:
    if not output.cams:
        return {}
    return {name: to_tensor(values, output.map_dtype) for name, values in explanation.cams.items()}


def explanation_proto(explanation: Explanation, version: int, output: OutputOptions) -> pb.explanation.Explanation:
    message = header_proto(explanation, version, output)
    paths = explanation.paths()
    message.nodes.extend(node_proto(n, paths[n.id], output, explanation.input_hw) for n in explanation.nodes)
    for name, tensor in cams_protos(explanation, output).items():
        message.cams[name].CopyFrom(tensor)
    return message


def report_html(explanation: Explanation, atlas: Atlas | None, max_bytes: int) -> bytes:
    """ExplainResponse.report_html: the page ``gap-service explain --html`` writes (with ``atlas``'s
    patches per node), UTF-8. Refused when it would not fit in the ``max_bytes`` the response has left."""
    from ..report import render_html  # Jinja2 and the template: only for the requests that ask

    html = render_html(explanation, atlas=atlas).encode("utf-8")
    if len(html) > max_bytes:
        raise ResourceLimitError(f"the HTML report is {len(html)} bytes and the response has {max(0, max_bytes)} left "
                                 "under the server's max_response_bytes; ask for it with omit_maps, or a smaller tree")
    return html


def _prediction_fields(prediction: Prediction) -> dict:
    """The fields a PredictResponse and a Prediction message share."""
    return dict(
        logits=to_tensor(prediction.logits),
        classes=[S.ClassScore(index=c.index, label=c.label, logit=c.logit, probability=c.probability)
                 for c in prediction.classes],
        engine_seconds=prediction.engine_seconds,
        detections=[S.Detection(box=list(d.box), class_index=d.class_index, label=d.label, score=d.score,
                                outputs=list(d.outputs)) for d in prediction.detections],
    )


def prediction_proto(prediction: Prediction) -> pb.service.PredictResponse:
    return S.PredictResponse(**_prediction_fields(prediction))


def predictions_proto(predictions: Sequence[Prediction]) -> pb.service.PredictResponse:
    """The response to a request with ``inputs``: one Prediction each, engine_seconds their sum."""
    return S.PredictResponse(results=[S.Prediction(**_prediction_fields(p)) for p in predictions],
                             engine_seconds=sum(p.engine_seconds for p in predictions))


@dataclass(frozen=True)
class PredictQuery:
    """A PredictRequest, decoded."""

    model: str
    version: int
    inputs: tuple[Inputs, ...]  # one per input: the request's ``input``, or each of its ``inputs``
    top_k: int
    several: bool = False  # the request used ``inputs``: the answer is ``results``


def predict_from_proto(message: pb.service.PredictRequest) -> PredictQuery:
    top_k = message.top_k if message.HasField("top_k") else DEFAULT_TOP_CLASSES
    inputs, several = inputs_from_proto(message)
    return PredictQuery(message.model, message.version, inputs, top_k, several)


# -- messages -> explanations (client side) -------------------------------------------------------
def explanation_from_proto(message: pb.explanation.Explanation,
                           cams: Iterable[tuple[str, pb.tensor.Tensor]] = ()) -> Explanation:
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
        root_path=tuple(message.nodes[0].path) if message.nodes else (),
        explained=explained_from_proto(message.explained) if message.HasField("explained") else None,
    )


def node_from_proto(n: pb.explanation.Node) -> Node:
    values = from_tensor(n.map, f"nodes[{n.id}].map").astype(np.float32) if n.HasField("map") else np.zeros((0, 0), np.float32)
    return Node(id=n.id, parent=n.parent if n.HasField("parent") else None, level=n.level, layer=n.layer,
                channel=n.channel, score=n.score, share=n.share, map=values, children=list(n.children))


def prediction_from_proto(message: pb.service.PredictResponse | pb.service.Prediction) -> Prediction:
    """A single input's PredictResponse, or one of a batch's ``results``."""
    return Prediction(from_tensor(message.logits, "logits"),
                      [ClassScore(c.index, c.label, c.logit, c.probability) for c in message.classes],
                      message.engine_seconds,
                      [DetectedBox(tuple(d.box), d.class_index, d.label, d.score, tuple(d.outputs))  # type: ignore[arg-type]
                       for d in message.detections])


def task_proto(task: Task | None) -> pb.service.TaskInfo:
    """What GetModel states about the model's task (empty kind: none)."""
    if task is None:
        return S.TaskInfo()
    layout = task.detection
    outputs = layout.output_names if layout is not None else ((task.output,) if task.output else ())
    return S.TaskInfo(kind=task.kind, declared=task.declared, layout=layout.layout if layout is not None else "",
                      outputs=list(outputs), channel=task.channel)


# -- models -------------------------------------------------------------------------------------
def summary_proto(name: str, version: int, versions: Sequence[int], text: str, description: ModelDescription | None,
                  reason: str = "") -> pb.model.ModelSummary:
    """A served model's summary, or (``description`` None) an unavailable one's, with the reason."""
    if description is None:
        return M.ModelSummary(name=name, version=version, versions=list(versions), description=text,
                              state=M.MODEL_STATE_UNAVAILABLE, reason=reason)
    return M.ModelSummary(name=name, version=version, versions=list(versions), description=text,
                          num_classes=description.num_classes, providers=description.providers, state=M.MODEL_STATE_READY)


def description_proto(description: ModelDescription, summary: pb.model.ModelSummary, limits: pb.model.Limits,
                      load_seconds: float, atlas_layers: Sequence[str] = ()) -> pb.service.GetModelResponse:
    default = set(description.default_layers)
    pre = description.preprocessing
    return S.GetModelResponse(
        model=summary,
        inputs=[M.InputInfo(name=spec.name, dtype=dtype_code(spec.dtype), shape=list(shape))
                for spec, shape in description.inputs],
        decision=M.DecisionInfo(logits=description.decision.logits, probabilities=description.decision.probabilities or "",
                                num_classes=description.num_classes),
        layers=[M.LayerInfo(name=info.name, shape=list(info.shape), channel_axis=info.channel_axis,
                            map_shape=list(info.spatial_shape), op=info.op, default=info.name in default)
                for info in description.layers],
        labels=list(description.labels),
        preprocessing=M.Preprocessing(
            resize=pre.resize, size=list(pre.size), crop=list(pre.crop or ()), scale=pre.scale, mean=list(pre.mean),
            std=list(pre.std), channel_order=pre.channel_order, layout=pre.layout) if pre else None,
        limits=limits,
        load_seconds=load_seconds,
        task=task_proto(description.task),
        atlas_layers=list(atlas_layers),
    )


# -- channel atlas ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChannelQuery:
    """A GetChannelRequest, decoded."""

    model: str
    version: int
    layer: str
    channel: int
    patches: bool


def channel_from_proto(message: pb.service.GetChannelRequest) -> ChannelQuery:
    return ChannelQuery(message.model, message.version, message.layer, message.channel, message.patches)


def channel_proto(entry: ChannelEntry, patches: bool) -> pb.service.GetChannelResponse:
    """The entry's statistics and boxes; its pixels (one PNG strip) only when asked for."""
    return S.GetChannelResponse(
        layer=entry.layer, channel=entry.channel, stats=S.ChannelStats(**asdict(entry.stats)),
        patches=[S.AtlasPatch(image=p.image, unit=list(p.unit), box=list(p.box), activation=p.activation)
                 for p in entry.patches],
        strip_png=entry.strip_png() if patches and entry.patches else b"", patch_size=entry.pixels.shape[1],
        sheet=entry.sheet.name, row=entry.row,
    )


def channel_from_response(message: pb.service.GetChannelResponse) -> ChannelEntry:
    """The ChannelEntry a GetChannelResponse carries (client side): ``pixels`` [n, S, S, 3] from
    strip_png, empty when the request asked for no patches; ``sheet`` is the file's name on the server."""
    size, count = message.patch_size, len(message.patches)
    pixels = np.zeros((0, size, size, 3), np.uint8)
    if message.strip_png:
        strip = np.asarray(decode_image(message.strip_png, field_name="strip_png"))
        if strip.shape != (size, count * size, 3):
            raise ValueError(f"strip_png is {strip.shape[1]}x{strip.shape[0]} pixels, expected {count * size}x{size}")
        pixels = np.ascontiguousarray(strip.reshape(size, count, size, 3).transpose(1, 0, 2, 3))
    patches = tuple(Patch(p.image, tuple(p.unit), tuple(p.box), p.activation) for p in message.patches)
    stats = message.stats
    return ChannelEntry(message.layer, message.channel, ChannelStats(stats.mean, stats.fire_rate, stats.image_rate, stats.max),
                        patches, pixels, Path(message.sheet), message.row)
