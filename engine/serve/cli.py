"""``python -m engine.serve ENGINE_DIR [options]``: parse, bind, load, then serve (:mod:`.server`).

Parsing comes before any heavy import, so ``--help`` and usage errors answer at once. Startup: the
options are checked and the port is bound before the engine is loaded (a taken port or a bad
``--host`` is reported at once, not after a long load), so a bad ENGINE_DIR, option or address ends
with one line on stderr naming it, and exit status 2. Then the HTTP server starts and the worker
warms the engine up (``GET /health`` answers 503 until it is ready).
"""
from __future__ import annotations

import argparse
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .. import shell
from ..choices import COMPUTE_DTYPES

if TYPE_CHECKING:
    from .app import Settings

PROG = "engine.serve"
MAX_KEY_BYTES = 4096  # an API key file's first line; a key is a header value, not a document
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive integer")
    return n


def _seconds(value: str) -> float:
    try:
        t = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not 0 < t < float("inf"):
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive number of seconds")
    return t


def _port(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number") from None
    if not 0 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number (0-65535; 0 picks a free one)")
    return n


def parser() -> argparse.ArgumentParser:
    p = shell.Parser(name=PROG, prog=f"python -m {PROG}", description="Serve embeddings from a converted engine directory over "
                "HTTP: OpenAI's POST /v1/embeddings and text-embeddings-inference's POST /embed, with "
                "token-budget batching of concurrent requests.")
    p.add_argument("engine_dir", metavar="ENGINE_DIR", type=Path, help="a directory written by converters.hf2engine")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_port, default=8080, help="port (default 8080)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--dtype", choices=COMPUTE_DTYPES, default="auto", help="compute dtype (auto: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--max-batch-tokens", type=_positive, default=16384, help="tokens per forward (default 16384)")
    p.add_argument("--max-batch-size", type=_positive, default=256, help="inputs per forward (default 256)")
    p.add_argument("--max-queue-tokens", type=_positive, default=262144,
                   help="tokens waiting for a forward before new requests get 429 (default 262144)")
    p.add_argument("--max-input-length", type=_positive, default=None,
                   help="tokens per input (default: the engine's max_length)")
    p.add_argument("--max-client-batch-size", type=_positive, default=2048,
                   help="inputs per request, more get 413 (default 2048, OpenAI's limit)")
    p.add_argument("--max-input-chars", type=_positive, default=None,
                   help="characters per input, instruction and prompt included, more get 413 "
                        "(default: 32 per token of the input length)")
    p.add_argument("--max-request-chars", type=_positive, default=None,
                   help="characters per request, more get 413 (default: 16 per token of --max-queue-tokens)")
    conn = p.add_argument_group("connections (see docs/serving.md)")
    conn.add_argument("--max-connections", type=_positive, default=1024,
                      help="open connections before new requests get 503 (default 1024)")
    conn.add_argument("--read-timeout", type=_seconds, default=30.0, metavar="SECONDS",
                      help="time for a request's headers and body to arrive, from its first byte (a new connection: "
                           "from opening), before 408 and close (default 30)")
    conn.add_argument("--graceful-timeout", type=_seconds, default=30.0, metavar="SECONDS",
                      help="on SIGTERM, time to finish the accepted requests before every connection is closed "
                           "(default 30)")
    key = p.add_mutually_exclusive_group()
    key.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on the API endpoints")
    key.add_argument("--api-key-file", type=Path, help="read the API key from this file (first line)")
    p.add_argument("--served-model-name", help="the model name clients send (default: ENGINE_DIR's name)")
    p.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="default info; debug also logs every request")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    launched = time.monotonic()
    args = shell.parse(parser(), argv)
    if isinstance(args, int):
        return args
    args.launched = launched
    try:
        with shell.signals_interrupt():  # Ctrl-C while loading: 130, as for every command
            api_key = _api_key(args)
            sock = _bind(args.host, args.port)
            try:
                engine = _load(args)
            except BaseException:  # a load error or an interrupt: the port is free again at once
                sock.close()
                raise
    except (OSError, ValueError, TypeError) as exc:  # FormatError and ConfigError are ValueErrors
        return shell.fail(PROG, exc)
    except KeyboardInterrupt as exc:
        print(f"{PROG}: interrupted by {shell.signal_name(exc)} while starting; nothing was served", file=sys.stderr)
        return shell.exit_code(exc)
    from .server import serve

    return serve(engine, sock, args, api_key)


