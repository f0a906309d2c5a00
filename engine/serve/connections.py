"""What one client connection may cost the server: bounded header size and time to send a request.

uvicorn's default HTTP protocol (httptools) parsed a 100 MB header line (19.7 s of the event loop,
super-linear, stalling every client) and accepted a 200 MB one, and no uvicorn protocol times out a
request that never finishes arriving: a connection that sent half its headers stayed open for good,
and one that stalled mid-body kept a graceful shutdown waiting forever. So the server runs uvicorn's
h11 protocol, which refuses a header block above ``MAX_HEADER_BYTES`` with 400 as soon as it is
exceeded, with one addition, :class:`BoundedH11Protocol`: a request (headers and body) must arrive
within ``read_timeout`` seconds of its first byte, and a new connection must start one within the same
time; otherwise the server answers 408 and closes the connection. A request that has fully arrived
is never cut: its forward may take as long as it takes. The number of open connections is bounded
by uvicorn's ``limit_concurrency`` (503 beyond it), and a graceful shutdown by its
``timeout_graceful_shutdown`` (see :mod:`engine.serve.server`).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .protocol import error_body

log = logging.getLogger("engine.serve")

MAX_HEADER_BYTES = 32 * 1024  # the request line and headers together; browsers send a few KiB
_TIMEOUT_HEAD = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                 b"content-length: %d\r\n\r\n")


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on receiving each request (see the module docstring).

    The deadline is armed when a connection opens and when the first bytes of a request arrive after
    the previous response; it is dropped when the response completes. When it fires, the connection
    is closed with 408 if the request is still arriving (headers incomplete, or the body still being
    sent), and left alone if the request is being processed."""

    def __init__(self, *args: Any, read_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.read_timeout = read_timeout
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._deadline is None and self._between_requests():
            self._arm()  # the first bytes of the next request on a kept-alive connection
        super().data_received(data)

    def on_response_complete(self) -> None:
        self._disarm()
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _between_requests(self) -> bool:
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
        if not headers_pending and self.conn.their_state is not h11.SEND_BODY:
            return  # the request has arrived: it is being answered
        what = "headers" if headers_pending else "body"
        log.info("closing a connection from %s: the request %s did not arrive within %g s",
                 self.client, what, self.read_timeout)
        if headers_pending or not self.cycle.response_started:
            body = error_body(408, f"the request {what} did not arrive within {self.read_timeout:g} s",
                              code="request_timeout")
            self.transport.write(_TIMEOUT_HEAD % len(body) + body)
        self.transport.close()
