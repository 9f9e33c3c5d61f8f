"""What an explanation decomposes: the target (or seed) of ``ExplainOptions`` resolved, for one
input, into the root decision ``<seed, outputs>`` (docs/targets.md).

``plan`` runs before the forward run: it checks the target against the model (outputs, shapes,
class counts) and says which outputs resolving it reads. Seeds, elements and regions need no
values, so their seed is known then, and with it their layers; classes need the logits (the
top-1 class) but their layers are the chain below the class vector whichever class it is;
detections need the decoded boxes, so their layers are found once the forward run is done.
``Plan.resolve`` finishes with the forward values. Nothing silent: an output that is not a class
vector gets no "top-1 class" (it is an error that says how to give a target).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from .compiled import CompiledModel
from .errors import invalid, quoted
from .explanation import ExplainedTarget
from .graph.layers import Decision
from .options import TARGET, DetectionTarget, ElementTarget, ExplainOptions, RegionTarget
from .targets import Detection, DetectionLayout, ScoreRef, Task, decode, detection_seed, num_classes, region_seed, score_entries

Values = Mapping[str, np.ndarray]


@dataclass(frozen=True, eq=False)
class Root:
    """The decision of one explanation: a float32 seed per output it lies on, and what it is."""

    seeds: dict[str, np.ndarray]
    target: ExplainedTarget


@dataclass(frozen=True, eq=False)
class Plan:
    """A target checked against the model, before the forward run."""

    reads: tuple[str, ...]  # the outputs ``resolve`` reads
    seeds: dict[str, np.ndarray] | None  # known already (seeds, elements, regions): their layers are too
    class_vector: str | None  # class targets: their layers are the chain below this output
    resolve: Callable[[Values], Root]


def plan(compiled: CompiledModel, options: ExplainOptions) -> Plan:
    """The plan of ``options``' target on this model (its task's default target when none is given)."""
    target, seed = options.target, options.seed
    decision = _decision(compiled, options.output)
    output = decision.logits
    if seed is not None:
        return _static("seed", output, _checked_seed(compiled, output, seed), -1)
    if target is None:
        return _default(compiled, options)
    if isinstance(target, DetectionTarget):
        if options.output is not None:
            raise invalid("options.output", "a detection target lies on the outputs of the model's detection layout: "
                                             "leave output unset")
        return _detection(compiled, target)
    if isinstance(target, RegionTarget):
        return _region(compiled, output, target)
    if isinstance(target, ElementTarget):
        index = tuple(int(i) for i in target.index)
        return _static("element", output, _element_seed(compiled, output, index), -1, index=index)
    return class_target(compiled, decision, int(target))


def _decision(compiled: CompiledModel, name: str | None) -> Decision:
    """The decision tensor of ``name``: a graph output's logits (where a softmax or sigmoid ends
    it, as for the model's decision output), any other float tensor as it is."""
    if name is None or name in compiled.nm.outputs:
        return compiled.decision_of(name)
    if name not in compiled.nm.shapes or np.dtype(compiled.nm.dtypes.get(name, np.float32)).kind != "f":
        raise invalid("options.output", f"{quoted(name)} is not a float tensor of the model (its outputs: {compiled.nm.outputs})")
    return Decision(name, None, compiled.shape(name))


def _score(seeds: Mapping[str, np.ndarray], values: Values) -> float:
    return float(sum(np.vdot(seed.astype(np.float64), values[name].astype(np.float64)) for name, seed in seeds.items()))


def _static(kind: str, output: str, seed: np.ndarray, channel: int, **facts: object) -> Plan:
    seeds = {output: seed}

    def resolve(values: Values) -> Root:
        return Root(seeds, ExplainedTarget(kind, (output,), channel, _score(seeds, values), **facts))  # type: ignore[arg-type]

    return Plan((output,), seeds, None, resolve)


# -- classes -----------------------------------------------------------------------------------
def is_class_vector(shape: Sequence[int]) -> bool:
    """At most one axis longer than 1: a vector of class scores."""
    return sum(1 for d in shape if d > 1) <= 1


