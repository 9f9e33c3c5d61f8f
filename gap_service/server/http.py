"""HTTP/JSON transcoding of gap.v1, served by gap-service itself (docs/service.md, "HTTP/JSON").

One job: HTTP/JSON in, gap.v1 over gRPC, HTTP/JSON out. The routes are the google.api.http rules
of the service descriptor (nothing else), read as grpc-gateway and Envoy's grpc_json_transcoder
read them (transcoding.py), so the same annotations work behind either. Every call is forwarded over a private
channel (a unix socket that only this gateway knows) to this server's own gRPC service: API keys,
admission, limits, metrics, logs and deadlines are those of any gRPC call. Bodies and answers use
protobuf's JSON mapping; errors are google.rpc.Status JSON under the status google.rpc maps the
code to. Beside the API it serves the explorer page's static files and the colour map.

Hardening (docs/security.md): bounded connections (503 beyond), a socket timeout per connection,
request-line and header limits, Content-Length required and checked against --max-request-bytes
before a byte of the body is read, JSON bodies only, paths resolved inside the static folder, and
the same security headers on every answer. With TLS configured the port speaks TLS with the gRPC
port's certificate (and requires client certificates under mTLS), following the files as they change.
"""

from __future__ import annotations

import hashlib
import http.client
import itertools
import logging
import os
import re
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import numpy as np
from google.protobuf.message import Message

from ..colors import colormap
from ..errors import printable
from ..wire import pb
from .security import Reloading, TlsFiles
from .transcoding import (HTTP_STATUS, HttpError, Route, call_status, decoded, dumps, request_message, routes, status_json,
                          to_json)

log = logging.getLogger("gap_service.server")

STATIC_DIR = Path(__file__).resolve().parent.parent / "explorer" / "static"
MAX_CONNECTIONS = 64  # connections served at once (one thread each); more are answered 503
SOCKET_TIMEOUT = 30.0  # seconds a connection may sit idle or stall between bytes
MAX_REQUEST_LINE = 8192
MAX_HEADER_BYTES = 32768
LINGER_SECONDS, LINGER_BYTES = 1.0, 2**20  # reading what a refused request still sends, before closing
DEFAULT_TIMEOUT = 300.0  # the call's deadline unless grpc-timeout or X-Gap-Timeout says otherwise (nginx's too)
MAX_TIMEOUT = 3600.0
SECURITY_HEADERS = (
    ("Content-Security-Policy", "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
)
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8", ".json": "application/json", ".map": "application/json",
    ".txt": "text/plain; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png", ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg", ".webp": "image/webp", ".gif": "image/gif", ".ico": "image/x-icon", ".woff2": "font/woff2",
}
JSON = "application/json"
NDJSON = "application/x-ndjson"

# The gRPC code in the body of the gateway's own refusals, by HTTP status.
OWN_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND, 405: grpc.StatusCode.UNIMPLEMENTED,
             408: grpc.StatusCode.DEADLINE_EXCEEDED, 411: grpc.StatusCode.INVALID_ARGUMENT,
             413: grpc.StatusCode.RESOURCE_EXHAUSTED, 414: grpc.StatusCode.RESOURCE_EXHAUSTED,
             415: grpc.StatusCode.INVALID_ARGUMENT, 431: grpc.StatusCode.RESOURCE_EXHAUSTED,
             501: grpc.StatusCode.UNIMPLEMENTED, 503: grpc.StatusCode.UNAVAILABLE, 505: grpc.StatusCode.UNIMPLEMENTED}


