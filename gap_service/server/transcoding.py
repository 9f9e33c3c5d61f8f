"""HTTP/JSON transcoding of gap.v1 messages: the routes of the google.api.http rules, the request
message from a path, query and JSON body, and answers and errors in protobuf's JSON mapping.

Read as grpc-gateway and Envoy's grpc_json_transcoder read the same rules, so either could stand
in front of the gRPC port instead of the gateway (http.py), which serves these over HTTP.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote

import grpc
from google.api import annotations_pb2
from google.protobuf import descriptor as protobuf_descriptor
from google.protobuf import json_format, message_factory
from google.protobuf.message import Message
from google.rpc import status_pb2
from grpc_status import rpc_status

from ..errors import printable
from ..wire import pb

MAX_QUERY_FIELDS = 64

# google.rpc's mapping of status codes to HTTP (google/rpc/code.proto), as grpc-gateway and Envoy use it.
HTTP_STATUS = {
    grpc.StatusCode.OK: 200, grpc.StatusCode.CANCELLED: 499, grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.DEADLINE_EXCEEDED: 504, grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409, grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400, grpc.StatusCode.ABORTED: 409, grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501, grpc.StatusCode.INTERNAL: 500, grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500, grpc.StatusCode.UNAUTHENTICATED: 401,
}
class HttpError(Exception):
    """A request the gateway answers itself: HTTP status, message; ``close`` when the body was left unread."""

    def __init__(self, status: int, message: str, close: bool = False, headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.status, self.message, self.close, self.headers = status, message, close, headers


# -- routes from the google.api.http rules ---------------------------------------------------------
@dataclass(frozen=True)
class Route:
    """One RPC's HTTP rule: ``parts`` are literal segments, or None where a variable binds one segment
    to the field path of ``fields`` (in order); ``verb`` is the ``:verb`` suffix of the last segment."""

    rpc: str
    method: str
    template: str
    parts: tuple[str | None, ...]
    fields: tuple[tuple[str, ...], ...]
    verb: str
    body: str
    streaming: bool
    request: type[Message]
    response: type[Message]

    def match(self, segments: list[str]) -> dict[tuple[str, ...], str] | None:
        """The path variables' values when the raw (percent-encoded) ``segments`` fit the template."""
        if len(segments) != len(self.parts):
            return None
        if self.verb:
            suffix = ":" + self.verb
            if not segments[-1].endswith(suffix):
                return None
            segments = [*segments[:-1], segments[-1][:-len(suffix)]]
        values = {}
        fields = iter(self.fields)
        for part, raw in zip(self.parts, segments):
            text = decoded(raw)
            if part is None:
                if not text:
                    return None
                values[next(fields)] = text
            elif text != part:
                return None
        return values


def decoded(raw: str) -> str:
    try:
        return unquote(raw, errors="strict")
    except UnicodeDecodeError:
        raise HttpError(400, "the path is not percent-encoded UTF-8") from None


def parse_template(template: str) -> tuple[tuple[str | None, ...], tuple[tuple[str, ...], ...], str]:
    """(parts, variable field paths, verb) of a google.api.http path template. Literal segments and
    single-segment variables (``{field}``, ``{a.b}``, ``{field=*}``) only: ``*``, ``**`` and multi-segment
    variables are refused (no GapService rule uses them)."""
    if not template.startswith("/"):
        raise ValueError(f"{template}: a path template starts with /")
    path, verb = template, ""
    if ":" in template.rsplit("/", 1)[-1].rsplit("}", 1)[-1]:
        path, _, verb = template.rpartition(":")
    parts: list[str | None] = []
    fields: list[tuple[str, ...]] = []
    for segment in path[1:].split("/"):
        if segment.startswith("{") and segment.endswith("}"):
            name, _, pattern = segment[1:-1].partition("=")
            if pattern not in ("", "*"):
                raise ValueError(f"{template}: only single-segment variables are supported, not {segment}")
            parts.append(None)
            fields.append(tuple(name.split(".")))
        elif not segment or segment in ("*", "**") or "{" in segment or "}" in segment:
            raise ValueError(f"{template}: unsupported segment {segment!r}")
        else:
            parts.append(segment)
    return tuple(parts), tuple(fields), verb


