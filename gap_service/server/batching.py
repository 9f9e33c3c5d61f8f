"""Dynamic batching: concurrent explanations of one model computed in one engine call.

Each request queues for a computation slot as before (limits.py). The request that gets the slot
takes the model's other queued requests with it, up to ``max_batch_size``, and computes them all
in one ``Explainer.run`` (their forward runs and same-pair level runs stacked into single runs,
each tree exactly what it is alone); the others wait for their result instead of a slot. So
batches form when requests queue, which is when they pay, and a lone request waits for nobody,
unless the model's config asks for a ``max_queue_delay_ms`` (Triton's name) in which the slot
holder waits for more, up to a preferred size. Every request keeps its deadline and
cancellation: queued, it leaves the queue; computing, its tree stops and the others go on.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import CancelledError
from ..explainer import Explainer, ExplainJob
from ..explanation import Explanation
from ..repository import BatchingPolicy
from .errors import DeadlineExceededError
from .limits import Admission

POLL_SECONDS = 0.05


@dataclass(eq=False)
class _Request:
    job: ExplainJob
    done: threading.Event = field(default_factory=threading.Event)
    taken: bool = False  # by a slot holder: its result will come
    result: Explanation | Exception | None = None


class Batcher:
    """One model's queue of explanations waiting for a slot of the shared ``admission`` pool."""

    def __init__(self, explainer: Explainer, policy: BatchingPolicy, admission: Admission,
                 on_batch: Callable[[int], None] | None = None) -> None:
        self.explainer = explainer
        self.policy = policy
        self.admission = admission
        self._on_batch = on_batch or (lambda size: None)
        self._queued: list[_Request] = []
        self._lock = threading.Condition()

    def explain(self, job: ExplainJob, is_active: Callable[[], bool],
                time_remaining: Callable[[], float | None]) -> Explanation:
        """``job``'s result, computed alone or with other queued requests of this model."""
        result = self.explain_many([job], is_active, time_remaining)[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def explain_many(self, jobs: list[ExplainJob], is_active: Callable[[], bool],
                     time_remaining: Callable[[], float | None]) -> list[Explanation | Exception]:
        """The results of one request's ``jobs`` (a batch request: several inputs), in order, a failed
        job's exception in its place; they queue together and are taken together where they fit."""
        requests = [_Request(job) for job in jobs]
        with self._lock:
            self._queued.extend(requests)
            self._lock.notify_all()
        while (first := next((r for r in requests if not r.taken), None)) is not None:
            try:
                self.admission.acquire(lambda: is_active() and not all(r.taken for r in requests), time_remaining)
            except CancelledError:
                if all(r.taken for r in requests):  # taken into other requests' batches meanwhile
                    break
                self._leave(requests)  # the caller gave up: what is not taken leaves the queue
                raise
            except BaseException:
                self._leave(requests)
                raise
            try:
                batch = self._take(first)
                if batch:
                    self._compute(batch)
            finally:
                self.admission.release()
        return [self._wait(request, is_active, time_remaining) for request in requests]

    def _take(self, request: _Request) -> list[_Request]:
        """The batch this slot computes: ``request`` first, then the queue, waiting for a preferred
        size up to the delay. Empty when ``request`` was taken by another slot meanwhile."""
        policy = self.policy
        deadline = time.monotonic() + policy.max_queue_delay_ms / 1000
        with self._lock:
            if request.taken:
                return []
            while policy.max_queue_delay_ms > 0 and len(self._queued) < policy.max_batch_size \
                    and len(self._queued) not in policy.preferred_batch_sizes:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._lock.wait(remaining)
            others = [r for r in self._queued if r is not request][: policy.max_batch_size - 1]
            batch = [request, *others]  # a batch request's own jobs are queued in order, so they stay together
            for member in batch:
                member.taken = True
                self._queued.remove(member)
        return batch

    def _compute(self, batch: list[_Request]) -> None:
        self._on_batch(len(batch))
        try:
            results = self.explainer.run([member.job for member in batch])
        except BaseException as exc:  # noqa: BLE001 - every member gets the failure
            results = [exc] * len(batch)
        for member, result in zip(batch, results):
            member.result = result
            member.done.set()

    def _wait(self, request: _Request, is_active: Callable[[], bool],
              time_remaining: Callable[[], float | None]) -> Explanation:
        """The result once its batch is done. The caller's cancellation reaches the engine through
        the job's ``should_stop``; here it only stops the wait."""
        while not request.done.wait(POLL_SECONDS):
            remaining = time_remaining()
            if remaining is not None and remaining <= 0:
                raise DeadlineExceededError("deadline passed while the explanation was computed")
            if not is_active():
                raise CancelledError("explanation cancelled by the caller")
        return request.result  # type: ignore[return-value]

    def _leave(self, requests: list[_Request]) -> None:
        with self._lock:
            for request in requests:
                if request in self._queued:
                    self._queued.remove(request)