def parse_timeout(headers: http.client.HTTPMessage) -> float:
    """The call's deadline in seconds: ``grpc-timeout`` (gRPC's format, e.g. 30S, 500m) or
    ``X-Gap-Timeout`` (seconds), at most MAX_TIMEOUT; DEFAULT_TIMEOUT without either."""
    grpc_timeout = headers.get("grpc-timeout")
    if grpc_timeout is not None:
        match = re.fullmatch(r"(\d{1,8})([HMSmun])", grpc_timeout.strip())
        if not match:
            raise HttpError(400, "grpc-timeout: digits and a unit (H, M, S, m, u, n), e.g. 30S")
        seconds = int(match.group(1)) * {"H": 3600, "M": 60, "S": 1, "m": 1e-3, "u": 1e-6, "n": 1e-9}[match.group(2)]
    else:
        text = headers.get("X-Gap-Timeout")
        if text is None:
            return DEFAULT_TIMEOUT
        try:
            seconds = float(text)
        except ValueError:
            seconds = -1.0
        if not seconds > 0:  # NaN too
            raise HttpError(400, "X-Gap-Timeout: a positive number of seconds")
    return min(seconds, MAX_TIMEOUT)


# -- the connection's end, watched -----------------------------------------------------------------
HANGUP = select.POLLHUP | select.POLLERR | getattr(select, "POLLRDHUP", 0)