def _field(descriptor: protobuf_descriptor.Descriptor, name: str) -> protobuf_descriptor.FieldDescriptor | None:
    """A field by its proto name or its JSON name (grpc-gateway and Envoy accept both)."""
    field = descriptor.fields_by_name.get(name)
    if field is None:
        field = next((f for f in descriptor.fields if f.json_name == name), None)
    return field


def routes(service: protobuf_descriptor.ServiceDescriptor = pb.service.DESCRIPTOR.services_by_name["GapService"]) -> list[Route]:
    """The service's routes, from its methods' google.api.http rules."""
    found = []
    for method in service.methods:
        options = method.GetOptions()
        if not options.HasExtension(annotations_pb2.http):
            continue
        rule = options.Extensions[annotations_pb2.http]
        kind = rule.WhichOneof("pattern")
        if kind in (None, "custom") or rule.additional_bindings or rule.response_body or rule.body not in ("", "*"):
            raise ValueError(f"{method.full_name}: only get/post/put/delete/patch rules with body \"\" or \"*\" are supported")
        template = getattr(rule, kind)
        parts, fields, verb = parse_template(template)
        for names in fields:
            descriptor, field = method.input_type, None
            for name in names:
                field = descriptor.fields_by_name.get(name) if descriptor is not None else None
                if field is None:
                    raise ValueError(f"{method.full_name}: {template} binds {'.'.join(names)}, not a field of the request")
                descriptor = field.message_type
            if field.type != field.TYPE_STRING or field.is_repeated:
                raise ValueError(f"{method.full_name}: {template} binds {'.'.join(names)}: path variables bind string fields")
        found.append(Route(method.name, kind.upper(), template, parts, fields, verb, rule.body, method.server_streaming,
                           message_factory.GetMessageClass(method.input_type),
                           message_factory.GetMessageClass(method.output_type)))
    return found


def request_message(route: Route, path_values: dict[tuple[str, ...], str], query: str, body: bytes | None) -> Message:
    """The request message from the path, the query (GET) or the JSON body (``body: "*"``), in the
    protobuf JSON mapping; a 400 naming the problem otherwise."""
    if body is None:
        document: dict[str, Any] = {}
    else:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise HttpError(400, "the body is not UTF-8 JSON") from None
        try:
            document = json.loads(text) if text.strip() else {}
        except (ValueError, RecursionError) as exc:
            raise HttpError(400, f"the body is not JSON: {printable(exc)}") from None
        if not isinstance(document, dict):
            raise HttpError(400, f"the body must be a JSON object (the {route.request.DESCRIPTOR.name} message)")
    if query:
        if route.body == "*":
            raise HttpError(400, f"{route.rpc} takes no query parameters: the JSON body is the whole request")
        _apply_query(route, document, query)
    for names, value in path_values.items():
        _put(document, route.request.DESCRIPTOR, names, value, "the path")
    try:
        return json_format.ParseDict(document, route.request())
    except json_format.ParseError as exc:
        raise HttpError(400, printable(exc, 1024)) from None


