"""Run `memlm serve` as a child process on a free loopback port: for the load benchmark and the tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`memlm serve ARGS` on 127.0.0.1 and a free port; `wait_ready()`, then `stop()`."""

    def __init__(self, *args: str, api_key: str | None = None):
        """`api_key` is handed over in MEMLM_API_KEY (the way that keeps it out of `ps`)."""
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}  # for metric()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "memlm", "serve", "--host", "127.0.0.1", "--port", str(self.port), *args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("MEMLM_API_KEY", None)
        if api_key:
            env["MEMLM_API_KEY"] = api_key
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.saw_loading = False  # /health answered 503 (with an error body) before it answered 200

    def wait_ready(self, timeout: float = 180) -> ServerProcess:
        import httpx  # lazy: httpx comes with the test extras, not the runtime

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"memlm serve exited with {self.process.returncode}: {self.process.stdout.read()}")
            try:
                r = httpx.get(self.url + "/health", timeout=2)
                if r.status_code == 200:
                    return self
                if r.status_code == 503 and "error" in r.json():
                    self.saw_loading = True
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"memlm serve was not ready after {timeout:.0f} s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def metric(self, name: str, **labels: str) -> float:
        """The sum of a Prometheus metric's samples (those with these labels) from /metrics."""
        import httpx  # lazy: httpx comes with the test extras, not the runtime

        total = 0.0
        for line in httpx.get(self.url + "/metrics", headers=self.headers, timeout=10).text.splitlines():
            head, _, value = line.rpartition(" ")
            if (head == name or head.startswith(name + "{")) and all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
        return total

    def __enter__(self) -> ServerProcess:
        return self.wait_ready()

    def __exit__(self, *exc) -> None:
        self.stop()
