"""The HTTP edge of the server, in front of the application: API-key check, body size limit counted as the
bytes arrive (chunked bodies too), a body timeout, one access-log line per request, and a uvicorn protocol
that closes connections whose request headers do not arrive in time (uvicorn has no such setting)."""
from __future__ import annotations

import asyncio
import hmac
import logging
import time

from uvicorn.protocols.http.h11_impl import H11Protocol

from monovl.serve.protocol import error_response

access_log = logging.getLogger("monovl.serve.access")


class _Refused(Exception):
    def __init__(self, status: int, message: str, code: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers


class Gate:
    """A plain ASGI middleware (Starlette's BaseHTTPMiddleware would hide client disconnects from the
    endpoints). In this order: the API key of /v1/ paths (before the body is read or validated), a declared
    Content-Length over `limit` (413 before reading), then the body as it arrives, counted: past `limit` bytes
    413, no data for `body_timeout` seconds 408. The application gets the body only once it is whole.
    `errors` is a Prometheus counter labelled by status code."""

    def __init__(self, app, *, limit: int, body_timeout: float, api_key: str | None, errors):
        self.app, self.limit, self.body_timeout, self.api_key, self.errors = app, limit, body_timeout, api_key, errors

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.monotonic(), []
        scope.setdefault("state", {})

        async def send_logged(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            self._check_head(scope)
            body = await self._read_body(receive)
            if body is None:  # the client went away while sending
                status.append(499)
                return
            await self.app(scope, _replay(body, receive), send_logged)
        except _Refused as e:
            self.errors.labels(str(e.status)).inc()
            await error_response(e.status, e.message, e.code, headers=e.headers)(scope, receive, send_logged)
        finally:
            _log_access(scope, status[0] if status else 500, started)

    def _check_head(self, scope) -> None:
        headers = dict(scope.get("headers", ()))
        if self.api_key is not None and scope["path"].startswith("/v1/"):
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
                raise _Refused(401, "missing or invalid API key (send 'Authorization: Bearer KEY')", "invalid_api_key",
                               {"WWW-Authenticate": "Bearer"})
        size = headers.get(b"content-length")
        if size is not None and (not size.isdigit() or int(size) > self.limit):
            raise _Refused(413, f"request body of {size.decode('latin-1')} bytes exceeds the limit of {self.limit} "
                                "bytes", "request_too_large")

    async def _read_body(self, receive) -> bytes | None:
        chunks, seen = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout)
            except TimeoutError:
                raise _Refused(408, f"no request body data for {self.body_timeout:g} s", "request_timeout") from None
            if message["type"] != "http.request":
                return None
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.limit:
                raise _Refused(413, f"request body exceeds the limit of {self.limit} bytes", "request_too_large")
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive):
    """An ASGI receive that hands over the whole body once, then the client's later messages (disconnects)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed():
        return pending.pop() if pending else await receive()
    return replayed


def _log_access(scope, status: int, started: float) -> None:
    """One line per request, as uvicorn's access log plus the completion tokens and the latency."""
    if not access_log.isEnabledFor(logging.INFO):
        return
    client = scope.get("client")
    who = f"{client[0]}:{client[1]}" if client else "-"
    path = scope.get("path", "") + ("?" + scope["query_string"].decode("latin-1") if scope.get("query_string") else "")
    run = scope.get("state", {}).get("run")
    tokens = run.completion_tokens if run is not None else 0
    access_log.info('%s - "%s %s HTTP/%s" %d tokens=%d latency=%.3fs', who, scope.get("method", "-"), path,
                    scope.get("http_version", "1.1"), status, tokens, time.monotonic() - started)


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol, closing (408) a connection whose request line and headers have not all arrived
    `header_timeout` seconds after it opened or after its previous response (slow-header clients)."""

    header_timeout = 10.0
    _timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.cycle is not None and not self.cycle.response_complete:  # a request's head has arrived
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._timer = self.loop.call_later(self.header_timeout, self._headers_late)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _headers_late(self) -> None:
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return
        self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        self.transport.close()


def protocol_with_header_timeout(seconds: float) -> type[H11Protocol]:
    """The protocol class to pass as uvicorn's `http=`, with its header timeout set."""
    return type("HeaderTimeoutH11Protocol", (HeaderTimeoutProtocol,), {"header_timeout": seconds})