def classes(compiled: CompiledModel) -> int:
    """The classes of the model's decision: a detector's, a class vector's length, a dense map's
    channels (its task's output); 0 for any other output."""
    task = compiled.task
    if task is not None and task.detection is not None:
        return num_classes(task.detection, {name: compiled.shape(name) for name in task.detection.output_names})
    if task is not None and task.kind == "dense":
        output = _decision(compiled, task.output).logits
        return compiled.layer(output).channels if len(compiled.shape(output)) == 4 else 0
    shape = compiled.decision.shape
    return int(np.prod(shape)) if is_class_vector(shape) else 0


def class_target(compiled: CompiledModel, decision: Decision, target: int | None) -> Plan:
    """Class ``target`` (None: the top-1) of a class vector: its logit."""
    shape = compiled.shape(decision.logits)
    size = int(np.prod(shape))
    field = f"{TARGET}.class_index"
    if not is_class_vector(shape):
        raise invalid(field, f"{_named(decision)} has shape {list(shape)}, not a class vector: "
                             f"{_how_to_target(compiled, decision.logits)}")
    if target is not None and not 0 <= target < size:
        raise invalid(field, f"class {target} is out of range [0, {size})")
    output, probabilities = decision.logits, decision.probabilities
    reads = (output, *([probabilities] if probabilities else []))

    def resolve(values: Values) -> Root:
        logits = values[output]
        chosen = int(np.argmax(logits)) if target is None else target
        seed = np.zeros(shape, np.float32)
        seed.reshape(-1)[chosen] = 1.0
        probability = float(values[probabilities].reshape(-1)[chosen]) if probabilities else None
        explained = ExplainedTarget("class", (output,), chosen, float(logits.reshape(-1)[chosen]), probability)
        return Root({output: seed}, explained)

    return Plan(reads, None, output, resolve)


def _default(compiled: CompiledModel, options: ExplainOptions) -> Plan:
    """The declared task's default target; else the top-1 class of a class vector; else an error."""
    task = compiled.task
    if options.output is None and task is not None and task.declared:
        if task.kind == "detection":
            return _detection(compiled, DetectionTarget())
        if task.kind == "dense":
            return _region(compiled, _decision(compiled, task.output).logits, RegionTarget(task.channel))
    decision = _decision(compiled, options.output)
    shape = compiled.shape(decision.logits)
    if not is_class_vector(shape):
        raise invalid(TARGET, f"{_named(decision)} has shape {list(shape)}, not a class vector, so it has no "
                              f"top-1 class to explain: {_how_to_target(compiled, decision.logits)}")
    return class_target(compiled, decision, None)


def _named(decision: Decision) -> str:
    """The output as a reader knows it: a graph output ending in a softmax or sigmoid, with its logits."""
    if decision.probabilities and decision.probabilities != decision.logits:
        return f"output '{decision.probabilities}' (its logits '{decision.logits}')"
    return f"output '{decision.logits}'"


def _how_to_target(compiled: CompiledModel, output: str) -> str:
    task = compiled.task
    hint = ""
    if task is not None and task.kind == "detection" and not task.declared:
        hint = f" (its outputs fit a {task.detection.layout} detection head: see gap-service detections)"  # type: ignore[union-attr]
    return (f"give a target{hint}: a detection (--target-detection I, DetectionTarget), a region of a dense map "
            f"(--target-region C, RegionTarget), one element (--target-element '{output}[i,j,...]', ElementTarget) "
            "or a seed (--seed FILE.npy, seed=), or declare the model's task in its config.json (docs/targets.md)")


# -- seeds, elements, regions -------------------------------------------------------------------
def _checked_seed(compiled: CompiledModel, output: str, seed: np.ndarray) -> np.ndarray:
    shape = compiled.shape(output)
    values = np.asarray(seed)
    if tuple(values.shape) != tuple(shape):
        raise invalid("options.seed", f"shape {list(values.shape)} must be the shape {list(shape)} of output '{output}'")
    return values.astype(np.float32)


