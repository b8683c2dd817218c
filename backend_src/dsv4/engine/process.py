"""The engine in its own process, behind the same calls as `Engine` (add_request, abort, stats, shutdown).

Why: Triton's Python backend answers every streamed delta with one IPC call from the stub's Python, and with the
engine's loop in the same interpreter the two take turns on one GIL (vLLM moved its engine core out of the API
server's process for that reason). On the H100 the boundary costs nothing measurable (docs/PERF.md, "Session 13")
and an engine crash cannot take the stub down with it, though the GIL turned out not to be what limited Triton's
throughput there. The serving process keeps tokenising and validating (a bad prompt is still refused
synchronously, by the same `PromptProcessor` the engine uses) and the engine process runs only the engine.

Transport: a socket pair, `multiprocessing.connection` framing (pickle). Serving process -> engine: the
`EngineConfig`, then ("add", id, token ids, SamplingParams) / ("abort", id) / ("stats", n) / ("shutdown",).
Engine -> serving process: ("ready", EngineStats) or ("failed", type, message, traceback), then
("out", [RequestOutput, ...]) with the deltas of one engine-loop iteration (one message per step, sent by the
engine thread), ("stats", n, EngineStats), and ("closed",) after a shutdown.

If the engine process dies, every request in flight gets a final "error" delta naming its exit code, and later
calls raise EngineDeadError; the serving process stays up and says so per request.

    python -m dsv4.engine.process FD      (started by EngineProcess; FD is its end of the socket pair)
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Callable, Iterable

from dsv4 import errors
from dsv4.config import EngineConfig
from dsv4.engine.params import SamplingParams
from dsv4.engine.prompt import PromptProcessor
from dsv4.engine.request import RequestOutput, RequestStream
from dsv4.errors import DSV4Error, EngineDeadError, InvalidRequestError

log = logging.getLogger("dsv4.engine.process")

_PACKAGE_ROOT = Path(__file__).resolve().parents[2]      # the directory holding the dsv4 package


def _error_output(request_id: str, n_prompt: int, message: str) -> RequestOutput:
    return RequestOutput(request_id=request_id, text="", token_ids=[], logprobs=None, finished=True,
                         finish_reason="error", num_prompt_tokens=n_prompt, num_output_tokens=0, error=message)


def find_engine_python() -> str:
    """The interpreter for the engine process: DSV4_ENGINE_PYTHON, else the Python whose site-packages this
    process imported torch from (Triton's stub embeds Python, so its sys.executable is not an interpreter to run),
    else python3 on PATH."""
    explicit = os.environ.get("DSV4_ENGINE_PYTHON")
    if explicit:
        return explicit
    candidates: list[Path] = []
    torch_mod = sys.modules.get("torch")
    torch_file = getattr(torch_mod, "__file__", None)
    if torch_file:
        site = Path(torch_file).resolve().parents[1]          # .../lib/pythonX.Y/site-packages
        prefix = site.parents[1]
        candidates += [prefix / "bin" / site.parent.name, prefix / "bin" / "python3", prefix / "bin" / "python"]
    exe = Path(sys.executable) if sys.executable else None
    if exe is not None and exe.name.startswith("python"):
        candidates.append(exe)
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which(f"python{sys.version_info.major}.{sys.version_info.minor}") or shutil.which("python3")
    if found:
        return found
    raise EngineDeadError("cannot find a Python interpreter for the engine process: set DSV4_ENGINE_PYTHON")


class EngineProcess:
    """Starts the engine process and forwards calls to it; its deltas reach the callers' `on_output` callables on
    this object's reader thread."""

    def __init__(self, config: EngineConfig, *, python: str | None = None, sys_path: Iterable[str] = (),
                 stats_timeout_s: float = 2.0):
        self.config = config
        self.prompts = PromptProcessor.for_checkpoint(config.checkpoint, config.max_model_len)
        self._stats_timeout_s = stats_timeout_s
        self._lock = threading.Condition()
        self._streams: dict[str, RequestStream] = {}
        self._dead: str | None = None
        self._closing = False
        self._stats_asked = self._stats_seen = 0
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        path = [*sys_path, str(_PACKAGE_ROOT), env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(p for p in dict.fromkeys(path) if p)
        cmd = [python or find_engine_python(), "-m", "dsv4.engine.process", str(theirs.fileno())]
        try:
            self._proc = subprocess.Popen(cmd, pass_fds=[theirs.fileno()], env=env)
        except OSError as e:
            ours.close()
            raise EngineDeadError(f"cannot start the engine process ({cmd[0]}): {e}") from None
        finally:
            theirs.close()
        self._conn = Connection(ours.detach())
        try:
            self._conn.send(config)
            self._last_stats = self._await_ready()
        except BaseException:
            self._kill()
            raise
        self._reader = threading.Thread(target=self._read_loop, name="dsv4-engine-reader", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _await_ready(self):
        while True:
            if self._conn.poll(0.5):
                try:
                    msg = self._conn.recv()
                except EOFError:
                    msg = None
            elif self._proc.poll() is None:
                continue
            else:
                msg = None
            if msg is None:
                rc = self._proc.wait()
                raise EngineDeadError(f"the engine process exited with code {rc} while starting (its log is on this "
                                      f"process's stderr)")
            if msg[0] == "ready":
                return msg[1]
            _, kind, message, tb = msg
            cls = getattr(errors, kind, None)
            if isinstance(cls, type) and issubclass(cls, DSV4Error):
                raise cls(message)
            raise EngineDeadError(f"the engine failed to start: {kind}: {message}\n{tb}")

    # --- the calls of Engine ----------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | None = None, prompt_token_ids: list[int] | None = None,
                    params: SamplingParams | None = None,
                    on_output: Callable[[RequestOutput], None] | None = None) -> RequestStream:
        params = params or SamplingParams()
        ids = self.prompts.token_ids(prompt, prompt_token_ids, params)
        stream = RequestStream(request_id, on_output)
        with self._lock:
            self._check_alive()
            if request_id in self._streams:
                raise InvalidRequestError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = stream
            try:
                self._conn.send(("add", request_id, ids, params))
            except OSError as e:
                del self._streams[request_id]
                raise EngineDeadError(f"the engine process is gone: {e}") from None
        return stream

    def abort(self, request_id: str) -> None:
        with self._lock:
            if self._dead is None and request_id in self._streams:
                try:
                    self._conn.send(("abort", request_id))
                except OSError:
                    pass    # the reader thread fails every request when the connection closes

    def stats(self):
        """The engine's EngineStats, asked now; the last one received if no answer comes within the timeout."""
        with self._lock:
            if self._dead is None and not self._closing:
                self._stats_asked += 1
                want = self._stats_asked
                try:
                    self._conn.send(("stats", want))
                except OSError:
                    want = 0
                self._lock.wait_for(lambda: self._stats_seen >= want or self._dead is not None,
                                    self._stats_timeout_s)
            return self._last_stats

    def shutdown(self, timeout_s: float = 60.0) -> None:
        """Stops the engine (requests in flight end with an "abort" delta) and waits for its process."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            if self._dead is None:
                try:
                    self._conn.send(("shutdown",))
                except OSError:
                    pass
        self._reader.join(timeout_s)
        self._kill(grace_s=10.0)

    # --- internals --------------------------------------------------------------------------------------------
    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        if self._closing:
            raise EngineDeadError("the engine is shut down")

    def _kill(self, grace_s: float = 0.0) -> None:
        try:
            self._proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._conn.close()

    def _read_loop(self) -> None:
        reason = None
        try:
            while True:
                msg = self._conn.recv()
                kind = msg[0]
                if kind == "out":
                    self._dispatch(msg[1])
                elif kind == "stats":
                    with self._lock:
                        self._stats_seen = max(self._stats_seen, msg[1])
                        self._last_stats = msg[2]
                        self._lock.notify_all()
                elif kind == "closed":
                    return
        except (EOFError, OSError):
            rc = self._proc.poll()
            if rc is None:
                try:
                    rc = self._proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    rc = "unknown (still running)"
            reason = f"the engine process exited unexpectedly (exit code {rc})"
        except BaseException as e:  # noqa: BLE001 - the reader must fail the requests, not vanish
            reason = f"the engine connection failed: {type(e).__name__}: {e}"
            log.exception("engine reader died")
        finally:
            with self._lock:
                self._dead = reason or "the engine is shut down"
                orphans, self._streams = self._streams, {}
                self._lock.notify_all()
            for rid, stream in orphans.items():
                stream.put(_error_output(rid, 0, self._dead))

    def _dispatch(self, outs: list[RequestOutput]) -> None:
        with self._lock:
            streams = self._streams
            targets = [(streams.pop(o.request_id, None) if o.finished else streams.get(o.request_id)) for o in outs]
        for out, stream in zip(outs, targets):
            if stream is not None:
                stream.put(out)


# ---------------------------------------------------------------------------------------------------------------
# the engine process
# ---------------------------------------------------------------------------------------------------------------
class _Outbox:
    """The deltas of one engine-loop iteration, sent as one message by the engine thread itself (Engine's
    after_step hook): a sender thread of its own would wait for the GIL behind the engine thread's host work,
    up to a switch interval per message, and then delay the engine while it pickles."""

    def __init__(self, conn: Connection):
        self._conn = conn
        self._lock = threading.Lock()
        self._items: list[RequestOutput] = []
        self.broken = False

    def output(self, out: RequestOutput) -> None:
        with self._lock:
            self._items.append(out)

    def flush(self) -> None:
        with self._lock:
            if self._items:
                items, self._items = self._items, []
                self._send(("out", items))

    def message(self, msg: tuple) -> None:
        with self._lock:
            self._send(msg)

    def _send(self, msg: tuple) -> None:
        if self.broken:
            return
        try:
            self._conn.send(msg)
        except OSError:
            self.broken = True      # the serving process is gone; the command loop sees EOF and stops the engine


def _serve(fd: int) -> int:
    logging.basicConfig(level=logging.INFO, format="[dsv4-engine %(process)d] %(levelname)s %(name)s: %(message)s")
    conn = Connection(fd)
    try:
        config = conn.recv()
    except EOFError:
        return 1
    from dsv4.engine.engine import Engine

    # the command loop's thread needs the GIL for each add/abort/stats while the engine thread runs Python: hand
    # it over sooner than Python's 5 ms default, as the Triton stub does for its sender
    raw = os.environ.get("DSV4_ENGINE_SWITCH_INTERVAL_MS", "0.5")
    try:
        switch_ms = float(raw)
    except ValueError:
        switch_ms = 0.0
    if not 0 < switch_ms <= 100:
        conn.send(("failed", "ConfigError",
                   f"DSV4_ENGINE_SWITCH_INTERVAL_MS must be a number of milliseconds in (0, 100], got {raw!r}", ""))
        return 1
    sys.setswitchinterval(switch_ms / 1000.0)
    outbox = _Outbox(conn)
    try:
        engine = Engine(config, after_step=outbox.flush)
    except BaseException as e:  # noqa: BLE001 - reported to the serving process, which raises it
        conn.send(("failed", type(e).__name__, str(e), traceback.format_exc()))
        return 1
    outbox.message(("ready", engine.stats()))
    try:
        while True:
            try:
                msg = conn.recv()
            except EOFError:
                log.warning("the serving process closed the connection: stopping the engine")
                break
            kind = msg[0]
            if kind == "add":
                _, rid, ids, params = msg
                try:
                    engine.add_request(rid, prompt_token_ids=ids, params=params, on_output=outbox.output)
                except DSV4Error as e:
                    outbox.output(_error_output(rid, len(ids), str(e)))
                    outbox.flush()      # the engine loop may be idle: nothing else would send it
            elif kind == "abort":
                engine.abort(msg[1])
            elif kind == "stats":
                outbox.message(("stats", msg[1], engine.stats()))
            elif kind == "shutdown":
                break
    finally:
        t = time.monotonic()
        engine.shutdown()
        outbox.flush()
        outbox.message(("closed",))
        log.info("engine stopped in %.1f s", time.monotonic() - t)
    return 0


if __name__ == "__main__":
    sys.exit(_serve(int(sys.argv[1])))
