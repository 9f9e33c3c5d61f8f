"""Issue 13 benchmark: a click in the explorer (Expand of one node, the replica's forward-state
cache warm) against a full Explain of the same depth, through a real server on loopback.

EfficientNet-Lite0 on a photo, top_k 5. The explorer's first request explains depth 2; each click
then expands one node of level 2 by one level, so the answer reaches depth 3: it is compared with
a full depth-3 Explain of an input the server has not seen (a new pixel each time, so neither the
forward state nor any node is cached). Also printed: the same Expand on a server without a cache.
Prints the medians and the ratio full / click (goal >= 5).

    .venv/bin/python bench/expand.py [--model efficientnet_lite0] [--repeats 10] [--top-k 5]
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

from gap_service.client import GapClient
from gap_service.server.process import ServerProcess

PHOTO = Path(__file__).resolve().parent.parent / "examples" / "photos" / "chelsea.png"


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1000


def _clicks(client: GapClient, model: str, image: bytes, top_k: int, repeats: int) -> list[float]:
    """Explain depth 2 (the page's first request), then Expand level-2 nodes one by one, timed."""
    tree = client.explain(model, image, top_k=top_k, depth=2, omit_maps=True)
    leaves = [n for n in tree.nodes if n.level == 2]
    times = []
    for node in (leaves * (repeats // len(leaves) + 1))[:repeats]:
        start = time.perf_counter()
        client.expand(model, tree.path(node.id), image, top_k=top_k, depth=1, heatmaps=True, omit_maps=True)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--top-k", type=int, default=5)
    args = parser.parse_args()
    pixels = np.asarray(Image.open(PHOTO).convert("RGB")).copy()
    rng = np.random.default_rng(0)

    with ServerProcess(["--model", args.model]) as server, GapClient(server.address) as client:
        image = _png(pixels)
        _clicks(client, args.model, image, args.top_k, 2)  # warm: every level session built
        full = []
        for _ in range(args.repeats + 1):
            fresh = pixels.copy()
            fresh[rng.integers(fresh.shape[0]), rng.integers(fresh.shape[1])] ^= 1  # an input not seen before
            data = _png(fresh)
            start = time.perf_counter()
            client.explain(args.model, data, top_k=args.top_k, depth=3, heatmaps=True, omit_maps=True)
            full.append(time.perf_counter() - start)
        full = full[1:]
        warm = _clicks(client, args.model, _png(pixels[::-1].copy()), args.top_k, args.repeats)

    with ServerProcess(["--model", args.model, "--state-cache-mb", "0"]) as server, GapClient(server.address) as client:
        _clicks(client, args.model, image, args.top_k, 2)
        cold = _clicks(client, args.model, _png(pixels[::-1].copy()), args.top_k, args.repeats)

    print(f"{args.model}, top_k {args.top_k}, {args.repeats} repeats, client round trips through a real server")
    print(f"  full Explain, depth 3, new input:        {_median_ms(full):8.1f} ms")
    print(f"  Expand of a level-2 node, warm cache:    {_median_ms(warm):8.1f} ms")
    print(f"  Expand of a level-2 node, no cache:      {_median_ms(cold):8.1f} ms")
    print(f"  ratio full / warm Expand: {statistics.median(full) / statistics.median(warm):.1f}x (goal >= 5)")


if __name__ == "__main__":
    main()
