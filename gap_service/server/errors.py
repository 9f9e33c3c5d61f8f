"""The one place where errors become gRPC statuses, and the guard every GapService RPC runs in.

``status_for`` maps an exception to a status code and a google.rpc.Status (with BadRequest
field violations in its details); ``RpcGuard`` wraps each servicer method: it refuses calls while
the server starts or drains (UNAVAILABLE), turns undecodable requests into INVALID_ARGUMENT,
maps every raised exception through ``status_for``, and records metrics and one log line per call.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from google.protobuf import any_pb2
from google.protobuf import message as protobuf_message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from ..errors import CancelledError, FieldViolation, GapError, printable

log = logging.getLogger("gap_service.server")


class DeadlineExceededError(CancelledError):
    """The caller's deadline passed; computation stopped."""

    kind = "deadline_exceeded"


class UnavailableError(GapError):
    """The server is starting or draining; try another replica or later."""

    kind = "unavailable"


# Status message and details travel in trailers, and a default client accepts 8 KB of metadata:
# whatever a message echoes (names, paths), it stays well below that.
MAX_MESSAGE_CHARS = 1024
MAX_VIOLATIONS = 8

CODES: dict[str, grpc.StatusCode] = {
    "invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "failed_precondition": grpc.StatusCode.FAILED_PRECONDITION,
    "resource_exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "cancelled": grpc.StatusCode.CANCELLED,
    "deadline_exceeded": grpc.StatusCode.DEADLINE_EXCEEDED,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
}


def _deadline_passed(context: grpc.ServicerContext | None) -> bool:
    if context is None:
        return False
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0


def status_for(exc: BaseException, context: grpc.ServicerContext | None = None) -> tuple[grpc.StatusCode, status_pb2.Status]:
    """The status code and google.rpc.Status for an exception (the only such mapping)."""
    if isinstance(exc, GapError):
        code = CODES.get(exc.kind, grpc.StatusCode.INVALID_ARGUMENT)
        if code == grpc.StatusCode.CANCELLED and _deadline_passed(context):
            code = grpc.StatusCode.DEADLINE_EXCEEDED
        message = printable(exc.message, MAX_MESSAGE_CHARS)
    else:
        code = grpc.StatusCode.INTERNAL
        message = f"internal error ({type(exc).__name__}); see the server log"
    status = status_pb2.Status(code=code.value[0], message=message)
    violations = getattr(exc, "violations", ()) if isinstance(exc, GapError) else ()
    if violations:
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=printable(v.field), description=printable(v.description))
            for v in violations[:MAX_VIOLATIONS]
        ]))
        status.details.append(detail)
    return code, status


@contextlib.contextmanager
def embedded(prefix: str, own: tuple[str, ...] = ()) -> Iterator[None]:
    """Field violations raised inside name the fields of an embedded message (``prefix.field``),
    except the enclosing message's ``own`` fields."""
    try:
        yield
    except GapError as exc:
        if not exc.violations:
            raise
        violations = tuple(v if v.field.startswith(own) else FieldViolation(f"{prefix}.{v.field}", v.description)
                           for v in exc.violations)
        raise type(exc)("; ".join(f"{v.field}: {v.description}" for v in violations), violations) from exc


assert code_pb2.INVALID_ARGUMENT == grpc.StatusCode.INVALID_ARGUMENT.value[0]


# -- the guard ----------------------------------------------------------------------------------
@dataclass
class CallRecord:
    """What one call did; the servicer fills in model and nodes, the guard the rest."""

    rpc: str
    model: str = ""
    nodes: int = 0
    code: str = ""
    started: float = field(default_factory=time.perf_counter)


class Lifecycle(Protocol):
    def refusal(self) -> str | None:
        """Why new calls are refused right now (starting, draining), or None."""

    def enter(self) -> None: ...

    def exit(self) -> None: ...


class Observer(Protocol):
    def finished(self, record: CallRecord, seconds: float) -> None: ...


@dataclass(frozen=True)
class Malformed:
    """What the request deserializer returns for bytes that are no valid message."""

    error: str


def lenient_deserializer(message_type: type[protobuf_message.Message]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except Exception as exc:  # DecodeError and friends
            return Malformed(str(exc) or type(exc).__name__)

    return parse


class RpcGuard:
    """Wraps servicer methods ``fn(request, context, record)``; see the module docstring."""

    def __init__(self, lifecycle: Lifecycle, observer: Observer) -> None:
        self.lifecycle = lifecycle
        self.observer = observer

    def _admit(self, request: Any) -> None:
        reason = self.lifecycle.refusal()
        if reason:
            raise UnavailableError(reason)
        if isinstance(request, Malformed):
            from ..errors import invalid

            raise invalid("request", f"cannot parse the request message: {request.error}")

    def _fail(self, exc: BaseException, context: grpc.ServicerContext, record: CallRecord) -> None:
        code, status = status_for(exc, context)
        record.code = code.name
        if code == grpc.StatusCode.INTERNAL:
            log.error("internal error in %s", record.rpc, exc_info=exc)
        context.abort_with_status(rpc_status.to_status(status))

    def _finish(self, context: grpc.ServicerContext, record: CallRecord) -> None:
        if not record.code:
            if context.is_active():
                record.code = "OK"
            else:
                record.code = "DEADLINE_EXCEEDED" if _deadline_passed(context) else "CANCELLED"
        self.observer.finished(record, time.perf_counter() - record.started)

    def unary(self, rpc: str, fn: Callable[..., Any]) -> Callable[[Any, grpc.ServicerContext], Any]:
        def handler(request: Any, context: grpc.ServicerContext) -> Any:
            record = CallRecord(rpc)
            self.lifecycle.enter()
            try:
                self._admit(request)
                response = fn(request, context, record)
                record.code = "OK"
                return response
            except Exception as exc:
                if record.code:  # already aborted (abort raises)
                    raise
                self._fail(exc, context, record)
            finally:
                self.lifecycle.exit()
                self._finish(context, record)

        return handler

    def stream(self, rpc: str, fn: Callable[..., Iterator[Any]]) -> Callable[[Any, grpc.ServicerContext], Iterator[Any]]:
        def handler(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            record = CallRecord(rpc)
            self.lifecycle.enter()
            try:
                self._admit(request)
                yield from fn(request, context, record)
                if context.is_active():
                    record.code = "OK"
            except Exception as exc:
                if record.code:
                    raise
                self._fail(exc, context, record)
            finally:
                self.lifecycle.exit()
                self._finish(context, record)

        return handler
