"""The client library's own replay of read-only calls (on top of the channel's retry policy)."""

from __future__ import annotations

import grpc
import pytest

from gap_service.client import GapClient, retryable, service_config, with_replays


class Failure(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str = "") -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def flaky(failures: list[Failure]):
    calls = []

    def call() -> str:
        calls.append(1)
        if failures:
            raise failures.pop(0)
        return "answer"

    return call, calls


def test_replays_retryable_failures_then_answers() -> None:
    call, calls = flaky([Failure(grpc.StatusCode.UNAVAILABLE), Failure(grpc.StatusCode.INTERNAL, "RST_STREAM")])
    assert with_replays(call, replays=2, backoff=0.001) == "answer"
    assert len(calls) == 3


def test_does_not_replay_answers_and_gives_up_after_the_budget() -> None:
    call, calls = flaky([Failure(grpc.StatusCode.INVALID_ARGUMENT, "top_k")])
    with pytest.raises(grpc.RpcError):
        with_replays(call, replays=2, backoff=0.001)
    assert len(calls) == 1
    call, calls = flaky([Failure(grpc.StatusCode.UNAVAILABLE)] * 5)
    with pytest.raises(grpc.RpcError):
        with_replays(call, replays=2, backoff=0.001)
    assert len(calls) == 3
    assert not retryable(Failure(grpc.StatusCode.DEADLINE_EXCEEDED))


def test_balanced_client_gets_round_robin_and_health_checking() -> None:
    config = service_config(round_robin=True, health_check=True)
    assert config["loadBalancingConfig"] == [{"round_robin": {}}] and config["healthCheckConfig"] == {"serviceName": ""}
    client = GapClient("ipv4:127.0.0.1:1,127.0.0.1:2", balance=True)
    client.close()