def settings(args: argparse.Namespace, api_key: str | None) -> Settings:
    """The app's settings from the options: the one place that maps each option to its setting."""
    from .app import Settings, request_bytes_limit

    return Settings(served_model_name=args.served_model_name or args.engine_dir.resolve().name,
                    max_batch_tokens=args.max_batch_tokens, max_batch_size=args.max_batch_size,
                    max_queue_tokens=args.max_queue_tokens, max_request_bytes=request_bytes_limit(args.max_queue_tokens),
                    max_client_batch_size=args.max_client_batch_size, max_input_chars=args.max_input_chars,
                    max_request_chars=args.max_request_chars, api_key=api_key)


def _api_key(args: argparse.Namespace) -> str | None:
    """The key of ``--api-key`` or the first line of ``--api-key-file``, stripped; every error names
    the option (and the file)."""
    if args.api_key_file is not None:
        option, key = f"--api-key-file {args.api_key_file}", _key_file_line(args.api_key_file)
        if not key:
            raise ValueError(f"{option}: the file holds no key")
    elif args.api_key is not None:
        option, key = "--api-key", args.api_key.strip()
        if not key:
            raise ValueError(f"{option}: the key is empty")
    else:
        return None
    # A client sends the key in an HTTP header: anything else could never match.
    bad = next((c for c in key if not " " <= c <= "~"), None)
    if bad is not None:
        raise ValueError(f"{option}: the key must be printable ASCII (clients send it in an HTTP header); "
                         f"it holds {bad!r}")
    return key


def _key_file_line(path: Path) -> str:
    """The first line of ``path``, stripped; read bounded, so that a device or a huge file cannot hang
    the start."""
    try:
        with path.open("rb") as f:
            line = f.readline(MAX_KEY_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"--api-key-file {path}: {exc.strerror or exc}") from None
    if len(line) > MAX_KEY_BYTES:
        raise ValueError(f"--api-key-file {path}: the first line is longer than {MAX_KEY_BYTES} bytes; "
                         "expected a file holding the key")
    try:
        return line.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise ValueError(f"--api-key-file {path}: not a text file (byte {line[exc.start]:#04x} at offset "
                         f"{exc.start} is not UTF-8)") from None


def _load(args: argparse.Namespace) -> Any:
    """The engine, loaded in this (the main) thread with a single intra-op thread: the forwards run on
    the scheduler's worker thread, and once a thread has run a parallel torch op its OpenMP team stays;
    on a CPU a second team left here made every forward of the worker ~15% slower (measured: 83 ms
    against 72 ms for a 110-token input of a 4-layer 1024-wide model on 2 cores)."""
    import torch

    from ..encoder import Engine

    if not args.engine_dir.is_dir():
        raise ValueError(f"{args.engine_dir}: not a directory (expected an engine directory from converters.hf2engine)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return Engine.from_pretrained(args.engine_dir, device=args.device, dtype=args.dtype,
                                      max_length=args.max_input_length)
    finally:
        torch.set_num_threads(threads)


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound now so that a taken port is a startup error, not a log line."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except UnicodeError:  # the IDNA codec: an empty or over-long label ("a..b")
        raise ValueError(f"--host {host!r}: not a valid host name") from None
    except OSError as exc:  # socket.gaierror
        raise ValueError(f"--host {host!r}: not an address of this machine ({exc.strerror or exc})") from None
    family, kind, proto, _, address = infos[0]
    sock = None
    try:
        sock = socket.socket(family, kind, proto)  # fails where the address family is off (IPv6, say)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        if sock is not None:
            sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock
