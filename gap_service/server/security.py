"""Transport security of the server: TLS and mTLS credentials that follow their files, API keys,
and the one interceptor that authenticates and authorises GapService calls (docs/security.md).

* ``TlsFiles.credentials``: TLS on the gRPC port; with ``client_ca``, mTLS (a client must present a
  certificate signed by that CA, or the handshake fails). The files are read again when they change
  (Kubernetes Secret updates, cert-manager renewals): gRPC asks before every new connection's
  handshake, connections already open keep their certificate.
* ``ApiKeys``: keys from a JSON file (read again when it changes) or an environment variable, each
  with the models it may use. Only SHA-256 digests are kept in memory; tokens are compared in
  constant time and never logged.
* ``AuthInterceptor``: ``authorization: Bearer <key>`` on every gap.v1.GapService call. Missing or
  unknown -> UNAUTHENTICATED (the request is not even parsed); a model the key may not use ->
  PERMISSION_DENIED, whether or not the model exists (a key learns nothing about other models);
  ListModels lists only the key's models. Health and reflection stay open: probes and load
  balancers carry no key, and reflection, off in the images, describes the API, not the models.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import json
import logging
import os
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import grpc
from google.protobuf import message as protobuf_message

from ..errors import GapError
from ..wire import pb
from .errors import CallRecord, Observer

log = logging.getLogger("gap_service.server")

T = TypeVar("T")
RELOAD_CHECK_SECONDS = 1.0  # how often changed files are looked for (a stat per file, at most once a second)
MIN_KEY_CHARS = 16  # plaintext keys shorter than this are refused: guessable
GAP_METHODS = f"/{pb.SERVICE_NAME}/"


class SecurityConfigError(GapError):
    """A certificate, key or API-key file that cannot be used; says which file and why."""

    kind = "failed_precondition"


# -- files that are read again when they change ------------------------------------------------------
def _signature(paths: Sequence[Path]) -> tuple[tuple[int, int, int], ...]:
    """What changes when a file is replaced or rewritten (a Secret update swaps a symlink: new inode)."""
    stats = []
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError:
            stats.append((0, 0, 0))
        else:
            stats.append((stat.st_mtime_ns, stat.st_size, stat.st_ino))
    return tuple(stats)


class Reloading(Generic[T]):
    """A value read from files, read again when one of them changes (checked at most every
    RELOAD_CHECK_SECONDS). A change that does not load (a half-written file) keeps the old value
    and logs why; the next change is tried again."""

    def __init__(self, what: str, paths: Sequence[Path], load: Callable[[], T]) -> None:
        self.what = what
        self.paths = tuple(paths)
        self._load = load
        self._lock = threading.Lock()
        self._signature = _signature(self.paths)
        self.value = load()  # the first load fails loudly: the server does not start
        self._checked = time.monotonic()

    def refresh(self) -> T | None:
        """The new value when the files changed and load, else None (the current value stays)."""
        if not self.paths or time.monotonic() - self._checked < RELOAD_CHECK_SECONDS:
            return None
        with self._lock:
            self._checked = time.monotonic()
            signature = _signature(self.paths)
            if signature == self._signature:
                return None
            self._signature = signature  # before loading: a change during the load is seen next time
            try:
                value = self._load()
            except (OSError, ValueError, GapError) as exc:
                log.warning("reload failed", extra={"fields": {"what": self.what, "error": str(exc)}})
                return None
            self.value = value
        log.info("reloaded", extra={"fields": {"what": self.what}})
        return value

    def current(self) -> T:
        self.refresh()
        return self.value


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SecurityConfigError(f"cannot read the {what} {path}: {exc.strerror or exc}") from exc


# -- TLS ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TlsFiles:
    """PEM files of the server's TLS: certificate chain, private key, and for mTLS the CA that
    signs the clients' certificates."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    @property
    def paths(self) -> tuple[Path, ...]:
        return (self.cert, self.key) + ((self.client_ca,) if self.client_ca else ())

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        """The files' contents for gRPC, checked first: gRPC would only fail at each client's handshake."""
        key, cert = _read(self.key, "TLS private key"), _read(self.cert, "TLS certificate")
        roots = _read(self.client_ca, "client CA") if self.client_ca else None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self.cert, self.key)  # PEM, and the key is the certificate's
        except ssl.SSLError as exc:
            raise SecurityConfigError(
                f"{self.cert} with {self.key}: not a PEM certificate and its key ({exc.reason or exc})") from exc
        if roots is not None:
            try:
                context.load_verify_locations(cadata=roots.decode("ascii", "replace"))
            except (ssl.SSLError, ValueError) as exc:
                raise SecurityConfigError(f"{self.client_ca}: not PEM CA certificates ({exc})") from exc
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=roots)

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials whose certificates follow the files (a new connection gets the new ones)."""
        files = Reloading("TLS certificates", self.paths, self.configuration)
        return grpc.dynamic_ssl_server_credentials(files.value, files.refresh,
                                                   require_client_authentication=self.client_ca is not None)


# -- API keys -------------------------------------------------------------------------------------------
def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True)
class ApiKey:
    """One key: its name (in messages about the key file), the key's SHA-256, the models it may use (globs)."""

    name: str
    digest: bytes
    models: tuple[str, ...]

    @property
    def unrestricted(self) -> bool:
        return "*" in self.models

    def may_use(self, model: str) -> bool:
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)


