"""A real ``python -m engine.serve`` in a subprocess on 127.0.0.1, and the tiny engine it serves.

``Server`` picks a free loopback port, starts the command, waits for ``GET /health`` to answer 200
and is always stopped (SIGTERM, then SIGKILL after a grace period) by the fixture that owns it.
The server runs with one torch thread: the test process that drives it shares the same two cores.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx

from converters.convert import convert
from converters.tiny_models import save_tiny_checkpoint

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 300  # seconds: imports take ~15 s on an idle machine, far more when it is shared
STOP_TIMEOUT = 60


def build_engine(root: Path) -> Path:
    """The tiny Llama-family engine every server test uses (hidden 64, one layer, vocab 384): the
    server's job is to reproduce ``Engine.encode``, whatever the depth, and a forward is cheap."""
    src = save_tiny_checkpoint(root / "hf", "llama", num_layers=1)
    return convert(src, root / "tiny-llama", quiet=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, engine_dir: Path, *args: str, log_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"server-{self.port}.log"
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   OMP_NUM_THREADS="1")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "engine.serve", str(engine_dir), "--host", "127.0.0.1", "--port", str(self.port),
             *args],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=str(REPO), env=env,
        )

    def wait_ready(self, timeout: float = START_TIMEOUT) -> "Server":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"the server was not ready within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-4000:]

    def rss_bytes(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)[1]) * 1024

    def stop(self) -> int:
        """SIGTERM, wait, SIGKILL if it hangs; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)
        self._log.close()
        return self.proc.returncode


@contextmanager
def running(servers: dict[str, Server]) -> Iterator[dict[str, Server]]:
    """``servers``, started together (their imports overlap), each ready; every one is stopped on exit."""
    try:
        for srv in servers.values():
            srv.wait_ready()
        yield servers
    finally:
        for srv in servers.values():
            srv.stop()


def metric(text: str, name: str, labels: str = "") -> float:
    """One sample from Prometheus text: ``name{labels} value`` (labels as printed, or none)."""
    pattern = "^" + re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "") + r" (\S+)$"
    match = re.search(pattern, text, re.M)
    if match is None:
        raise AssertionError(f"no sample {name}{{{labels}}} in /metrics")
    return float(match[1])