class OnDisconnect:
    """While a call runs, cancel it if the client goes away (its side of the connection closed)."""

    def __init__(self, connection: socket.socket, cancel: Callable[[], Any]) -> None:
        self._fd = connection.fileno()
        self._cancel = cancel
        self.gone = False

    def __enter__(self) -> OnDisconnect:
        self._wake, self._woken = os.pipe()
        self._thread = threading.Thread(target=self._watch, name="gap-http-watch", daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        poller = select.poll()
        poller.register(self._fd, HANGUP)
        poller.register(self._wake, select.POLLIN)
        events = poller.poll()
        if any(fd == self._fd for fd, _ in events) and not any(fd == self._wake for fd, _ in events):
            self.gone = True
            self._cancel()

    def __exit__(self, *exc: object) -> None:
        os.write(self._woken, b"x")
        self._thread.join()
        os.close(self._wake)
        os.close(self._woken)


# -- the HTTP side ---------------------------------------------------------------------------------
class _HeadLimit:
    """The connection's reader while headers are parsed: at most ``left`` bytes for all of them."""

    def __init__(self, reader: Any, left: int) -> None:
        self._reader, self._left = reader, left

    def readline(self, size: int = -1) -> bytes:
        line = self._reader.readline(self._left + 1 if size < 0 else min(size, self._left + 1))
        self._left -= len(line)
        if self._left < 0:
            raise http.client.LineTooLong(f"header section over {MAX_HEADER_BYTES} bytes")
        return line


class Handler(BaseHTTPRequestHandler):
    """One connection (keep-alive: several requests); see the module docstring."""

    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.0"  # no HTTP/0.9: every answer, errors included, has a status line
    timeout = SOCKET_TIMEOUT
    server: _Server

    def setup(self) -> None:
        self.request.settimeout(self.timeout)
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # headers, body, stream lines: no Nagle delay
        if isinstance(self.request, ssl.SSLSocket):
            self.request.do_handshake()
        super().setup()
        self.gateway = self.server.gateway
        self.busy = self._linger = False
        self.server.connections.add(self)

    def finish(self) -> None:
        self.server.connections.discard(self)
        super().finish()
        if self._linger:
            self._drain_input()

    def _drain_input(self) -> None:
        """A lingering close after a refusal that left input unread: closing at once would reset the
        connection, and the client could lose the answer. Bounded: LINGER_SECONDS, LINGER_BYTES."""
        try:
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(LINGER_SECONDS)
            deadline, left = time.monotonic() + LINGER_SECONDS, LINGER_BYTES
            while left > 0 and time.monotonic() < deadline and (chunk := self.connection.recv(min(left, 65536))):
                left -= len(chunk)
        except OSError:
            pass

    # Every method comes here: routes answer 405 (with Allow) to the ones they do not take.
    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    def handle_one_request(self) -> None:
        self._status, self._rpc, self._started = 0, "", time.perf_counter()  # the clock starts again at the request line
        try:
            super().handle_one_request()
        finally:
            if self._status:
                log.info("http", extra={"fields": {
                    "method": printable(self.command or "", 16), "path": printable(urlsplit(self.path or "").path, 256),
                    "rpc": self._rpc, "status": int(self._status), "duration_ms": round((time.perf_counter() - self._started) * 1000, 3),
                }})
            self.busy = False

    def parse_request(self) -> bool:
        self.busy, self._started = True, time.perf_counter()
        if len(self.raw_requestline) > MAX_REQUEST_LINE:
            self.requestline, self.request_version, self.command = "", "HTTP/1.1", ""
            self.close_connection = True
            self.send_error(414, f"the request line is over {MAX_REQUEST_LINE} bytes")
            return False
        reader, self.rfile = self.rfile, _HeadLimit(self.rfile, MAX_HEADER_BYTES)
        try:
            return super().parse_request()
        finally:
            self.rfile = reader

    def handle_expect_100(self) -> bool:
        try:  # refuse a body that is too big before the client sends it
            self._body_length()
        except HttpError as refusal:
            self._refuse(refusal)
            return False
        return super().handle_expect_100()

    def version_string(self) -> str:
        return "gap-service"  # no Python or library versions on the wire

    def log_message(self, format: str, *args: Any) -> None:
        """Silenced: one ``http`` log line per request instead (handle_one_request)."""

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The base class's own refusals (bad request line, headers, unknown methods), as JSON."""
        self.close_connection = True
        self._refuse(HttpError(code, message or http.client.responses.get(code, "error"), close=True))

    # -- answers -------------------------------------------------------------------------------------
    def _respond(self, status: int, body: bytes, content_type: str = JSON, headers: tuple[tuple[str, str], ...] = (),
                 close: bool = False) -> None:
        self._start(status, content_type, headers + (("Content-Length", str(len(body))),), close)
        if self.command != "HEAD" and status not in (204, 304):
            self.wfile.write(body)

    def _start(self, status: int, content_type: str | None, headers: tuple[tuple[str, str], ...], close: bool) -> None:
        self._status = status
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        for name, value in (*SECURITY_HEADERS, ("X-Gap-Replica", self.gateway.replica), *headers):
            self.send_header(name, value)
        if close or self.gateway.draining:
            self.close_connection = True
            self.send_header("Connection", "close")
        self.end_headers()

    def _refuse(self, refusal: HttpError) -> None:
        self._linger = self._linger or refusal.close
        code = OWN_CODES.get(refusal.status, grpc.StatusCode.UNKNOWN)
        self._respond(refusal.status, dumps(status_json(code, refusal.message)), headers=refusal.headers,
                      close=refusal.close)

    def _fail(self, error: grpc.RpcError) -> None:
        code, body = call_status(error)
        self._respond(HTTP_STATUS.get(code, 500), dumps(body))

    # -- requests ------------------------------------------------------------------------------------
    def _dispatch(self) -> None:
        try:
            url = urlsplit(self.path)
            if not url.path.startswith("/"):
                raise HttpError(400, "the request target must be a path (/...)", close=True)
            if self.gateway.draining:
                raise HttpError(503, "the server is shutting down; retry on another replica", close=True)
            if url.path == "/" or url.path == "/colormap.json" or url.path.startswith("/static/"):
                self._static(url.path)
            else:
                self._api(url.path, url.query)
        except HttpError as refusal:
            self._refuse(refusal)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError, TimeoutError):
            self.close_connection = True
        except Exception:
            log.error("internal error in the HTTP gateway", exc_info=True)
            if not self._status:
                self._refuse(HttpError(500, "internal error in the HTTP gateway; see the server log", close=True))
            self.close_connection = True

    def _method_allowed(self, allowed: tuple[str, ...]) -> bool:
        """True to go on; False when answered here: OPTIONS, 204 with Allow (no CORS: the page is same-origin)."""
        allow = ", ".join(allowed + ("OPTIONS",))
        if self.command == "OPTIONS":
            self._discard_body()
            self._start(204, None, (("Allow", allow), ("Content-Length", "0")), close=False)
            return False
        if self.command not in allowed:
            raise HttpError(405, f"{printable(self.command, 16)} is not allowed here; allowed: {allow}",
                            close=self.command not in ("GET", "HEAD"), headers=(("Allow", allow),))
        return True

    def _static(self, path: str) -> None:
        if not self._method_allowed(("GET", "HEAD")):
            return
        self._discard_body()
        if path == "/colormap.json":
            body, etag, content_type = self.gateway.colormap, self.gateway.colormap_etag, JSON
        else:
            file = self.gateway.static_file("index.html" if path == "/" else decoded(path[len("/static/"):]))
            stat = file.stat()
            body, etag = None, f'"{stat.st_mtime_ns:x}-{stat.st_size:x}"'
            content_type = CONTENT_TYPES.get(file.suffix.lower(), "application/octet-stream")
        cache = (("ETag", etag), ("Cache-Control", "no-cache"))
        if etag in {tag.strip() for tag in self.headers.get("If-None-Match", "").split(",")}:
            self._start(304, None, cache, close=False)
            return
        self._respond(200, body if body is not None else file.read_bytes(), content_type, cache)

    def _api(self, path: str, query: str) -> None:
        segments = path[1:].split("/")
        matching = [(route, values) for route in self.gateway.routes if (values := route.match(segments)) is not None]
        if any(route.verb for route, _ in matching):  # the verb decides, as in grpc-gateway
            matching = [(route, values) for route, values in matching if route.verb]
        if not matching:
            raise HttpError(404, f"no route for {printable(path, 256)}: the API is under /v1/ (docs/service.md), "
                                 "the explorer page at /")
        if not self._method_allowed(tuple(dict.fromkeys(route.method for route, _ in matching))):
            return
        route, values = next((route, values) for route, values in matching if route.method == self.command)
        self._rpc = route.rpc
        body = self._json_body() if route.body == "*" else self._discard_body()
        request = request_message(route, values, query, body)
        metadata = self._metadata()
        timeout = parse_timeout(self.headers)
        if route.streaming:
            self._stream(route, request, timeout, metadata)
        else:
            self._unary(route, request, timeout, metadata)

    def _body_length(self) -> int:
        if "Transfer-Encoding" in self.headers:
            raise HttpError(411, "chunked request bodies are not accepted: send Content-Length", close=True)
        lengths = {value.strip() for value in self.headers.get_all("Content-Length", [])}
        if not lengths:
            return -1
        if len(lengths) > 1 or not next(iter(lengths)).isdigit():
            raise HttpError(400, "Content-Length must be one number of bytes", close=True)
        length = int(next(iter(lengths)))
        if length > self.gateway.max_body_bytes:
            raise HttpError(413, f"the body is {length} bytes; the server takes at most {self.gateway.max_body_bytes} "
                                 "(--max-request-bytes)", close=True)
        return length

    def _read(self, length: int) -> bytes:
        data = self.rfile.read(length)
        if len(data) < length:
            raise ConnectionResetError("the client closed the connection before the end of the body")
        return data

    def _json_body(self) -> bytes:
        length = self._body_length()
        if length < 0:
            raise HttpError(411, "Content-Length is required: the body is the request message in JSON")
        media = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if media != JSON:
            raise HttpError(415, "send the request as Content-Type: application/json (the protobuf JSON mapping)",
                            close=length > 0)
        return self._read(length)

    def _discard_body(self) -> None:
        length = self._body_length()
        if length > 0:
            self._read(length)

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        """HTTP ``Authorization`` is the metadata the API-key interceptor reads."""
        authorization = self.headers.get("Authorization")
        if authorization is None:
            return ()
        if not re.fullmatch(r"[\x20-\x7e]*", authorization):
            raise HttpError(400, "the Authorization header must be printable ASCII (Bearer KEY)")
        return (("authorization", authorization),)

    def _unary(self, route: Route, request: Message, timeout: float, metadata: tuple[tuple[str, str], ...]) -> None:
        future = self.gateway.unary(route).future(request, timeout=timeout, metadata=metadata)
        with OnDisconnect(self.connection, future.cancel) as watch:
            try:
                response = future.result()
            except (grpc.RpcError, grpc.FutureCancelledError) as error:
                if watch.gone:
                    self._gone()
                else:
                    self._fail(error)
                return
        self._respond(200, dumps(to_json(response)), headers=(("Cache-Control", "no-store"),))

    def _stream(self, route: Route, request: Message, timeout: float, metadata: tuple[tuple[str, str], ...]) -> None:
        """NDJSON, one ``{"result": ...}`` line per message, sent as each arrives; an error before the
        first message is an ordinary error answer, one after it a last ``{"error": ...}`` line."""
        call = self.gateway.streaming(route)(request, timeout=timeout, metadata=metadata)
        messages: Iterator[Message] = iter(call)
        chunked = self.request_version == "HTTP/1.1"
        with OnDisconnect(self.connection, call.cancel) as watch:
            try:
                first = next(messages, None)
            except grpc.RpcError as error:
                if watch.gone:
                    self._gone()
                else:
                    self._fail(error)
                return
            # no-cache, not no-store: Chromium reports a no-store stream read to its end as aborted.
            headers = (("Cache-Control", "no-cache"), ("X-Accel-Buffering", "no"))
            self._start(200, NDJSON, headers + ((("Transfer-Encoding", "chunked"),) if chunked else ()), close=not chunked)
            try:
                try:
                    for message in itertools.chain(() if first is None else (first,), messages):
                        self._line({"result": to_json(message)}, chunked)
                except grpc.RpcError as error:
                    if watch.gone:
                        raise ConnectionResetError("the client went away") from None
                    self._line({"error": call_status(error)[1]}, chunked)
                if chunked:
                    self.wfile.write(b"0\r\n\r\n")
            except OSError:  # the client went away mid-stream
                call.cancel()
                self._gone()

    def _gone(self) -> None:
        """The client left before its answer: nothing to send (logged as 499, nginx's code for it)."""
        self._status, self.close_connection = 499, True

    def _line(self, value: Any, chunked: bool) -> None:
        data = dumps(value) + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)


