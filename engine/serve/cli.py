"""``python -m engine.serve ENGINE_DIR [options]``: parse, load, bind, then serve (:mod:`.server`).

Parsing comes before any heavy import, so ``--help`` and usage errors answer at once. Startup: the options are checked, the engine is loaded and the port is bound before anything is
served, so a bad ENGINE_DIR, option or address ends with one line on stderr and exit status 2. Then
the HTTP server starts and the worker warms the engine up (``GET /health`` answers 503 until it is
ready).
"""
from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path
from typing import Any, Sequence

from .. import shell
from ..choices import COMPUTE_DTYPES

PROG = "engine.serve"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive integer")
    return n


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
    key = p.add_mutually_exclusive_group()
    key.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on the API endpoints")
    key.add_argument("--api-key-file", type=Path, help="read the API key from this file (first line)")
    p.add_argument("--served-model-name", help="the model name clients send (default: ENGINE_DIR's name)")
    p.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="default info; debug also logs every request")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = shell.parse(parser(), argv)
    if isinstance(args, int):
        return args
    try:
        with shell.signals_interrupt():  # Ctrl-C while loading: 130, as for every command
            api_key = _api_key(args)
            engine = _load(args)
            sock = _bind(args.host, args.port)
    except (OSError, ValueError, TypeError) as exc:  # FormatError and ConfigError are ValueErrors
        return shell.fail(PROG, exc)
    except KeyboardInterrupt as exc:
        print(f"{PROG}: interrupted by {shell.signal_name(exc)} while starting; nothing was served", file=sys.stderr)
        return shell.exit_code(exc)
    from .server import serve

    return serve(engine, sock, args, api_key)


def _api_key(args: argparse.Namespace) -> str | None:
    if args.api_key_file is not None:
        lines = args.api_key_file.read_text(encoding="utf-8").splitlines()
        key = lines[0].strip() if lines else ""
        if not key:
            raise ValueError(f"--api-key-file {args.api_key_file}: the file holds no key")
        return key
    if args.api_key is not None and not args.api_key.strip():
        raise ValueError("--api-key: the key is empty")
    return None if args.api_key is None else args.api_key.strip()


def _load(args: argparse.Namespace) -> Any:
    from ..encoder import Engine

    if not args.engine_dir.is_dir():
        raise ValueError(f"{args.engine_dir}: not a directory (expected an engine directory from converters.hf2engine)")
    return Engine.from_pretrained(args.engine_dir, device=args.device, dtype=args.dtype, max_length=args.max_input_length)


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound now so that a taken port is a startup error, not a log line."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock
