"""Start/stop a local tritonserver (the bundle built by scripts/triton_setup.py) from Python.

Used by scripts/serve.py (``make serve``) and by the e2e tests::

    import sys; sys.path.insert(0, "<repo>/scripts")
    from triton_local import start_server
    with start_server(model_repository="tests/e2e/echo_repository", model="echo") as srv:   # free ports
        srv.grpc_url   # "127.0.0.1:<port>"

Nothing here imports numpy or tritonclient: it only needs the standard library.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = REPO / ".triton"
DEFAULT_REPOSITORY = REPO / "model_repository"
DEFAULT_MODEL = "deepseek_v4"


class SetupMissing(RuntimeError):
    """The .triton/ toolchain is missing or stale: run `make setup` (or bash scripts/triton_env.sh)."""


class ServerStartError(RuntimeError):
    """tritonserver exited or did not get ready in time; the message ends with the server log tail."""


def load_layout(root: str | os.PathLike | None = None) -> dict:
    """Paths written by scripts/triton_setup.py (``.triton/triton_env.json``), checked to exist."""
    root = Path(root) if root else DEFAULT_ROOT
    f = root / "triton_env.json"
    hint = "run `make setup` (or `bash scripts/triton_env.sh`) first"
    if not f.exists():
        raise SetupMissing(f"{f} not found: {hint}")
    layout = json.loads(f.read_text())
    for key in ("tritonserver", "backend_directory"):
        if not Path(layout[key]).exists():
            raise SetupMissing(f"{layout[key]} ({key}) missing: {hint}")
    return layout


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct free ports: all n sockets are held open while the OS picks, so it cannot hand out one twice
    (picked one at a time, HTTP and metrics once got the same port and tritonserver refused to start)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def server_env(layout: dict, *, checkpoint: str | None = None, ops_backend: str | None = None,
               stub_sys_path: Iterable[str] | None = None, env: Mapping[str, str] | None = None) -> dict:
    """Environment for tritonserver: bundled libs on LD_LIBRARY_PATH, the stub's sys.path list for model.py
    (DSV4_STUB_SYSPATH; the stub ignores PYTHONPATH), the engine process's Python (DSV4_ENGINE_PYTHON) and the
    model overrides DSV4_CHECKPOINT/DSV4_OPS_BACKEND."""
    e = dict(os.environ)
    ld = list(layout["ld_library_path"]) + [p for p in e.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    e["LD_LIBRARY_PATH"] = os.pathsep.join(dict.fromkeys(ld))
    sp = list(stub_sys_path) if stub_sys_path is not None else list(layout["stub_sys_path"])
    e["DSV4_STUB_SYSPATH"] = os.pathsep.join(sp)
    if layout.get("python"):      # the engine process's interpreter: the one the stub's packages were installed for
        e.setdefault("DSV4_ENGINE_PYTHON", layout["python"])
    if checkpoint:
        e["DSV4_CHECKPOINT"] = str(Path(checkpoint).expanduser().resolve())
    if ops_backend:
        e["DSV4_OPS_BACKEND"] = ops_backend
    if env:
        e.update(env)
    return e


def _http_status(url: str, timeout: float = 2.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return None


def _error_summary(handle: "ServerHandle") -> str:
    """The server's error lines (model load failures, stub crashes), repeated after the tail for visibility."""
    keys = ("failed to load", "Failed to initialize Python stub", "Stub process", "terminate called",
            "Signal (", "error: creating server", "Traceback")
    lines = [ln.rstrip() for ln in handle._tail if any(k in ln for k in keys)]
    lines = list(dict.fromkeys(ln[:600] for ln in lines))
    return ("\n--- errors ---\n" + "\n".join(lines[-8:])) if lines else ""