class _Server(ThreadingHTTPServer):
    """The listening socket: bounded connections, TLS per connection, no reverse DNS at bind."""

    daemon_threads = True
    block_on_close = False  # stop() waits for busy connections itself, bounded by the grace
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], gateway: HttpGateway) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.gateway = gateway
        self.connections: set[Handler] = set()
        self._slots = threading.BoundedSemaphore(gateway.max_connections)
        super().__init__(address, Handler)

    def server_bind(self) -> None:
        import socketserver

        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[0], self.server_address[1]

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self._busy(request)
            return
        if self.gateway.tls is not None:
            request = self.gateway.tls.current().wrap_socket(request, server_side=True, do_handshake_on_connect=False)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: socket.socket, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _busy(self, request: socket.socket) -> None:
        """Over MAX_CONNECTIONS: a plaintext 503 (a TLS client is closed on: answering needs a handshake)."""
        try:
            if self.gateway.tls is None:
                body = dumps(status_json(grpc.StatusCode.UNAVAILABLE, "too many connections; retry shortly"))
                request.settimeout(1.0)
                headers = "".join(f"{name}: {value}\r\n" for name, value in (*SECURITY_HEADERS, ("X-Gap-Replica", self.gateway.replica)))
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
                                b"Retry-After: 1\r\n%sContent-Length: %d\r\n\r\n%s" % (headers.encode(), len(body), body))
        except OSError:
            pass
        finally:
            self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that failed outside a request (a TLS handshake, a reset): one line, no traceback."""
        import sys

        error = sys.exc_info()[1]
        log.info("http connection failed", extra={"fields": {"error": printable(f"{type(error).__name__}: {error}", 256)}})


class HttpGateway:
    """The HTTP/JSON port of one server: start, begin_drain (new requests 503), stop."""

    def __init__(self, target: str, max_body_bytes: int, tls: TlsFiles | None = None, static_dir: Path = STATIC_DIR,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        """``target``: the server's private gRPC address (a unix socket)."""
        self.routes = routes()
        self.max_body_bytes = max_body_bytes
        self.max_connections = max_connections
        self.static_dir = static_dir
        self.tls = Reloading("HTTP TLS certificates", tls.paths, lambda: _ssl_context(tls)) if tls is not None else None
        self.replica = f"{socket.gethostname()}:{os.getpid()}"
        self.draining = False
        table = colormap(np.linspace(0.0, 1.0, 256, dtype=np.float32)).tolist()
        self.colormap = dumps(table)
        self.colormap_etag = f'"{hashlib.sha256(self.colormap).hexdigest()[:32]}"'
        self._channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", -1),
                                                               ("grpc.max_send_message_length", -1)])
        self._methods = {
            route.rpc: (self._channel.unary_stream if route.streaming else self._channel.unary_unary)(
                f"/{pb.SERVICE_NAME}/{route.rpc}", request_serializer=route.request.SerializeToString,
                response_deserializer=route.response.FromString)
            for route in self.routes
        }
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def unary(self, route: Route) -> grpc.UnaryUnaryMultiCallable:
        return self._methods[route.rpc]

    def streaming(self, route: Route) -> grpc.UnaryStreamMultiCallable:
        return self._methods[route.rpc]

    def static_file(self, relative: str) -> Path:
        """A file inside the static folder, or a 404: no dot segments or hidden files, and the resolved
        path (links followed) must stay inside the folder."""
        parts = relative.split("/")
        if any(not p or p.startswith(".") or "\\" in p or "\0" in p for p in parts):
            raise HttpError(404, "no such file")
        folder = self.static_dir.resolve()
        path = (folder / relative).resolve()
        if not path.is_relative_to(folder) or not path.is_file():
            raise HttpError(404, "no such file" if folder.is_dir() else "the explorer page is not installed")
        return path

    def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0: a free port); returns the port."""
        address = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        try:
            self._server = _Server((address, port), self)
        except OSError as exc:
            raise OSError(f"cannot listen on {host}:{port} for HTTP: {exc.strerror or exc}") from exc
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="gap-http", daemon=True)
        self._thread.start()
        return int(self._server.server_address[1])

    def begin_drain(self) -> None:
        """New requests get 503 (and their connection closed); requests already forwarded go on."""
        self.draining = True

    def stop(self, timeout: float) -> bool:
        """Stop listening, close idle connections, wait up to ``timeout`` s for busy ones. True if all finished."""
        self.draining = True
        if self._server is None:
            return True
        self._server.shutdown()
        self._server.server_close()
        deadline = time.monotonic() + timeout
        while True:
            for handler in list(self._server.connections):
                if not handler.busy:  # waiting for a next request on a keep-alive connection
                    try:
                        handler.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
            if not self._server.connections or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        finished = not self._server.connections
        self._channel.close()
        return finished


def _ssl_context(tls: TlsFiles) -> ssl.SSLContext:
    """The gRPC port's certificate for HTTPS; with a client CA, client certificates required (mTLS)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls.cert, tls.key)
    context.set_alpn_protocols(["http/1.1"])
    if tls.client_ca is not None:
        context.load_verify_locations(cafile=str(tls.client_ca))
        context.verify_mode = ssl.CERT_REQUIRED
    return context
