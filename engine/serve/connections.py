"""What one client connection may cost the server: a bounded header block and a bounded time to send
a request.

uvicorn's fast HTTP protocol (httptools) parsed a 100 MB header line (19.7 s of the event loop,
super-linear, stalling every client) and accepted a 200 MB one, and no uvicorn protocol times out a
request that never finishes arriving: a connection that sent half its headers stayed open for good,
and one that stalled mid-body kept a graceful shutdown waiting forever. :class:`BoundedHttpToolsProtocol`
keeps httptools (with h11 the HTTP time per request at 64 clients was 21 ms against 13 ms:
benchmarks/RESULTS.md) and adds both bounds in front of it:

- a request's header block may hold at most ``MAX_HEADER_BYTES``: the bytes of a request whose
  headers are not complete are counted as they arrive, and past the limit the server answers 431 and
  closes the connection, so the parser never sees more than the limit plus one read;
- a request (headers and body) must arrive within ``read_timeout`` seconds of its first byte, and a
  new connection must start one within the same time; otherwise 408 and the connection is closed. A
  request that has fully arrived is never cut: its forward may take as long as it takes.

The number of open connections is bounded by uvicorn's ``limit_concurrency`` (503 beyond it), and a
graceful shutdown by its ``timeout_graceful_shutdown`` (see :mod:`engine.serve.server`).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .protocol import error_body

log = logging.getLogger("engine.serve")

MAX_HEADER_BYTES = 32 * 1024  # the request line and headers together; browsers send a few KiB
_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header-size limit and a deadline on receiving each request
    (see the module docstring).

    The deadline is armed when a connection opens and when the first bytes of a request arrive after
    the previous response; it is dropped when the response completes. When it fires, the connection
    is closed with 408 if the request is still arriving (headers incomplete, or the body still being
    sent), and left alone if the request is being processed."""

    def __init__(self, *args: Any, read_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.read_timeout = read_timeout
        self._deadline: asyncio.TimerHandle | None = None
        self._header_bytes = 0  # of the request whose headers are arriving

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._deadline is None and self._between_requests():
            self._arm()  # the first bytes of the next request on a kept-alive connection
        super().data_received(data)
        if self.transport.is_closing():
            return
        if not self._between_requests():
            self._header_bytes = 0  # the headers are complete: the rest is body
            return
        self._header_bytes += len(data)
        if self._header_bytes > MAX_HEADER_BYTES:
            log.info("closing a connection from %s: its request headers exceed %d bytes", self.client,
                     MAX_HEADER_BYTES)
            self._refuse(431, f"the request headers exceed {MAX_HEADER_BYTES} bytes", "headers_too_large")

    def on_response_complete(self) -> None:
        self._disarm()
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _between_requests(self) -> bool:
        """No request is in progress: the next one's headers have not all arrived."""
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.read_timeout, self._timed_out)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _timed_out(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        headers_pending = self._between_requests()
        if not headers_pending and not self.cycle.more_body:
            return  # the request has arrived: it is being answered
        what = "headers" if headers_pending else "body"
        log.info("closing a connection from %s: the request %s did not arrive within %g s", self.client, what,
                 self.read_timeout)
        if headers_pending or not self.cycle.response_started:
            self._refuse(408, f"the request {what} did not arrive within {self.read_timeout:g} s", "request_timeout")
        else:
            self.transport.close()

    def _refuse(self, status: int, message: str, code: str) -> None:
        """Answer ``status`` with an error body in the API's shape, and close the connection."""
        body = error_body(status, message, code=code)
        head = (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: %d\r\n\r\n"
                % (status, _REASONS[status], len(body)))
        self.transport.write(head + body)
        self.transport.close()