@dataclass
class ServerHandle:
    process: subprocess.Popen
    host: str
    http_port: int
    grpc_port: int
    metrics_port: int
    model: str | None
    log_path: Path
    command: list[str]
    _tail: deque = field(default_factory=lambda: deque(maxlen=400), repr=False)
    _pump: threading.Thread | None = field(default=None, repr=False)

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, n: int = 60) -> str:
        return "".join(list(self._tail)[-n:])

    def ready(self, model: str | None = None) -> bool:
        model = model or self.model
        base = f"http://{self.host}:{self.http_port}"
        if _http_status(f"{base}/v2/health/ready") != 200:
            return False
        return model is None or _http_status(f"{base}/v2/models/{model}/ready") == 200

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as r:
            return r.read().decode()

    def send_signal(self, sig: int) -> None:
        if self.alive():
            self.process.send_signal(sig)

    def wait(self, timeout: float | None = None) -> int:
        rc = self.process.wait(timeout)
        if self._pump is not None:
            self._pump.join(timeout=5)
        return rc

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (Triton drains and unloads models, finalize() runs), then SIGKILL of the server's process
        group (its Python-backend stubs included) after ``timeout`` seconds. Returns the exit code."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)  # our own session: server + stubs
                except ProcessLookupError:
                    pass
                self.process.wait(10)
        return self.wait(10)

    def __enter__(self) -> "ServerHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_server(model_repository: str | os.PathLike = DEFAULT_REPOSITORY, *,
                 model: str | None = DEFAULT_MODEL,
                 host: str = "127.0.0.1",
                 http_port: int | None = None, grpc_port: int | None = None, metrics_port: int | None = None,
                 checkpoint: str | None = None, ops_backend: str | None = None,
                 env: Mapping[str, str] | None = None, stub_sys_path: Iterable[str] | None = None,
                 extra_args: Iterable[str] = (), log_path: str | os.PathLike | None = None,
                 echo: bool = False, startup_timeout: float = 300.0,
                 triton_root: str | os.PathLike | None = None) -> ServerHandle:
    """Start tritonserver on ``host`` (loopback by default) and block until ``model`` is READY.

    Ports left as None are picked free (for tests). ``checkpoint``/``ops_backend`` reach model.py as
    DSV4_CHECKPOINT/DSV4_OPS_BACKEND and override config.pbtxt. ``echo`` copies the server log to stdout.
    Raises SetupMissing (no .triton/) or ServerStartError (exited/timeout; message has the log tail).
    """
    layout = load_layout(triton_root)
    picked = iter(free_ports(3, host))
    http_port, grpc_port, metrics_port = (p or next(picked) for p in (http_port, grpc_port, metrics_port))
    repo = Path(model_repository).resolve()
    if not repo.is_dir():
        raise ServerStartError(f"model repository {repo} does not exist")
    cmd = [layout["tritonserver"],
           "--model-repository", str(repo),
           "--backend-directory", layout["backend_directory"],
           "--http-address", host, "--http-port", str(http_port),
           "--grpc-address", host, "--grpc-port", str(grpc_port),
           "--metrics-address", host, "--metrics-port", str(metrics_port),
           *extra_args]
    if log_path is None:
        logs = Path(triton_root or DEFAULT_ROOT) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"tritonserver-{http_port}.log"
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(cmd, env=server_env(layout, checkpoint=checkpoint, ops_backend=ops_backend,
                                                 stub_sys_path=stub_sys_path, env=env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, cwd=str(REPO))
    handle = ServerHandle(process=proc, host=host, http_port=http_port, grpc_port=grpc_port,
                          metrics_port=metrics_port, model=model, log_path=log_path, command=cmd)

    def pump() -> None:
        with open(log_path, "wb") as f:
            for line in iter(proc.stdout.readline, b""):
                f.write(line)
                f.flush()
                text = line.decode("utf-8", "replace")
                handle._tail.append(text)
                if echo:
                    print(text, end="", flush=True)
        proc.stdout.close()

    handle._pump = threading.Thread(target=pump, name="tritonserver-log", daemon=True)
    handle._pump.start()

    deadline = time.monotonic() + startup_timeout
    while True:
        if not handle.alive():
            handle.wait(10)
            raise ServerStartError(f"tritonserver exited with code {proc.returncode} during startup "
                                   f"(log: {log_path}):\n{handle.log_tail()}{_error_summary(handle)}")
        if handle.ready():
            return handle
        if time.monotonic() > deadline:
            handle.stop(timeout=10)
            raise ServerStartError(f"model {model!r} not READY after {startup_timeout:.0f} s "
                                   f"(log: {log_path}):\n{handle.log_tail()}{_error_summary(handle)}")
        time.sleep(0.25)
