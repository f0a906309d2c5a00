"""A private local Ray instance for tests and benchmarks, robust on a loaded machine.

Ray 2.60's raylet waits a fixed 15 s for port files that its Python agents write once they have
imported everything; on a machine whose two cores are shared with other test runs those imports
take longer, and the raylet aborts ("Timed out waiting for file .../metrics_agent_port_...",
seen here with ``ray.init()``), and gives the runtime-env agent 30 s to answer. So the head is started with ``ray start --head --block`` and every
port fixed (the raylet then skips those waits), except the dashboard agent's HTTP listen port,
which the raylet always waits for: this head has no dashboard, so that port is announced as -1
(what an agent without its HTTP server writes) as soon as the session directory exists. The head
runs as our own child process, in its own session, and is stopped by its pid (never with
``ray stop``, which would stop every Ray instance on the machine). The runtime-env agent's
budget is raised with ``RAY_agent_register_timeout_ms``.
"""
from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _announce_no_http(temp: Path, node_id: str) -> bool:
    """Write the dashboard agent's listen port as -1 into the new session directory (atomically:
    the raylet polls the file). False while the session directory does not exist yet."""
    sessions = [p for p in temp.glob("session_2*") if p.is_dir()]
    if not sessions:
        return False
    target = sessions[0] / f"dashboard_agent_listen_port_{node_id}"
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text("-1")
    os.replace(tmp, target)
    return True


class LocalRay:
    """``with LocalRay(num_cpus=2) as ray_address:`` a head node of our own, and this process
    connected to it (``ray.init``) with this checkout on the workers' PYTHONPATH."""

    def __init__(self, num_cpus: int = 2, object_store_mb: int = 96, timeout: float = 240.0) -> None:
        self.num_cpus, self.object_store_mb, self.timeout = num_cpus, object_store_mb, timeout
        self.proc: subprocess.Popen | None = None
        self.temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths are length-limited

    def __enter__(self) -> str:
        import ray

        gcs, *ports = _free_ports(7)
        names = ["--node-manager-port", "--object-manager-port", "--metrics-export-port",
                 "--dashboard-agent-grpc-port", "--dashboard-agent-listen-port", "--runtime-env-agent-port"]
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={gcs}",
               f"--num-cpus={self.num_cpus}", "--num-gpus=0",
               f"--object-store-memory={self.object_store_mb * 1024 * 1024}", "--include-dashboard=false",
               "--disable-usage-stats", f"--temp-dir={self.temp}"]
        cmd += [f"{name}={port}" for name, port in zip(names, ports)]
        # A private instance: no token authentication (the driver must agree).
        os.environ["RAY_AUTH_MODE"] = "disabled"
        node_id = secrets.token_hex(28)
        # The raylet gives the runtime-env agent agent_register_timeout_ms (30 s) to answer.
        env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_OVERRIDE_NODE_ID_FOR_TESTING=node_id,
                   RAY_agent_register_timeout_ms="300000")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                                     start_new_session=True)
        address = f"127.0.0.1:{gcs}"
        try:
            deadline = time.monotonic() + self.timeout
            announced = False
            while True:
                if not announced:
                    announced = _announce_no_http(Path(self.temp), node_id)
                if self.proc.poll() is not None:
                    raise RuntimeError(f"ray start failed: {self.proc.stderr.read().decode()[-2000:]}")
                with closing(socket.socket()) as s:
                    if s.connect_ex(("127.0.0.1", gcs)) == 0:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError("ray start: the head did not come up in time")
                time.sleep(0.2)
            while True:  # the GCS answers before the raylet has registered the node
                try:
                    ray.init(address=address, log_to_driver=False,
                             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
                    break
                except ConnectionError:
                    if time.monotonic() > deadline or self.proc.poll() is not None:
                        raise
                    time.sleep(1.0)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return address

    def __exit__(self, *exc) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        if self.proc is not None and self.proc.poll() is None:
            # ray start --block stops the processes it started on SIGTERM; the session group is
            # ours alone (start_new_session), so anything left over is ended with it.
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
