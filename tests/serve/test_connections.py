"""What one connection may cost the server (engine/serve/connections.py), on real servers over raw
sockets: an oversized header block is refused at once, a request that never finishes arriving is
answered 408 and closed, connections beyond ``--max-connections`` get 503, and SIGTERM ends the server
within ``--graceful-timeout`` whatever a stalled client does, answering the requests it accepted.

Three servers start together (their imports overlap) and are always stopped:
- ``tight``: ``--read-timeout 1``;
- ``few``: ``--max-connections 4`` (and a long read timeout, so idle connections stay open);
- ``shut``: ``--graceful-timeout 8`` and a long read timeout, so that only the grace period can end a
  stalled upload; ``--max-batch-size 1`` makes an accepted request take many forwards.
"""
from __future__ import annotations

import socket
import threading
import time

import httpx
import numpy as np
import pytest

from converters.tiny_models import sample_sentences
from engine import Engine
from engine.serve.connections import MAX_HEADER_BYTES

from ._server import Server, build_engine, running

WAIT = 60  # seconds: the bound on any wait below (a hang fails the test instead of the suite)


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    return build_engine(tmp_path_factory.mktemp("serve-engine"))


@pytest.fixture(scope="module")
def servers(engine_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("serve-logs")
    started = {
        "tight": Server(engine_dir, "--read-timeout", "1", log_dir=logs),
        "few": Server(engine_dir, "--max-connections", "4", "--read-timeout", "300", log_dir=logs),
        "shut": Server(engine_dir, "--graceful-timeout", "8", "--read-timeout", "300", "--max-batch-size", "1",
                       log_dir=logs),
    }
    with running(started):
        yield started


def connect(srv: Server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=WAIT)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (bounded by the socket's timeout)."""
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def request_head(path: str = "/embed", length: int | None = None) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    if length is not None:
        head += f"Content-Length: {length}\r\n"
    return (head + "\r\n").encode()


def healthy(srv: Server) -> bool:
    return httpx.get(srv.url + "/health", timeout=WAIT).status_code == 200


def test_an_oversized_header_block_is_refused_at_once(servers):
    srv = servers["tight"]
    with connect(srv) as sock:  # just over the limit: the server reads it all, answers 431 and closes
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * MAX_HEADER_BYTES)
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 431 ") and b'"code":"headers_too_large"' in answer, answer[:300]
    with connect(srv) as sock:  # 64 MiB of header: the connection is closed long before it is all sent
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            for _ in range(1024):
                sock.sendall(b"a" * (64 * 1024))
    assert healthy(srv)


def test_a_connection_that_sends_half_its_headers_gets_408_and_is_closed(servers):
    srv = servers["tight"]
    with connect(srv) as silent, connect(srv) as half:
        half.sendall(b"POST /embed HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the rest
        assert healthy(srv), "other clients are served meanwhile"
        for sock in (half, silent):
            answer = read_until_closed(sock)
            assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
            assert b'"code":"request_timeout"' in answer and b"headers" in answer


def test_a_stalled_body_gets_408_and_a_complete_request_is_not_cut(servers):
    srv = servers["tight"]
    with connect(srv) as stalled:
        stalled.sendall(request_head(length=1000) + b'{"inputs": ["a')
        answer = read_until_closed(stalled)
    assert answer.startswith(b"HTTP/1.1 408 ") and b"body" in answer, answer[:300]
    # A request that arrives in time may take longer than the read timeout to answer: it is answered.
    texts = sample_sentences(300, seed=9, min_words=30, max_words=40)
    r = httpx.post(srv.url + "/embed", json={"inputs": texts}, timeout=WAIT)
    assert r.status_code == 200 and len(r.json()) == len(texts)


def test_connections_beyond_the_limit_get_503(servers):
    srv = servers["few"]
    idle = [connect(srv) for _ in range(4)]
    try:
        time.sleep(0.5)  # let the server register them
        with connect(srv) as extra:
            extra.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            answer = read_until_closed(extra)
        assert answer.startswith(b"HTTP/1.1 503 "), answer[:200]
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + WAIT
    while not healthy(srv):  # the limit frees as the idle connections close
        assert time.monotonic() < deadline, "the server did not recover after the idle connections closed"
        time.sleep(0.1)


def test_sigterm_ends_the_server_within_the_grace_period_despite_a_stalled_upload(servers, engine_dir):
    """A client stalls mid-body, another's request is accepted and takes many forwards: SIGTERM
    answers the accepted request, closes the stalled one after the grace period, and exits 0."""
    srv = servers["shut"]
    texts = sample_sentences(300, seed=4)  # 300 forwards of one input: still queued when polled
    expected = Engine.from_pretrained(engine_dir).encode(texts, normalize=True).numpy()
    stalled = connect(srv)
    stalled.sendall(request_head(length=1000) + b'{"inputs": ["a')
    answers: list[httpx.Response] = []
    accepted = threading.Thread(target=lambda: answers.append(
        httpx.post(srv.url + "/embed", json={"inputs": texts}, timeout=WAIT)))
    accepted.start()
    deadline = time.monotonic() + WAIT
    while "engine_queue_requests 1.0" not in httpx.get(srv.url + "/metrics", timeout=WAIT).text:  # accepted
        assert time.monotonic() < deadline and accepted.is_alive(), "the request was never queued"
        time.sleep(0.02)
    srv.proc.send_signal(15)
    try:
        code = srv.proc.wait(WAIT)
    finally:
        stalled.close()
    accepted.join(WAIT)
    assert code == 0, srv.log()
    assert answers and answers[0].status_code == 200
    np.testing.assert_allclose(np.array(answers[0].json()), expected, atol=2e-6, rtol=0)
    assert "timeout graceful shutdown exceeded" in srv.log()
