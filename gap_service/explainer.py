"""The public entry point: ``Explainer`` wraps one ONNX model for gradients and explanations."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from . import engine, faithfulness
from .compiled import CompiledModel
from .engine import ExplainOptions, LevelCallback
from .explanation import Explanation
from .faithfulness import Ablation
from .errors import InvalidInputError, invalid
from .graph.layers import Decision, LayerInfo
from .graph.loader import InputSpec, ModelSource, input_specs, normalize, read_model, resolve_input_shapes
from .runtime import RuntimeConfig

Inputs = np.ndarray | Mapping[str, np.ndarray]

MAX_SPECIALISATIONS = 4


class Explainer:
    """Gradients and gAP explanations for any ONNX CNN.

    The model is normalised and compiled lazily per input shape (a fully static model compiles
    once). ``providers`` picks onnxruntime execution providers; default: CUDA when available,
    else CPU.
    """

    def __init__(
        self,
        model_path_or_bytes: ModelSource,
        providers: Sequence[str | tuple[str, dict[str, str]]] | None = None,
        *,
        input_shapes: Mapping[str, Sequence[int]] | Sequence[int] | None = None,
        output: str | None = None,
        explain_probability: bool = False,
        runtime: RuntimeConfig | None = None,
        name: str | None = None,
    ) -> None:
        self._proto = read_model(model_path_or_bytes)
        self.name = name or self._proto.graph.name or "model"
        self.inputs: list[InputSpec] = input_specs(self._proto)
        self._runtime = runtime or RuntimeConfig(providers=tuple(providers) if providers else None)
        self._output = output
        self._explain_probability = explain_probability
        if input_shapes is not None and not isinstance(input_shapes, Mapping):
            input_shapes = {self.inputs[0].name: tuple(input_shapes)}  # a bare shape: the first input
        self._default_shapes = dict(input_shapes or {})
        self._compiled: OrderedDict[tuple, CompiledModel] = OrderedDict()
        self._lock = threading.Lock()

    # -- compilation ------------------------------------------------------------------------------
    def compiled(self, shapes: Mapping[str, Sequence[int]] | None = None) -> CompiledModel:
        """The model specialised to these input shapes (default: the model's own / the configured)."""
        resolved = resolve_input_shapes(self.inputs, {**self._default_shapes, **dict(shapes or {})})
        key = tuple(sorted(resolved.items()))
        with self._lock:
            compiled = self._compiled.get(key)
            if compiled is not None:
                self._compiled.move_to_end(key)
                return compiled
        nm = normalize(self._proto, resolved)
        compiled = CompiledModel(nm, self._runtime, self._output, self._explain_probability)
        with self._lock:
            self._compiled[key] = compiled
            while len(self._compiled) > MAX_SPECIALISATIONS:
                self._compiled.popitem(last=False)
        return compiled

    def feeds(self, inputs: Inputs) -> dict[str, np.ndarray]:
        """Validate inputs (names, dtypes, finiteness) and return them as a feed dict."""
        if isinstance(inputs, Mapping):
            feeds = dict(inputs)
        else:
            if len(self.inputs) != 1:
                raise InvalidInputError(f"the model has {len(self.inputs)} inputs {[s.name for s in self.inputs]}; pass a dict")
            feeds = {self.inputs[0].name: inputs}
        specs = {s.name: s for s in self.inputs}
        for name in feeds:
            if name not in specs:
                raise invalid(f"inputs.{name}", f"unknown input; the model's inputs are {sorted(specs)}")
        for name, spec in specs.items():
            if name not in feeds:
                raise invalid(f"inputs.{name}", "missing input")
            array = np.asarray(feeds[name])
            if array.dtype.kind not in "fiu":
                raise invalid(f"inputs.{name}", f"dtype {array.dtype} is not numeric")
            array = array.astype(spec.dtype, copy=False)
            if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
                raise invalid(f"inputs.{name}", "contains NaN or infinite values")
            if array.ndim != len(spec.dims):
                raise invalid(f"inputs.{name}", f"has shape {list(array.shape)}, the model expects rank {len(spec.dims)} {list(spec.dims)}")
            if array.shape and array.shape[0] != 1:
                raise invalid(f"inputs.{name}", f"batch size {array.shape[0]}: explanations take one input at a time (batch 1)")
            feeds[name] = np.ascontiguousarray(array)
        return feeds

    def compiled_for(self, feeds: Mapping[str, np.ndarray]) -> CompiledModel:
        return self.compiled({name: value.shape for name, value in feeds.items()})

    # -- description ----------------------------------------------------------------------------
    def layers(self, input_shapes: Mapping[str, Sequence[int]] | None = None) -> list[str]:
        """Candidate layer names, highest (nearest the decision) first."""
        return [info.name for info in self.compiled(input_shapes).layers]

    def layer_infos(self, input_shapes: Mapping[str, Sequence[int]] | None = None) -> list[LayerInfo]:
        return list(self.compiled(input_shapes).layers)

    def decision(self, input_shapes: Mapping[str, Sequence[int]] | None = None) -> Decision:
        return self.compiled(input_shapes).decision

    # -- explanations ---------------------------------------------------------------------------
    def explain(
        self,
        inputs: Inputs,
        layers: Sequence[str] | None = None,
        target: int | None = None,
        top_k: int = 5,
        depth: int = 3,
        min_share: float = 0.0,
        *,
        score: str = "net",
        max_batch_bytes: int | None = None,
        seeds_per_run: int | None = None,
        precision: str = "float32",
        root_path: Sequence[int] = (),
        labels: Sequence[str] | None = None,
        picture: np.ndarray | None = None,
        on_level: LevelCallback | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Explanation:
        """Decompose the decision for ``target`` (default: top-1) into a tree of supporting channels.

        ``root_path`` (channels from the root) first follows one branch of the tree, decomposing
        only the path's nodes, and then the node it ends at in full: what an interactive viewer's
        "expand this node" needs, at the cost of the path plus the subtree.
        """
        options = ExplainOptions(
            layers=tuple(layers) if layers else None, target=target, top_k=top_k, depth=depth,
            min_share=min_share, score=score, max_batch_bytes=max_batch_bytes, seeds_per_run=seeds_per_run,
            precision=precision, root_path=tuple(int(c) for c in root_path),
        )
        options.validate()
        feeds = self.feeds(inputs)
        return engine.explain(
            self.compiled_for(feeds), feeds, options, model_name=self.name, labels=labels,
            picture=picture, on_level=on_level, should_stop=should_stop,
        )

    def ablate(self, inputs: Inputs, layer: str, channels: Sequence[int], target: int | None = None) -> Ablation:
        """The decision's logit before and after zeroing ``channels`` of ``layer`` (the faithfulness
        check of docs/faithfulness.md for the root; target default: the top-1 class)."""
        feeds = self.feeds(inputs)
        compiled = self.compiled_for(feeds)
        info = compiled.layer(layer)
        bad = [c for c in channels if not 0 <= int(c) < info.channels]
        if bad:
            raise invalid("channels", f"{bad} out of range: layer '{layer}' has {info.channels} channels")
        logits = compiled.decision.logits
        state = compiled.forward(feeds, [logits, *compiled.state_names(logits, layer)])
        chosen = engine.resolve_target(compiled, state[logits], target)
        seed = np.zeros(state[logits].shape, dtype=np.float32)
        seed.reshape(-1)[chosen] = 1.0
        return faithfulness.ablate(compiled, logits, layer, state, seed, channels)

    # -- gradients ------------------------------------------------------------------------------
    def forward(self, inputs: Inputs, names: Sequence[str]) -> dict[str, np.ndarray]:
        feeds = self.feeds(inputs)
        return self.compiled_for(feeds).forward(feeds, names)

    def vjp(self, inputs: Inputs, upper: str, lower: str, seeds: np.ndarray) -> np.ndarray:
        """``[P, *shape(lower)]`` gradients of <seeds[p], upper> with respect to ``lower``."""
        feeds = self.feeds(inputs)
        compiled = self.compiled_for(feeds)
        upper_shape = compiled.shape(upper)
        seeds = np.asarray(seeds, dtype=np.float32)
        if seeds.ndim != len(upper_shape) + 1 or tuple(seeds.shape[1:]) != tuple(upper_shape):
            raise invalid("seeds", f"shape {list(seeds.shape)} must be [P, *{list(upper_shape)}] for upper tensor '{upper}'")
        if seeds.shape[0] == 0:
            raise invalid("seeds", "needs at least one seed (P >= 1)")
        state = compiled.forward(feeds, compiled.state_names(upper, lower))
        return compiled.run_vjp(upper, lower, state, seeds)