@dataclass(frozen=True)
class ApiKeys:
    """The accepted keys. Source: a JSON file, or ``env:NAME`` for the JSON in an environment variable:

        [{"name": "ci", "key_sha256": "<64 hex digits>", "models": ["*"]},
         {"name": "ocr", "key": "<the key itself, 16+ characters>", "models": ["ppocr_cls", "rapid_*"]}]
    """

    keys: tuple[ApiKey, ...]

    def find(self, token: str) -> ApiKey | None:
        """The key ``token`` is, or None. Every key is compared (constant time, no early exit)."""
        digest = key_digest(token)
        found = None
        for key in self.keys:
            if hmac.compare_digest(key.digest, digest):
                found = key
        return found

    @staticmethod
    def parse(text: str, where: str) -> ApiKeys:
        try:
            entries = json.loads(text)
        except ValueError as exc:
            raise SecurityConfigError(f"{where}: not JSON ({exc})") from exc
        if not isinstance(entries, list) or not entries:
            raise SecurityConfigError(f"{where}: expected a non-empty JSON list of keys")
        keys: list[ApiKey] = []
        for index, entry in enumerate(entries):
            keys.append(_parse_key(entry, f"{where}: key {index}"))
        digests = [k.digest for k in keys]
        if len(set(digests)) != len(digests):
            raise SecurityConfigError(f"{where}: the same key is listed twice")
        return ApiKeys(tuple(keys))


def _parse_key(entry: Any, where: str) -> ApiKey:
    if not isinstance(entry, dict):
        raise SecurityConfigError(f"{where}: expected an object with key or key_sha256, and models")
    unknown = set(entry) - {"name", "key", "key_sha256", "models"}
    if unknown:
        raise SecurityConfigError(f"{where}: unknown fields {sorted(unknown)}")
    name = entry.get("name", where.rsplit(": ", 1)[-1])
    if ("key" in entry) == ("key_sha256" in entry):
        raise SecurityConfigError(f"{where} ({name}): give exactly one of key and key_sha256")
    if "key" in entry:
        if not isinstance(entry["key"], str) or len(entry["key"]) < MIN_KEY_CHARS:
            raise SecurityConfigError(f"{where} ({name}): a key needs at least {MIN_KEY_CHARS} characters")
        digest = key_digest(entry["key"])
    else:
        try:
            digest = bytes.fromhex(entry["key_sha256"])
        except (TypeError, ValueError):
            digest = b""
        if len(digest) != hashlib.sha256().digest_size:
            raise SecurityConfigError(f"{where} ({name}): key_sha256 must be 64 hexadecimal digits")
    models = entry.get("models")
    if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
        raise SecurityConfigError(f"{where} ({name}): models must be a non-empty list of model names or patterns (\"*\": all)")
    return ApiKey(str(name), digest, tuple(models))


