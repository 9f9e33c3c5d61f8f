"""gAP hierarchical decomposition: the method itself (see docs/method.md).

The root is the decision ``<seed, output>`` that decisions.py resolves from the options' target
(docs/targets.md), its layers the chain found for that seed. One forward run per request; then,
level by level, one batched gradient run (chunked to a memory bound) decomposes every node of the
level into the channels of the next lower layer.
Activations, gradients and seeds stay on the execution device (levels.py); the host sees the
per-channel scores, picks the children, and receives their maps.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from . import decisions
from .compiled import CompiledModel
from .errors import CancelledError, invalid
from .explanation import Explanation, Node
from .graph.layers import LayerInfo
from .methods import CAM_METHODS, gap_map, supporting_channels
from .options import ExplainOptions
from .state_cache import CachedInput, CachedNode, StateCache, TreeMemo, digest, feeds_digest

# Default memory bound of one batched gradient run, by device: host memory is shared with
# everything else; a GPU's is the explainer's own, and fewer, larger runs keep it busy.
DEFAULT_BATCH_BYTES = {"cpu": 256 * 2**20, "cuda": 4 * 2**30}


# Targets whose channel is a class, named by the model's labels (an element or a seed's -1 is none).
LABELLED = ("class", "detection", "region")

# Called after each level with the level, its new nodes and the tree so far (level 0: the root).
LevelCallback = Callable[[int, list[Node], Explanation], None]


def _candidates(compiled: CompiledModel, options: ExplainOptions, found: Callable[[], list[LayerInfo]]) -> list[str]:
    """``options.layers``, else the ``found`` chain for this decision, whole (each checked)."""
    candidates = list(options.layers) if options.layers else [info.name for info in found()]
    for index, name in enumerate(candidates):
        info = compiled.layer(name)  # raises UnknownTensorError for unknown names
        if len(info.shape) != 4 or info.shape[0] != 1:
            raise invalid(f"options.layers[{index}]", f"layer '{name}' has shape {list(info.shape)}; "
                          "layers must be 4-D feature maps of batch 1")
    return candidates


def _cut(candidates: list[str], options: ExplainOptions) -> list[str]:
    if options.depth > len(candidates):
        raise invalid("options.depth", f"{options.depth} levels exceed the {len(candidates)} layers of the chain {candidates}")
    return candidates[: options.depth]


def channel_first(values: np.ndarray, channel_axis: int) -> np.ndarray:
    """[..., *layer_shape] -> [..., C, *spatial] (batch axis of size 1 dropped)."""
    rank = values.ndim
    layer_rank = 4
    lead = rank - layer_rank
    moved = np.moveaxis(values, lead + channel_axis, lead + 1)
    return moved.reshape(*values.shape[:lead], *moved.shape[lead + 1 :])


@dataclass
class _SeedBatch:
    """Nodes waiting to be decomposed together, with their seeds still on the device."""

    node_ids: list[int]
    seeds: ort.OrtValue  # [len(node_ids), *shape(upper)]


@dataclass
class Job:
    """One explanation to compute: an input's feeds, the options, and the caller's callbacks."""

    feeds: Mapping[str, np.ndarray]
    options: ExplainOptions
    model_name: str = "model"
    labels: Sequence[str] | None = None
    picture: np.ndarray | None = None
    on_level: LevelCallback | None = None
    should_stop: Callable[[], bool] | None = None


@dataclass(frozen=True, eq=False)
class ForwardRun:
    """What a tree asks of the scheduler: activations ``names`` of its input."""

    feeds: Mapping[str, np.ndarray]
    names: tuple[str, ...]

    @property
    def key(self) -> tuple:
        return ("forward",)


@dataclass(frozen=True, eq=False)
class LevelRun:
    """What a tree asks of the scheduler: one level graph run for a batch of its seeds."""

    upper: str
    lower: str
    state: Mapping[str, ort.OrtValue]
    seeds: ort.OrtValue
    precision: str

    @property
    def key(self) -> tuple:
        return ("level", self.upper, self.lower, self.precision)


Run = ForwardRun | LevelRun
Tree = Generator[Run, object, Explanation]


def explain(
    compiled: CompiledModel,
    feeds: Mapping[str, np.ndarray],
    options: ExplainOptions,
    *,
    model_name: str = "model",
    labels: Sequence[str] | None = None,
    picture: np.ndarray | None = None,
    on_level: LevelCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    cache: StateCache | None = None,
) -> Explanation:
    """The tree of ``options``' decision for ``feeds``. With a ``cache``, the forward state and the
    nodes already computed for this input are reused, and what this run computes is kept: a
    ``root_path`` whose nodes are known starts at its last node (state_cache.py)."""
    job = Job(feeds, options, model_name, labels, picture, on_level, should_stop)
    (result,) = explain_all(compiled, [job], cache=cache)
    if isinstance(result, BaseException):
        raise result
    return result


def explain_all(compiled: CompiledModel, jobs: Sequence[Job], *, cache: StateCache | None = None,
                ) -> list[Explanation | Exception]:
    """The trees of several jobs computed together: each step, the forward runs that the trees ask
    for are one run, and so are their level runs of the same (upper, lower) pair (compiled.py
    stacks them). Each tree is what ``explain`` alone gives; a job that fails (a bad path, its
    caller cancelling) gets its exception and the others go on."""
    results: list[Explanation | Exception | None] = [None] * len(jobs)
    waiting: dict[int, tuple[Tree, Run]] = {}

    def advance(index: int, tree: Tree, answer: object) -> None:
        try:
            waiting[index] = (tree, tree.send(answer))
        except StopIteration as done:
            results[index] = done.value
        except Exception as exc:  # noqa: BLE001 - this job's failure, not the others'
            results[index] = exc

    for index, job in enumerate(jobs):
        advance(index, _tree(compiled, job, cache), None)
    while waiting:
        groups: dict[tuple, list[int]] = {}
        for index, (_, run) in waiting.items():
            groups.setdefault(run.key, []).append(index)
        current, waiting = waiting, {}
        for members in groups.values():
            try:
                answers = _execute(compiled, [current[index][1] for index in members])
            except Exception as exc:  # noqa: BLE001 - a failed run fails the trees that asked for it
                for index in members:
                    results[index] = exc
                continue
            for index, answer in zip(members, answers):
                advance(index, current[index][0], answer)
    return results  # type: ignore[return-value]


def _execute(compiled: CompiledModel, runs: Sequence[Run]) -> list[object]:
    """One run for all of ``runs`` (they share a key)."""
    if isinstance(runs[0], ForwardRun):
        return compiled.forward_many([(run.feeds, run.names) for run in runs])
    first = runs[0]
    return compiled.run_levels(first.upper, first.lower, [(run.state, run.seeds) for run in runs], first.precision)


def _tree(compiled: CompiledModel, job: Job, cache: StateCache | None) -> Tree:
    """One explanation, as a generator: it yields the runs it needs and is sent their results."""
    options, on_level = job.options, job.on_level
    plan = decisions.plan(compiled, options)
    early = _root_before_forward(compiled, plan)  # None: a detection, whose seed needs its decoded boxes
    # With a cache, the forward run taps the whole chain: a later Expand goes deeper than this request.
    whole = cache is not None
    candidates = _candidates(compiled, options, _finder(compiled, *early)) if early is not None else None
    if candidates is not None:
        ahead = compiled.chain_state([early[0], *(candidates if whole else _cut(candidates, options))])
    else:
        ahead = compiled.branch_taps(None if whole else options.depth)
    forward = _Forward(compiled, job.feeds, cache)
    state = yield from forward.run(sorted({*plan.reads, *ahead}))  # the one forward run (none when cached)
    root = plan.resolve({name: state[name].numpy() for name in plan.reads})
    top, seed = compiled.root(root.seeds)
    if candidates is None:
        candidates = _candidates(compiled, options, _finder(compiled, top, seed))
        # Not among the tapped head branches (a spread seed joining below them): one more run.
        state = yield from forward.run(sorted(compiled.chain_state([top, *(candidates if whole else _cut(candidates, options))])))
    layers = _cut(candidates, options)
    explained = root.target
    target, labels = explained.channel, job.labels
    label = labels[target] if labels is not None and 0 <= target < len(labels) and explained.kind in LABELLED else None
    memo = forward.tree((top, digest(seed), tuple(candidates), options.score, options.top_k, options.min_share,
                         options.precision))
    first = compiled.layer(layers[0])
    root_node = Node(0, None, 0, top, target, explained.score, 1.0, np.zeros(first.spatial_shape, dtype=np.float32))
    explanation = Explanation(
        model=job.model_name, target=target, label=label, logit=root_node.score, probability=explained.probability,
        layers=layers, score_mode=options.score, nodes=[root_node], input_hw=compiled.input_hw, picture=job.picture,
        explained=explained,
    )
    if on_level is not None:
        on_level(0, [root_node], explanation)
    builder = _Builder(compiled, job, explanation, [top, *layers], state, forward, memo)
    yield from builder.decompose(seed)
    return explanation


class _Builder:
    """Grows one explanation level by level from its root: the method of docs/method.md."""

    def __init__(self, compiled: CompiledModel, job: Job, explanation: Explanation, chain: list[str],
                 state: Mapping[str, ort.OrtValue], forward: _Forward, memo: TreeMemo | None) -> None:
        self.compiled, self.job, self.options = compiled, job, job.options
        self.explanation, self.nodes = explanation, explanation.nodes
        self.chain, self.state, self.forward, self.memo = chain, state, forward, memo
        self.paths: dict[int, tuple[int, ...]] = {0: ()}

    def decompose(self, seed: np.ndarray) -> Generator[Run, object, None]:
        """Every level below the root (from the path's last known node where the cache has it)."""
        pairs = list(zip(self.chain[:-1], self.chain[1:]))
        known = self.memo.seeded_prefix(self.options.root_path) if self.memo is not None else 0
        frontier = [self._from_cache(known)] if known else \
            [_SeedBatch([0], self.compiled.placement.to_device(np.ascontiguousarray(seed[None], np.float32)))]
        for level, (upper, lower) in enumerate(pairs, start=1):
            if level <= known:
                continue
            if not frontier:
                break
            new_level: list[Node] = []
            next_frontier: list[_SeedBatch] = []
            for batch in frontier:
                if self.job.should_stop is not None and self.job.should_stop():
                    raise CancelledError("explanation cancelled by the caller")
                grad, net, positive = yield LevelRun(upper, lower, self.state, batch.seeds, self.options.precision)
                self._children(level, batch, grad, net, positive, new_level, next_frontier)
            if self.job.on_level is not None:
                self.job.on_level(level, new_level, self.explanation)
            frontier = next_frontier

    def _from_cache(self, known: int) -> _SeedBatch:
        """The path's nodes down to the last one with a seed, as computed before; that one's seed."""
        memo, nodes = self.memo, self.nodes
        nodes[0].map, self.explanation.cams = memo.root_map, dict(memo.cams)
        for level in range(1, known + 1):
            path = tuple(self.options.root_path[:level])
            cached = memo.nodes[path]
            node = Node(len(nodes), len(nodes) - 1, level, cached.layer, cached.channel, cached.score, cached.share, cached.map)
            nodes[-1].children.append(node.id)
            nodes.append(node)
            self.paths[node.id] = path
            if self.job.on_level is not None:
                self.job.on_level(level, [node], self.explanation)
        seeds = self.compiled.placement.to_device(np.ascontiguousarray(cached.seeds.numpy()[cached.row : cached.row + 1]))
        return _SeedBatch([len(nodes) - 1], seeds)

    def _children(self, level: int, batch: _SeedBatch, grad: ort.OrtValue, net: ort.OrtValue, positive: ort.OrtValue,
                  new_level: list[Node], next_frontier: list[_SeedBatch]) -> None:
        """The chosen children of a batch's nodes: their nodes, maps and (for the next level) seeds."""
        compiled, options, chain = self.compiled, self.options, self.chain
        lower = chain[level]
        last = level == len(chain) - 1
        scores = (net if options.score == "net" else positive).numpy()
        if level == 1:
            _describe_root(self.explanation, grad.numpy()[0], self.state[lower].numpy(), compiled.layer(lower).channel_axis)
            self.forward.remember_root(self.memo, self.explanation)
        chosen = [(row, channel, share) for row in range(len(batch.node_ids))
                  for channel, share in _children(scores[row], options)]
        if level <= len(options.root_path):
            chosen = _follow_path(chosen, options.root_path[level - 1], level, lower)
        if not chosen:
            return
        group = len(chosen) if last else _chunk_size(compiled, lower, chain[level + 1], options)
        with_seeds = not last or self.memo is not None  # a cached leaf's seed makes expanding it one level run
        for start in range(0, len(chosen), group):
            part = chosen[start : start + group]
            rows = np.asarray([row for row, _, _ in part], dtype=np.int64)
            channels = np.asarray([channel for _, channel, _ in part], dtype=np.int64)
            maps, child_seeds = compiled.select(lower, grad, self.state[lower], rows, channels, with_seeds=with_seeds)
            host_maps = maps.numpy()
            ids = []
            for index, (row, channel, share) in enumerate(part):
                parent = self.nodes[batch.node_ids[row]]
                node = Node(len(self.nodes), parent.id, level, lower, int(channel), float(scores[row, channel]),
                            float(share), host_maps[index])
                self.nodes.append(node)
                parent.children.append(node.id)
                self.paths[node.id] = (*self.paths[parent.id], node.channel)
                new_level.append(node)
                ids.append(node.id)
                self.forward.remember(self.memo, self.paths[node.id], node, child_seeds, index)
            if child_seeds is not None and not last:
                next_frontier.append(_SeedBatch(ids, child_seeds))


class _Forward:
    """The forward state of one request, from the cache where it has it; what the request
    computes (state and nodes) goes into the cache. Without a cache, plain forward runs."""

    def __init__(self, compiled: CompiledModel, feeds: Mapping[str, np.ndarray], cache: StateCache | None) -> None:
        self.compiled, self.feeds, self.cache = compiled, feeds, cache
        self.key = (compiled.token, feeds_digest(feeds)) if cache is not None else None
        self.entry: CachedInput | None = cache.get(self.key) if cache is not None else None
        self.state: dict[str, ort.OrtValue] = dict(self.entry.state) if self.entry is not None else {}

    def run(self, names: Sequence[str]) -> Generator[Run, object, dict[str, ort.OrtValue]]:
        """``self.state`` with ``names`` in it: those it lacks from one forward run."""
        missing = tuple(name for name in names if name not in self.state)
        if missing:
            computed = yield ForwardRun(self.feeds, missing)
            self.state.update(computed)
            if self.cache is not None:
                self.entry = self.cache.put(self.key, computed)
        return self.state

    def tree(self, key: tuple) -> TreeMemo | None:
        return self.cache.tree(self.entry, key) if self.cache is not None and self.entry is not None else None

    def remember_root(self, memo: TreeMemo | None, explanation: Explanation) -> None:
        if memo is not None:
            self.cache.add_root(self.entry, memo, _frozen(explanation.root.map),
                                {name: _frozen(cam) for name, cam in explanation.cams.items()})

    def remember(self, memo: TreeMemo | None, path: tuple[int, ...], node: Node, seeds: ort.OrtValue | None, row: int) -> None:
        if memo is not None:
            cached = CachedNode(node.layer, node.channel, node.score, node.share, _frozen(node.map), seeds, row)
            self.cache.add_node(self.entry, memo, path, cached, new_batch=row == 0)


def _frozen(array: np.ndarray) -> np.ndarray:
    """Read-only: a cached map is shared by every explanation that reuses it."""
    array.setflags(write=False)
    return array


def _finder(compiled: CompiledModel, top: str, seed: np.ndarray | None) -> Callable[[], list[LayerInfo]]:
    """How the layers of a decision on ``top`` are found: from its seed's support (the chain below a class vector)."""
    return lambda: compiled.chain(top) if seed is None else compiled.seeded_layers(top, seed)


def _root_before_forward(compiled: CompiledModel, plan: decisions.Plan) -> tuple[str, np.ndarray | None] | None:
    """(root tensor, seed) where the forward values are not needed to know them: a class vector
    (whichever class: its layers are the chain below it, seed None), a seed, an element, a region."""
    if plan.class_vector is not None:
        return plan.class_vector, None
    return compiled.root(plan.seeds) if plan.seeds is not None else None


def _follow_path(chosen: list[tuple[int, int, float]], channel: int, level: int, layer: str) -> list[tuple[int, int, float]]:
    """Keep only the path's child; a path step that is not a supporting channel is a bad request."""
    kept = [c for c in chosen if c[1] == channel]
    if not kept:
        raise invalid(f"path[{level - 1}]", f"channel {channel} of layer '{layer}' is not a supporting channel of its "
                      f"parent for these options (its children are channels {[c[1] for c in chosen]})")
    return kept


def _describe_root(explanation: Explanation, grad: np.ndarray, activation: np.ndarray, channel_axis: int) -> None:
    """The decision's own maps at the first layer: gAP, Grad-CAM, LayerCAM (host, one row)."""
    grad_cf = channel_first(grad, channel_axis)
    act_cf = channel_first(activation, channel_axis)
    explanation.root.map = gap_map(grad_cf, act_cf)
    explanation.cams = {name: fn(grad_cf, act_cf) for name, fn in CAM_METHODS.items()}


def _children(scores: np.ndarray, options: ExplainOptions) -> list[tuple[int, float]]:
    positive_total = float(scores[scores > 0].sum())
    chosen = supporting_channels(scores, options.top_k)
    result = []
    for channel in chosen:
        share = float(scores[channel]) / positive_total if positive_total > 0 else 0.0
        if share >= options.min_share:
            result.append((int(channel), share))
    return result


def _chunk_size(compiled: CompiledModel, upper: str, lower: str, options: ExplainOptions) -> int:
    if options.seeds_per_run is not None:
        return options.seeds_per_run
    per_seed = 4 * 3 * max(compiled.path_elements(upper, lower), 1)  # gradients, temporaries and the forward state
    bound = options.max_batch_bytes or DEFAULT_BATCH_BYTES.get(compiled.placement.device, DEFAULT_BATCH_BYTES["cpu"])
    return max(1, bound // per_seed)
