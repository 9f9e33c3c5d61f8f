"""Domain errors of the engine.

Every error says *what* is wrong and *where* (op, node, tensor or field). The gRPC layer maps
them to status codes in one place by their ``kind``; the CLI prints them and exits non-zero.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request, as in google.rpc.BadRequest."""

    field: str
    description: str


class GapError(Exception):
    """Base class: a clear, user-facing error. ``kind`` picks the gRPC status code."""

    kind = "invalid_argument"

    def __init__(self, message: str, violations: tuple[FieldViolation, ...] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.violations = violations


class InvalidModelError(GapError):
    """The ONNX model cannot be loaded, normalised or is not a CNN we can explain."""

    kind = "failed_precondition"


class UnsupportedOpError(InvalidModelError):
    """Ops on a gradient path have no gradient rule; lists every one of them at once."""

    def __init__(self, ops: list[tuple[str, str]], where: str) -> None:
        listed = ", ".join(f"{op} (node '{name}')" for op, name in ops)
        super().__init__(f"no gradient rule for {len(ops)} op(s) on the path {where}: {listed}")
        self.ops = ops


class NotFoundError(GapError):
    """Something named in a request does not exist."""

    kind = "not_found"


class UnknownTensorError(NotFoundError):
    """A tensor or layer name that the model does not have."""


class UnknownModelError(NotFoundError):
    """A model name (or version) that the repository does not have."""


class NotConnectedError(GapError):
    """``lower`` does not feed ``upper``, so there is no gradient between them."""


class InvalidInputError(GapError):
    """Bad request data: shapes, dtypes, values or options out of range."""


class ResourceLimitError(GapError):
    """A request that would exceed a configured limit."""

    kind = "resource_exhausted"


class CancelledError(GapError):
    """The caller gave up; computation stopped between gradient runs."""

    kind = "cancelled"


def invalid(field: str, description: str) -> InvalidInputError:
    """An InvalidInputError that names the offending field."""
    return InvalidInputError(f"{field}: {description}", (FieldViolation(field, description),))


def exceeded(field: str, description: str) -> ResourceLimitError:
    """A ResourceLimitError that names the field whose size is over a limit."""
    return ResourceLimitError(f"{field}: {description}", (FieldViolation(field, description),))


MAX_ECHO_CHARS = 256


def _escaped(text: str, limit: int, quote: str = "") -> tuple[str, bool]:
    """Up to ``limit`` characters of ``text`` with control characters (and ``quote``) escaped, and
    whether it was cut; escaping as it goes, so the result stays near ``limit`` whatever the text."""
    parts: list[str] = []
    size = 0
    for c in text:
        if size >= limit:
            return "".join(parts), True
        piece = "\\" + c if c == quote else c if c.isprintable() else ascii(c)[1:-1]
        parts.append(piece)
        size += len(piece)
    return "".join(parts), False


def printable(value: object, limit: int = MAX_ECHO_CHARS) -> str:
    """``value`` as a message or a log line may echo it: control characters escaped (a newline
    cannot start a forged log line) and cut near ``limit`` characters, with the full length noted
    (a megabyte-long model name cannot bloat a status or a log)."""
    text = str(value)
    shown, cut = _escaped(text, limit)
    return f"{shown}... ({len(text)} characters)" if cut else shown


def quoted(value: object, limit: int = MAX_ECHO_CHARS) -> str:
    """``printable(value)`` in quotes (quotes inside escaped), for names inside messages."""
    text = str(value)
    shown, cut = _escaped(text, limit, "'")
    return f"'{shown}...' ({len(text)} characters)" if cut else f"'{shown}'"


def raise_violations(violations: list[FieldViolation] | tuple[FieldViolation, ...]) -> None:
    """Raise one InvalidInputError listing every violation, if there are any."""
    if violations:
        message = "; ".join(f"{v.field}: {v.description}" for v in violations)
        raise InvalidInputError(message, tuple(violations))
