"""Load-balanced replicas for real, on loopback: 3 servers (docker/entrypoint.sh) behind nginx
(grpc_pass over HTTP/2, docker/nginx/gap-grpc.conf), and the Python client balancing by itself.

* A bounded Explain load through nginx: every replica serves, every answer is byte-identical to
  the engine's own tree.
* Faults during that load: one replica gets SIGTERM (drains, exits 0), another SIGKILL (dies
  mid-call); with nginx's next-upstream, the channel's retry policy (bench/lb.py SERVICE_CONFIG) and
  the caller's replay of a stream cut mid-answer (bench/lb.py ``retryable``), every request still
  ends with a correct answer. The killed replica comes back and serves again.
* No replica at all: a clean, retried UNAVAILABLE (not an HTML 502).
* Client-side: target ipv4:a,b,c with round_robin (and health checking) over the same replicas.

Everything listens on 127.0.0.1; the load is bounded in count and time.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODEL = "ppocr_cls"

pytestmark = pytest.mark.timeout(180)


from support.harness import load_lb, nginx_or_skip  # noqa: E402

lb = load_lb()


@pytest.fixture(scope="module")
def nginx_binary():
    return nginx_or_skip()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, nginx_binary):
    # 1 intra-op thread per replica, as compose and the Kubernetes CPU pods run them (docs/deploy.md).
    cluster = lb.Cluster(tmp_path_factory.mktemp("lb"), replicas=3, models=(MODEL,), grace_period=10,
                         env={"GAP_THREADS": "1"}).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def load(cluster):
    """The Explain request of the load and its correct answer: the in-process engine's tree, which
    every replica reproduces exactly when asked directly (compared as serialised bytes)."""
    import numpy as np

    from gap_service.repository import BUNDLED_REPOSITORY, load_repository
    from gap_service.wire import messages, tensors

    request = lb.explain_request(MODEL, depth=3, top_k=5)
    answers = {replica.name: lb.reference_answer(replica.address, request) for replica in cluster.replicas}
    assert len(set(answers.values())) == 1, "the replicas disagree"
    reference = next(iter(answers.values()))
    # The replicas' answer is the engine's: same nodes, channels, scores and maps.
    from gap_service.wire import pb

    remote = messages.explanation_from_proto(pb.explanation.Explanation.FromString(reference))
    entry = load_repository(BUNDLED_REPOSITORY)[MODEL]
    tensor = tensors.from_tensor(request.input.tensor)
    local = entry.explainer().explain(tensor, top_k=5, depth=3)
    assert len(remote.nodes) == len(local.nodes) == 1 + 5 + 25 + 125
    for r, l in zip(remote.nodes, local.nodes):
        assert (r.parent, r.layer, r.channel, r.score) == (l.parent, l.layer, l.channel, l.score)
        assert np.array_equal(r.map, l.map)
    return request, reference


def served(cluster) -> dict[str, int]:
    return {replica.name: replica.requests("Explain").get("OK", 0) for replica in cluster.replicas}


def test_nginx_spreads_a_bounded_load_and_every_answer_is_correct(cluster, load):
    request, reference = load
    before = served(cluster)
    total = 90
    result = lb.drive(cluster.nginx.address, request, reference, total, concurrency=4, options=lb.channel_options(), budget=90)
    summary = result.summary()
    assert summary["sent"] == total and summary["answered"] == total, summary
    assert result.codes == {"OK": total} and summary["replayed_by_caller"] == 0
    after = served(cluster)
    delta = {name: after[name] - before[name] for name in after}
    assert sum(delta.values()) == total, delta
    assert all(count >= total // 6 for count in delta.values()), f"uneven spread: {delta}"
    calls = [e for e in cluster.nginx.access_entries() if e.get("uri") == "/gap.v1.GapService/Explain"]
    assert len(calls) >= total and all(e["status"] == "200" and e["grpc_status"] == "0" for e in calls[-total:])
    # Health through the balancer: some replica's grpc.health.v1.
    assert lb.HEALTHCHECK.exists()
    check = subprocess.run([sys.executable, str(lb.HEALTHCHECK), "--target", cluster.nginx.address], capture_output=True,
                           text=True, timeout=30, check=False)
    assert check.returncode == 0 and check.stdout.strip() == "SERVING"


def test_client_side_round_robin_over_the_replicas(cluster, load):
    """No proxy: the client resolves three addresses and balances per call (round_robin), skipping
    replicas whose health Watch reports NOT_SERVING."""
    request, reference = load
    target = "ipv4:" + ",".join(replica.address for replica in cluster.replicas)
    before = served(cluster)
    total = 60
    result = lb.drive(target, request, reference, total, concurrency=3,
                      options=lb.channel_options(round_robin=True, health_check=True), budget=90)
    assert result.summary()["answered"] == total and result.codes == {"OK": total}, result.summary()
    assert result.summary()["replayed_by_caller"] == 0
    after = served(cluster)
    delta = {name: after[name] - before[name] for name in after}
    assert sum(delta.values()) == total and all(count >= total // 5 for count in delta.values()), delta
    # The same through the library's client class, with the service config as a channel option.
    from gap_service.client import GapClient
    from gap_service.wire import messages, tensors

    tensor = tensors.from_tensor(request.input.tensor)
    with GapClient(target, options=lb.channel_options(round_robin=True)) as client:
        trees = [client.explain(MODEL, tensor=tensor, depth=3, top_k=5) for _ in range(6)]
    assert all(len(t.nodes) == 156 for t in trees)
    assert all(served(cluster)[name] > after[name] for name in after), "6 calls round-robin over 3 replicas reach all"


def test_no_replica_reachable_is_a_clean_retried_unavailable(nginx_binary, tmp_path):
    """nginx answers gRPC (grpc-status 14) rather than an HTML 502, so the client's policy retries it."""
    import grpc

    from gap_service.wire import pb

    nginx = lb.Nginx([f"127.0.0.1:{lb.free_port()}"], tmp_path, binary=nginx_binary).start()
    try:
        with grpc.insecure_channel(nginx.address, options=lb.channel_options()) as channel:
            stub = pb.service_grpc.GapServiceStub(channel)
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as error:
                stub.ListModels(pb.service.ListModelsRequest(), timeout=30)
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "no gap-service replica available" in error.value.details()
            assert time.monotonic() - started < 20
    finally:
        nginx.stop()
    attempts = [e.get("attempt") for e in nginx.access_entries()]
    max_attempts = lb.RETRY_POLICY["maxAttempts"]
    assert attempts == ["-"] + [str(i) for i in range(1, max_attempts)], attempts


def test_faults_under_load_lose_nothing_and_the_killed_replica_rejoins(cluster, load):
    """SIGTERM replica1 (drains, exits 0) and SIGKILL replica2 during the load, then restart replica2
    on its port: every request ends with a correct answer."""
    request, reference = load
    drained, killed = cluster.replicas[1], cluster.replicas[2]
    try:
        _faults_under_load(cluster, request, reference, drained, killed)
    finally:  # leave the cluster whole for anything after this test, whatever happened in it
        if not drained.alive():
            drained.start().wait_serving(60)


def _faults_under_load(cluster, request, reference, drained, killed) -> None:
    total = 180
    events = lb.fault_schedule(cluster, total)
    result = lb.drive(cluster.nginx.address, request, reference, total, concurrency=4, options=lb.channel_options(),
                      budget=120, on_progress=events, tag="fault")
    events.join(90)
    summary = {**result.summary(), **events.report(cluster, tag="fault")}
    print("\nfault run:", summary)
    assert summary["sent"] == total, summary
    lost = [(o.index, o.code, o.details, o.retried_after) for o in result.outcomes if not o.ok]
    assert summary["answered"] == total and summary["lost"] == 0 and result.codes == {"OK": total}, (lost, summary)
    assert summary["codes"] == {"OK": total} and "WRONG_ANSWER" not in result.codes
    assert [a for _, a in events.log] == ["terminate", "kill", "restart", "rejoined"], events.log
    # The drained replica finished its calls and left cleanly; the killed one died.
    assert drained.wait(30) == 0
    stopped = [e for e in drained.log_entries() if e.get("event") == "stopped"]
    assert stopped and stopped[-1]["clean"] is True
    assert killed.starts == 2 and killed.alive()
    # The faults were felt: nginx moved calls off dead replicas and/or the client retried.
    assert summary["nginx_failed_over"] + summary["policy_retried_requests"] + summary["replayed_by_caller"] > 0, summary
    # Whatever nginx answered that was not OK was a clean gRPC UNAVAILABLE (trailers-only from a
    # draining or starting replica, or the 204 + grpc-status 14 of a dead one), or a reset stream.
    for key in summary["nginx_non_ok"]:
        status, grpc_status, _upstream = key.split("/")
        assert (status, grpc_status) in (("200", "-"), ("204", "-")), summary["nginx_non_ok"]
    # The restarted replica is back in rotation: a short extra load reaches it. nginx leaves an upstream
    # that failed out of rotation for fail_timeout after its last failure, and how long ago that was
    # depends on the machine's speed, so the extra load may take a few rounds to reach it.
    restarted_before = killed.requests("Explain", all_runs=False).get("OK", 0)
    for _ in range(5):
        extra = lb.drive(cluster.nginx.address, request, reference, 24, concurrency=2, options=lb.channel_options(), budget=60)
        assert extra.answered == 24, extra.summary()
        if restarted_before > 0 or killed.requests("Explain", all_runs=False).get("OK", 0) > restarted_before:
            break
        time.sleep(1.0)
    else:
        raise AssertionError(f"the restarted replica got none of 5 x 24 calls: {killed.requests('Explain', all_runs=False)}")