def api_keys(source: str) -> Reloading[ApiKeys]:
    """The keys of ``source`` (a file, read again when it changes, or ``env:NAME``)."""
    if source.startswith("env:"):
        name = source[4:]
        text = os.environ.get(name)
        if text is None:
            raise SecurityConfigError(f"the environment variable {name} (API keys) is not set")
        return Reloading(f"API keys from ${name}", (), lambda: ApiKeys.parse(text, f"${name}"))
    path = Path(source)
    return Reloading(f"API keys {path}", (path,),
                     lambda: ApiKeys.parse(_read(path, "API key file").decode("utf-8", "replace"), str(path)))


# -- the interceptor ------------------------------------------------------------------------------------
def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
    """The token of ``authorization: Bearer <token>``, or '' when there is none."""
    for name, value in metadata or ():
        if name == "authorization" and isinstance(value, str):
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer":
                return token.strip()
    return ""


def requested_model(request: object) -> str:
    """The model a GapService request names: its ``model``, or its embedded ``request.model``
    (ExplainStream, Expand); '' for none (ListModels) or an unparsable request (the guard refuses it)."""
    for message in (request, getattr(request, "request", None)):
        if isinstance(message, protobuf_message.Message) and "model" in message.DESCRIPTOR.fields_by_name:
            return message.model  # type: ignore[attr-defined]
    return ""


class AuthInterceptor(grpc.ServerInterceptor):
    """API-key authentication and per-model authorisation of gap.v1.GapService (module docstring)."""

    def __init__(self, keys: Reloading[ApiKeys], observer: Observer) -> None:
        self.keys = keys
        self.observer = observer

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(GAP_METHODS):
            return handler  # health, reflection; unknown methods stay UNIMPLEMENTED
        rpc = method[len(GAP_METHODS):]
        token = bearer_token(handler_call_details.invocation_metadata)
        key = self.keys.current().find(token) if token else None
        if key is None:
            reason = ("invalid API key" if token else
                      "missing credentials: send the metadata `authorization: Bearer <API key>`")
            return _like(handler, self._refusal(rpc, grpc.StatusCode.UNAUTHENTICATED, reason), deserializer=None)
        return _like(handler, self._authorised(rpc, key, handler.unary_stream or handler.unary_unary),
                     handler.request_deserializer)

    def _refusal(self, rpc: str, code: grpc.StatusCode, reason: str):
        def refuse(request: object, context: grpc.ServicerContext):
            self._refuse(rpc, code, reason, context, time.perf_counter())

        return refuse

    def _refuse(self, rpc: str, code: grpc.StatusCode, reason: str, context: grpc.ServicerContext, started: float):
        self.observer.finished(CallRecord(rpc, code=code.name, started=started), time.perf_counter() - started)
        context.abort(code, reason)

    def _authorised(self, rpc: str, key: ApiKey, behaviour: Callable[[Any, grpc.ServicerContext], Any]):
        def call(request: object, context: grpc.ServicerContext):
            started = time.perf_counter()
            model = requested_model(request)
            if model and not key.may_use(model):
                self._refuse(rpc, grpc.StatusCode.PERMISSION_DENIED,
                             "this API key may not use that model (see ListModels for the ones it may)", context, started)
            response = behaviour(request, context)
            if rpc == "ListModels" and not key.unrestricted:
                visible = [m for m in response.models if key.may_use(m.name)]
                del response.models[:]
                response.models.extend(visible)
            return response

        return call


def _like(handler: grpc.RpcMethodHandler, behaviour, deserializer) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` (GapService has unary and server-streaming RPCs)."""
    if handler.request_streaming:
        raise TypeError("GapService has no client-streaming RPCs")
    make = grpc.unary_stream_rpc_method_handler if handler.response_streaming else grpc.unary_unary_rpc_method_handler
    return make(behaviour, request_deserializer=deserializer, response_serializer=handler.response_serializer)
