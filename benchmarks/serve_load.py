"""Helpers for the serving benchmark: a server subprocess, a lean closed-loop HTTP load generator,
and the per-stage means read from the server's Prometheus histograms.

The load generator speaks HTTP/1.1 over asyncio streams with keep-alive, one connection per client,
each client sending its next request when the previous answer is complete. It is hand-written on
purpose: the client shares the machine with the server, and a full HTTP client library costs several
times more CPU per request, which would be charged to the server under test.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import httpx

REPO = Path(__file__).resolve().parents[1]
STAGES = ("parse", "tokenize", "queue", "inference", "serialize")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m engine.serve`` on a free loopback port; ``stop()`` always ends it."""

    def __init__(self, engine_dir: Path, *args: str, threads: int, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   OMP_NUM_THREADS=str(threads))
        self._log = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "engine.serve", str(engine_dir), "--port", str(self.port), *args],
                                     stdout=self._log, stderr=subprocess.STDOUT, cwd=str(REPO), env=env)

    def wait_ready(self, timeout: float = 600, poll: float = 0.25) -> "ServerProcess":
        """Return once ``GET /health`` answers 200, polled every ``poll`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(poll)
        raise RuntimeError("server not ready in time")

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics", timeout=30).text

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(60)
        self._log.close()


@dataclass
class LoadResult:
    requests: int
    seconds: float
    latencies: list[float]  # seconds, one per measured request
    tokens: int

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def request_bytes(port: int, path: str, body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes) -> int:
    writer.write(payload)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = int(re.search(rb"(?i)content-length: (\d+)", head)[1])
    await reader.readexactly(length)
    return status


def run_load(port: int, payloads: list[tuple[bytes, int]], clients: int, warmup_s: float, measure_s: float,
             stop: Callable[[], bool] | None = None) -> LoadResult:
    """``clients`` closed-loop clients cycle through ``payloads`` ((request bytes, tokens) pairs) for
    ``warmup_s`` then ``measure_s`` seconds, or until ``stop()`` says so; the requests that finish
    inside the measured window count. Any status but 200 raises."""

    async def main() -> LoadResult:
        start = time.perf_counter()
        t0, t1 = start + warmup_s, start + warmup_s + measure_s
        latencies: list[float] = []
        tokens = 0

        async def client(k: int) -> None:
            nonlocal tokens
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            i = k
            try:
                while True:
                    payload, n_tokens = payloads[i % len(payloads)]
                    i += clients
                    sent = time.perf_counter()
                    if sent >= t1 or (stop is not None and stop()):
                        return
                    status = await _exchange(reader, writer, payload)
                    done = time.perf_counter()
                    if status != 200:
                        raise RuntimeError(f"status {status}")
                    if t0 <= done <= t1:
                        latencies.append(done - sent)
                        tokens += n_tokens
            finally:
                writer.close()

        await asyncio.gather(*(client(k) for k in range(clients)))
        return LoadResult(len(latencies), measure_s, latencies, tokens)

    return asyncio.run(main())


def sample(text: str, name: str, default: float = float("nan")) -> float:
    """One sample of Prometheus text, ``name`` with its labels as printed (``default`` when absent)."""
    match = re.search("^" + re.escape(name) + r" (\S+)$", text, re.M)
    return float(match[1]) if match else default


def stage_means(before: str, after: str) -> dict[str, float]:
    """Mean per request of each stage's seconds (``request``: the whole embeddings request as the HTTP
    layer sees it; ``forward``: per forward; ``batch_inputs``/``batch_requests``: per forward) between
    two scrapes of /metrics."""
    names = {s: f"engine_request_{s}_seconds" for s in STAGES}
    names.update(request='engine_request_duration_seconds{endpoint="/v1/embeddings"}',
                 forward="engine_forward_seconds", batch_inputs="engine_batch_inputs",
                 batch_requests="engine_batch_requests")
    out = {}
    for key, name in names.items():
        base, _, labels = name.partition("{")
        labels = "{" + labels if labels else ""

        def total(text: str, suffix: str) -> float:  # absent: nothing observed yet
            return sample(text, base + suffix + labels, default=0.0)

        count = total(after, "_count") - total(before, "_count")
        out[key] = (total(after, "_sum") - total(before, "_sum")) / count if count else float("nan")
    return out