def _apply_query(route: Route, document: dict[str, Any], query: str) -> None:
    try:
        pairs = parse_qsl(query, keep_blank_values=True, errors="strict", max_num_fields=MAX_QUERY_FIELDS)
    except UnicodeDecodeError:
        raise HttpError(400, "the query is not percent-encoded UTF-8") from None
    except ValueError:
        raise HttpError(400, f"more than {MAX_QUERY_FIELDS} query parameters") from None
    values: dict[tuple[str, ...], list[Any]] = {}
    kinds: dict[tuple[str, ...], protobuf_descriptor.FieldDescriptor] = {}
    for key, text in pairs:
        descriptor, names, field = route.request.DESCRIPTOR, [], None
        for name in key.split("."):
            field = _field(descriptor, name) if descriptor is not None else None
            if field is None:
                known = ", ".join(f.name for f in route.request.DESCRIPTOR.fields)
                raise HttpError(400, f"unknown query parameter {printable(key)!r} for {route.rpc} (its fields: {known})")
            names.append(field.name)
            descriptor = field.message_type
        path = tuple(names)
        if field.message_type is not None:
            raise HttpError(400, f"query parameter {printable(key)!r} is a message: set its fields ({key}.FIELD=...)")
        if path in route.fields:
            raise HttpError(400, f"query parameter {printable(key)!r} is already in the path")
        if path in values and not field.is_repeated:
            raise HttpError(400, f"query parameter {printable(key)!r} is given twice")
        values.setdefault(path, []).append(_query_value(field, key, text))
        kinds[path] = field
    for path, given in values.items():
        _put(document, route.request.DESCRIPTOR, path, given if kinds[path].is_repeated else given[0],
             "the query")


TRUE, FALSE = {"true", "t", "1"}, {"false", "f", "0"}


def _query_value(field: protobuf_descriptor.FieldDescriptor, key: str, text: str) -> Any:
    """A query value as the JSON mapping reads it: numbers, enums (name or number), strings and
    base64 bytes from their text, booleans from true/false/1/0 (grpc-gateway's strconv.ParseBool)."""
    if field.type == field.TYPE_BOOL:
        if text.lower() in TRUE:
            return True
        if text.lower() in FALSE:
            return False
        raise HttpError(400, f"query parameter {printable(key)!r}: {printable(text)!r} is not true or false")
    return text


def _put(document: dict[str, Any], descriptor: protobuf_descriptor.Descriptor, names: tuple[str, ...], value: Any,
         source: str) -> None:
    """Set a field (by its path of proto names) in the JSON document; a value already there must agree."""
    for depth, name in enumerate(names):
        field = descriptor.fields_by_name[name]
        keys = [k for k in dict.fromkeys((field.name, field.json_name)) if k in document]
        if depth == len(names) - 1:
            for key in keys:
                if document[key] != value:
                    raise HttpError(400, f"{'.'.join(names)} is {printable(value)!r} in {source} but "
                                         f"{printable(document[key])!r} in the body")
            document[keys[0] if keys else field.name] = value
            return
        inner = document.setdefault(keys[0] if keys else field.name, {})
        if not isinstance(inner, dict):
            raise HttpError(400, f"{'.'.join(names[:depth + 1])} must be a JSON object (the {field.message_type.name} message)")
        document, descriptor = inner, field.message_type


def to_json(message: Message) -> dict[str, Any]:
    """The protobuf JSON mapping as the gateway writes it: lowerCamelCase names, enums by name,
    int64 as strings, bytes as base64, and every field without presence present (as grpc-gateway)."""
    return json_format.MessageToDict(message, always_print_fields_with_no_presence=True)


def dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def status_json(code: grpc.StatusCode, message: str, details: status_pb2.Status | None = None) -> dict[str, Any]:
    """google.rpc.Status JSON: {"code": <gRPC code number>, "message": ..., "details": [...]}."""
    status = details if details is not None else status_pb2.Status(code=code.value[0], message=message)
    return to_json(status)


def call_status(error: grpc.RpcError) -> tuple[grpc.StatusCode, dict[str, Any]]:
    """The code and the google.rpc.Status JSON (with the server's BadRequest details) of a failed call."""
    code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
    message = (error.details() if isinstance(error, grpc.Call) else "") or code.name
    try:
        rich = rpc_status.from_call(error) if isinstance(error, grpc.Call) else None
    except ValueError:  # details inconsistent with the status: the plain status
        rich = None
    return code, status_json(code, message, rich)