def test_client_side_round_robin_survives_the_same_faults(cluster, load):
    """Without a proxy: health-checked round_robin stops picking a draining replica (its health Watch
    turns NOT_SERVING), a killed one drops out with its connection, the restarted one comes back."""
    request, reference = load
    assert all(replica.alive() for replica in cluster.replicas)
    target = "ipv4:" + ",".join(replica.address for replica in cluster.replicas)
    options = lb.channel_options(round_robin=True, health_check=True)
    total = 120
    events = lb.fault_schedule(cluster, total)
    result = lb.drive(target, request, reference, total, concurrency=3, options=options, budget=120, on_progress=events, tag="rr")
    events.join(90)
    lost = [(o.index, o.code, o.details) for o in result.outcomes if not o.ok]
    assert result.answered == total and not lost, (lost, result.summary())
    drained, killed = cluster.replicas[1], cluster.replicas[2]
    assert drained.wait(30) == 0 and killed.alive()
    # The restarted replica serves again once the channel has reconnected to it.
    before = killed.requests("Explain", all_runs=False).get("OK", 0)

    def rejoined():
        extra = lb.drive(target, request, reference, 6, concurrency=3, options=options, budget=30, tag="rr-rejoin")
        assert extra.answered == 6, extra.summary()
        return killed.requests("Explain", all_runs=False).get("OK", 0) > before

    lb.wait_for(rejoined, 30, "the restarted replica back in the client's rotation", interval=0.5)
    drained.start().wait_serving(60)


DYING_REPLICA = r"""
import os, time
from concurrent import futures
import grpc

def explain(request, context):  # starts answering (response headers), then the process dies
    context.send_initial_metadata(())
    time.sleep(0.3)
    os._exit(1)

server = grpc.server(futures.ThreadPoolExecutor(4))
server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
    "gap.v1.GapService", {"Explain": grpc.unary_unary_rpc_method_handler(explain)}),))
print(server.add_insecure_port("127.0.0.1:0"), flush=True)
server.start()
server.wait_for_termination()
"""


@pytest.mark.parametrize("caller_replays", [False, True])
def test_a_replica_dying_mid_answer_is_replayed_by_the_caller(cluster, load, nginx_binary, tmp_path, caller_replays):
    """The case the retry policy cannot cover: the replica sent its response headers, then died. nginx
    resets the stream (INTERNAL, RST_STREAM) and the call is committed. The caller replays it (every
    GapService RPC is read-only): nothing is lost. Without that replay, one call would be."""
    request, reference = load
    dying = subprocess.Popen([sys.executable, "-c", DYING_REPLICA], stdout=subprocess.PIPE, text=True)
    try:
        port = int(dying.stdout.readline())
        nginx = lb.Nginx([f"127.0.0.1:{port}", cluster.replicas[0].address], tmp_path, binary=nginx_binary).start()
        try:
            result = lb.drive(nginx.address, request, reference, 4, concurrency=1, options=lb.channel_options(),
                              retries=2 if caller_replays else 0, budget=60)
        finally:
            nginx.stop()
    finally:
        dying.kill()
        dying.wait(10)
    if caller_replays:
        assert result.answered == 4 and result.codes == {"OK": 4}, result.summary()
        (replayed,) = [o.retried_after for o in result.outcomes if o.attempts > 1]
        assert len(replayed) == 1 and replayed[0].startswith("INTERNAL: ") and "RST_STREAM" in replayed[0], replayed
    else:
        assert result.codes == {"OK": 3, "INTERNAL": 1}, result.summary()
        (details,) = [o.details for o in result.outcomes if not o.ok]
        assert "RST_STREAM" in details, details


def test_retryable_statuses():
    import grpc

    class Failure(grpc.RpcError):
        def __init__(self, code, details):
            self._code, self._details = code, details

        def code(self):
            return self._code

        def details(self):
            return self._details

    assert lb.retryable(Failure(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry on another replica"))
    assert lb.retryable(Failure(grpc.StatusCode.INTERNAL, "Stream removed (RST_STREAM (Received RST_STREAM with error code 2))"))
    assert not lb.retryable(Failure(grpc.StatusCode.INTERNAL, "internal error in Explain"))
    assert not lb.retryable(Failure(grpc.StatusCode.INVALID_ARGUMENT, "top_k"))
    assert not lb.retryable(Failure(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))
    config = lb.service_config(round_robin=True, health_check=True)
    assert config["loadBalancingConfig"] == [{"round_robin": {}}] and config["healthCheckConfig"] == {"serviceName": ""}
    (method,) = config["methodConfig"]
    assert method["name"] == [{"service": "gap.v1.GapService"}]
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE", "CANCELLED"]
    assert 2 <= method["retryPolicy"]["maxAttempts"] <= 5
    assert lb.retryable(Failure(grpc.StatusCode.CANCELLED, "CANCELLED"))
