"""Real servers for the tests that need one: started on a free local port, answered before the test goes on."""

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(cmd: list[str], url: str, log_path) -> subprocess.Popen:
    """Start a server and wait until ``url`` answers 200 (or fail with its log)."""
    import time
    import urllib.request

    log = open(log_path, "w")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited: {Path(log_path).read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{cmd[0]} did not answer {url}: {Path(log_path).read_text()[-3000:]}")


def mlflow_server(backend: str, artifacts: Path, port: int, log_path: Path) -> subprocess.Popen:
    """``mlflow server`` on ``backend`` (its artifacts served from ``artifacts``) at 127.0.0.1:``port``."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend, "--serve-artifacts",
           "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]  # fmt: skip
    return serve(cmd, f"http://127.0.0.1:{port}/health", log_path)


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL the server and every process it started (its session): gone at once, as in a crash."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