def _element_seed(compiled: CompiledModel, output: str, index: tuple[int, ...]) -> np.ndarray:
    shape = compiled.shape(output)
    if len(index) != len(shape) or any(i >= d for i, d in zip(index, shape)):
        raise invalid(f"{TARGET}.element.index", f"{list(index)} is not an index into output '{output}' of shape {list(shape)}")
    seed = np.zeros(shape, np.float32)
    seed[index] = 1.0
    return seed


def _region(compiled: CompiledModel, output: str, target: RegionTarget) -> Plan:
    shape = compiled.shape(output)
    if len(shape) != 4 or shape[0] != 1:
        raise invalid("options.output", f"output '{output}' has shape {list(shape)}: a region target needs a dense map "
                                        "[1, C, H, W] or [1, H, W, C]")
    axis = compiled.layer(output).channel_axis
    seed = region_seed(shape, target.channel, target.box, target.mask, axis, field=f"{TARGET}.region")
    map_hw = tuple(int(d) for i, d in enumerate(shape) if i not in (0, axis))
    mask = None if target.mask is None else np.asarray(target.mask, np.float32)
    box = None if target.box is None else tuple(float(v) for v in target.box)
    return _static("region", output, seed, target.channel, box=box, mask=mask, map_hw=map_hw)


# -- detections ---------------------------------------------------------------------------------
def detection_layout(compiled: CompiledModel, field: str) -> tuple[Task, DetectionLayout]:
    """The model's detection task (declared, or detected where unambiguous), or why there is none."""
    task = compiled.task
    if task is None or task.detection is None:
        shapes = {name: list(compiled.shape(name)) for name in compiled.nm.outputs}
        raise invalid(field, f"the model has no detection task: its outputs {shapes} are not an unambiguous YOLO head, "
                             "so declare its layout as the task in its config.json (docs/targets.md)")
    return task, task.detection


def detections(compiled: CompiledModel, values: Values) -> list[Detection]:
    """The model's decoded detections (after NMS, best first) from its forward ``values``."""
    task, layout = detection_layout(compiled, "task")
    return decode(values, layout, task.score_threshold, task.iou_threshold, task.max_detections,
                  input_hw=compiled.input_hw)


def _detection(compiled: CompiledModel, target: DetectionTarget) -> Plan:
    field = f"{TARGET}.detection"
    task, layout = detection_layout(compiled, field)
    shapes = {name: compiled.shape(name) for name in layout.output_names}
    classes = num_classes(layout, shapes)
    if target.class_index is not None and target.class_index >= classes:
        raise invalid(f"{field}.class_index", f"{target.class_index} is out of range: the detector has {classes} classes")
    def resolve(values: Values) -> Root:
        found = detections(compiled, values)
        if target.index >= len(found):
            raise invalid(f"{field}.index", f"{target.index} is out of range: the model found {len(found)} detection(s) "
                                            f"with a score above {task.score_threshold}")
        detection = found[target.index]
        label = detection.label if target.class_index is None else target.class_index
        if label != detection.label:  # the same anchors' scores for another class
            detection = replace(detection, label=label, kept=_for_class(layout, shapes, detection.kept, label),
                                merged=tuple(_for_class(layout, shapes, ref, label) for ref in detection.merged))
        seeds = detection_seed(detection, shapes, spread=target.spread)
        probability = detection.score if target.class_index in (None, found[target.index].label) else None
        explained = ExplainedTarget("detection", tuple(seeds), label, _score(seeds, values), probability,
                                    box=detection.box, detection=target.index)
        return Root(seeds, explained)

    return Plan(layout.output_names, None, None, resolve)


def _for_class(layout: DetectionLayout, shapes: Mapping[str, Sequence[int]], ref: ScoreRef, label: int) -> ScoreRef:
    return replace(ref, entries=score_entries(layout, shapes, ref.anchor, label))
