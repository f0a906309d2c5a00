"""Overload, client disconnects and graceful shutdown, each on its own real server.

The three servers start together (their imports overlap) and are always stopped:
- ``over``: a small ``--max-queue-tokens``, so that 64 concurrent clients overflow it;
- ``drop`` and ``shut``: ``--max-batch-size 1``, so that a few hundred inputs take hundreds of
  forwards and a request can be caught while queued (a request's forwards must outlast the
  tokenisation of the next ones, also on an idle machine: with 8 inputs per forward the first
  request could finish before the third was queued).
"""
from __future__ import annotations

import asyncio
import json
import signal
import socket
import threading
import time

import httpx
import numpy as np
import pytest

from converters.tiny_models import sample_sentences
from engine import Engine

from ._server import Server, build_engine, metric, running

ATOL = 2e-6
QUEUE_LIMIT = 1000
WAIT = 120  # seconds for any condition polled below


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    return build_engine(tmp_path_factory.mktemp("serve-engine"))


@pytest.fixture(scope="module")
def engine(engine_dir):
    return Engine.from_pretrained(engine_dir)


@pytest.fixture(scope="module")
def servers(engine_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("serve-logs")
    started = {
        "over": Server(engine_dir, "--max-queue-tokens", str(QUEUE_LIMIT), log_dir=logs),
        "drop": Server(engine_dir, "--max-batch-size", "1", log_dir=logs),
        "shut": Server(engine_dir, "--max-batch-size", "1", log_dir=logs),
    }
    with running(started):
        yield started


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def scrape(srv: Server) -> str:
    return httpx.get(srv.url + "/metrics", timeout=30).text


# -- overload ---------------------------------------------------------------------------------------

async def _flood(url: str, bodies: list[dict], concurrency: int) -> list[tuple[dict, httpx.Response]]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as c:
        async def one(body):
            return body, await c.post("/embed", json=body)

        return await asyncio.gather(*(one(b) for b in bodies))


def test_overload_answers_429_at_once_and_recovers(servers, engine):
    srv = servers["over"]
    pool = sample_sentences(64, seed=3, min_words=20, max_words=30)
    expected = engine.encode(pool, normalize=True).numpy()
    bodies = [{"inputs": [pool[(6 * k + j) % 64] for j in range(6)]} for k in range(192)]  # ~240 tokens each
    results = asyncio.run(_flood(srv.url, bodies, concurrency=64))

    statuses = [r.status_code for _, r in results]
    assert set(statuses) <= {200, 429}, sorted(set(statuses))
    assert statuses.count(429) > 0 and statuses.count(200) > 0, "the flood overflowed the queue, and some got in"
    for body, r in results:
        if r.status_code == 200:
            rows = [pool.index(t) for t in body["inputs"]]
            np.testing.assert_allclose(np.array(r.json()), expected[rows], atol=ATOL, rtol=0)
        else:
            assert int(r.headers["retry-after"]) >= 1
            error = r.json()["error"]
            assert error["code"] == "queue_full" and error["type"] == "rate_limit_error"
    after = scrape(srv)
    assert metric(after, "engine_queue_tokens") == 0 and metric(after, "engine_queue_requests") == 0
    assert metric(after, "engine_requests_total", 'endpoint="/embed",status="429"') == statuses.count(429)
    assert httpx.get(srv.url + "/health", timeout=30).status_code == 200
    ok = httpx.post(srv.url + "/embed", json={"inputs": pool[:2]}, timeout=60)
    np.testing.assert_allclose(np.array(ok.json()), expected[:2], atol=ATOL, rtol=0)


def test_request_larger_than_the_queue_is_413(servers):
    srv = servers["over"]
    body = {"inputs": sample_sentences(80, seed=4, min_words=20, max_words=30)}  # > QUEUE_LIMIT tokens
    r = httpx.post(srv.url + "/embed", json=body, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert str(QUEUE_LIMIT) in r.json()["error"]["message"]


# -- client disconnects -----------------------------------------------------------------------------

def _raw_post(port: int, path: str, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return s


def test_disconnected_client_inputs_are_dropped(servers, engine):
    srv = servers["drop"]
    first = sample_sentences(400, seed=11, min_words=10, max_words=20)
    second = sample_sentences(200, seed=12, min_words=10, max_words=20)
    before = scrape(srv)
    answer = {}
    t = threading.Thread(target=lambda: answer.update(r=httpx.post(srv.url + "/embed", json={"inputs": first}, timeout=WAIT)))
    t.start()
    wait_for(lambda: metric(scrape(srv), "engine_queue_requests") >= 1, "the first request to be queued")
    s = _raw_post(srv.port, "/embed", {"inputs": second})
    wait_for(lambda: metric(scrape(srv), "engine_queue_requests") == 2, "the second request to be queued")
    s.close()
    wait_for(lambda: metric(scrape(srv), "engine_inputs_dropped_total") > 0, "the server to drop the second request")
    t.join(WAIT)
    assert answer["r"].status_code == 200
    np.testing.assert_allclose(np.array(answer["r"].json()), engine.encode(first, normalize=True).numpy(), atol=ATOL, rtol=0)
    wait_for(lambda: metric(scrape(srv), "engine_queue_tokens") == 0, "the queue to empty")
    after = scrape(srv)
    dropped = metric(after, "engine_inputs_dropped_total")
    embedded = metric(after, "engine_inputs_embedded_total") - metric(before, "engine_inputs_embedded_total")
    assert embedded == len(first) + len(second) - dropped, "dropped inputs are never computed"
    assert dropped > len(second) // 2, f"only {dropped} of the gone client's {len(second)} inputs were dropped"
    assert metric(after, "engine_requests_total", 'endpoint="/embed",status="499"') == 1
    assert httpx.get(srv.url + "/health", timeout=30).status_code == 200


# -- graceful shutdown ------------------------------------------------------------------------------

def test_sigterm_finishes_accepted_requests_refuses_new_ones_and_exits_0(servers, engine):
    srv = servers["shut"]
    batches = [sample_sentences(200, seed=20 + k, min_words=10, max_words=20) for k in range(3)]
    answers: dict[int, httpx.Response] = {}

    def send(k: int) -> None:
        answers[k] = httpx.post(srv.url + "/embed", json={"inputs": batches[k]}, timeout=WAIT)

    threads = [threading.Thread(target=send, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    wait_for(lambda: metric(scrape(srv), "engine_queue_requests") == 3, "three requests in the queue")
    srv.proc.send_signal(signal.SIGTERM)
    refused = None
    deadline = time.monotonic() + WAIT
    while refused is None and time.monotonic() < deadline:
        try:
            r = httpx.post(srv.url + "/embed", json={"inputs": ["late"]}, timeout=30)
            assert r.status_code == 503, r.text  # in the instant before the listener closes
        except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
            refused = True  # the listener is closed, or the connection was closed unanswered
        time.sleep(0.05)
    assert refused, "new connections are refused once shutdown starts"
    for t in threads:
        t.join(WAIT)
    for k in range(3):
        assert answers[k].status_code == 200
        np.testing.assert_allclose(np.array(answers[k].json()), engine.encode(batches[k], normalize=True).numpy(),
                                   atol=ATOL, rtol=0)
    assert srv.proc.wait(WAIT) == 0, srv.log()
    log = srv.log()
    assert "Waiting for connections to close" in log, "the requests were still in flight at SIGTERM"
    assert "Traceback" not in log
