"""Running the server: uvicorn over the app, the worker's warm-up, and a drain on SIGTERM/SIGINT.

Shutdown: the first SIGTERM or SIGINT stops accepting (the listening socket closes, ``/health`` and
new requests get 503), every request already accepted is finished, and the process exits 0 within
``--graceful-timeout`` seconds whatever the clients do: a connection still sending its request then is
closed (it was never accepted). A second SIGINT forces the exit. uvicorn re-raises the caught signal after its graceful shutdown, so that with
the default disposition the process would die by the signal; installing our own handlers first,
which uvicorn restores before re-raising, turns that final re-raise into a no-op.
"""
from __future__ import annotations

import argparse
import functools
import logging
import signal
import socket
import sys
import time
from typing import Any, Callable

import uvicorn

from .. import shell
from .cli import PROG
from .connections import BoundedHttpToolsProtocol


def serve(engine: Any, sock: socket.socket, args: argparse.Namespace, api_key: str | None) -> int:
    from .app import create_app
    from .cli import settings as settings_of

    logging.basicConfig(level=logging.DEBUG if args.log_level == "trace" else args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = settings_of(args, api_key)
    name = settings.served_model_name
    app = create_app(engine, settings)
    service = app.state.service
    host, port = sock.getsockname()[:2]
    # httptools with bounded headers and a read deadline, bounded connections, a bounded drain: see .connections.
    config = uvicorn.Config(app, log_level=args.log_level, access_log=args.log_level in ("debug", "trace"),
                            lifespan="on", timeout_keep_alive=30,
                            http=functools.partial(BoundedHttpToolsProtocol, read_timeout=args.read_timeout),
                            limit_concurrency=args.max_connections, timeout_graceful_shutdown=args.graceful_timeout)
    server = _Server(config, on_signal=lambda: setattr(service, "draining", True))
    failure: list[BaseException] = []

    def warmup_failed(exc: BaseException) -> None:
        failure.append(exc)
        server.should_exit = True

    service.scheduler.on_failure = warmup_failed
    log = logging.getLogger("engine.serve")
    service.scheduler.on_ready = lambda seconds: log.info(
        "ready: warm-up %.1f s, %.1f s after launch", seconds, time.monotonic() - args.launched)
    log.info("serving %r (%r) on http://%s:%d; warming up", name, engine, host, port)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _after_drain)
    server.run(sockets=[sock])
    if failure:
        print(f"{PROG}: error: warm-up failed: {shell.error_line(failure[0])}", file=sys.stderr)
        return 1
    return 0


def _after_drain(sig: int, frame: Any) -> None:
    """What the signal does once uvicorn has drained and re-raises it: nothing; main returns 0."""


class _Server(uvicorn.Server):
    """uvicorn's server, telling the app to refuse new requests as soon as the first signal lands."""

    def __init__(self, config: uvicorn.Config, on_signal: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_signal = on_signal

    def handle_exit(self, sig: int, frame: Any) -> None:
        self._on_signal()
        super().handle_exit(sig, frame)
