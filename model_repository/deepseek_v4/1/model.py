"""Triton Python-backend adapter: Triton request <-> dsv4 engine request. No model logic lives here.

Decoupled: ``execute()`` validates and enqueues (``add_request``) and returns at once; every delta lands on one
queue (``on_output``) and ONE dispatcher thread answers through the requests' response senders (all stub IPC from
one thread: see ``TritonPythonModel``), one response at a time in ``dsv4.engine.send_order``'s order: a finished
request's response before any streaming delta, the rest round-robin, deltas that queued up merged. The engine
runs in its own process (``dsv4.engine.process``; parameter ``engine_process``): its Python work and the response
sends do not take turns on one GIL, and an engine crash fails the requests in flight instead of the stub.

I/O follows Triton's vLLM backend (see config.pbtxt), with these rules:
* exactly one of ``text_input`` (BYTES[1], UTF-8) / ``input_ids`` (INT32[-1]);
* ``sampling_parameters``: a JSON object for ``SamplingParams.from_dict`` (absent => the request's Triton
  parameters are used, as the vLLM backend does);
* ``stream`` true: one response per engine delta, the last one flagged final. ``exclude_input_in_output``
  defaults to true when streaming and false otherwise (vLLM backend); an explicit false while streaming puts the
  prompt in front of the first delta (the vLLM backend rejects that combination instead);
* extras only when asked: ``finish_reason`` / ``num_input_tokens`` / ``num_output_tokens`` by the return_* flags;
  ``logprobs`` by ``return_logprobs``; ``output_ids`` when the request came as ``input_ids`` or names the output.
  While streaming, ``num_output_tokens`` counts the tokens of that response (vLLM) and ``finish_reason`` is
  "None" until the last response;
* every failure of a request is a TritonError in its final response; nothing escapes into the stub;
* ``is_cancelled()`` is polled every 0.2 s per request: a cancelled request is aborted in the engine (frees its
  blocks) and answered with a CANCELLED error; several deltas that queued up meanwhile go out as one response.
"""
import os
import re
import sys
from pathlib import Path

_MODEL_DIR = Path(__file__).resolve().parents[1]  # model_repository/deepseek_v4
_REPO_ROOT = Path(os.environ.get("DSV4_REPO_ROOT") or _MODEL_DIR.parents[1])


def _pbtxt_parameter(name):
    """A string parameter of this model's config.pbtxt, read from its text (initialize() is too late for it)."""
    try:
        text = (_MODEL_DIR / "config.pbtxt").read_text()
    except OSError:
        return ""
    m = re.search(r'key\s*:\s*"%s"\s*value\s*:\s*\{\s*string_value\s*:\s*"((?:[^"\\]|\\.)*)"' % re.escape(name), text)
    return m.group(1) if m else ""


def _resolve(p):
    p = Path(p).expanduser()
    return str(p if p.is_absolute() else (_REPO_ROOT / p).resolve())


def _fix_sys_path():
    """Put DSV4_STUB_SYSPATH, then the python_sys_path parameter, first on sys.path (the stub ignores PYTHONPATH).

    Must run before numpy is imported: the local Triton 2.51 stub needs numpy<2 (from .triton/stub_site) to read
    BYTES tensors; under numpy 2 the stub process dies on the first string input.
    """
    import site

    raw = [os.environ.get("DSV4_STUB_SYSPATH", ""), _pbtxt_parameter("python_sys_path")]
    paths = [_resolve(p) for chunk in raw for p in chunk.split(os.pathsep) if p.strip()]
    paths = list(dict.fromkeys(paths))
    for p in reversed(paths):
        if p in sys.path:
            sys.path.remove(p)
        sys.path.insert(0, p)
    for p in paths:
        if p.rstrip("/").endswith("-packages") and os.path.isdir(p):
            site.addsitedir(p)  # runs its .pth files (editable installs); p itself already leads sys.path
    return paths


_STUB_SYS_PATH = _fix_sys_path()

import json  # noqa: E402
import queue  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import uuid  # noqa: E402

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

_FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
_OPTIONAL_BOOLS = ("stream", "exclude_input_in_output", "return_finish_reason", "return_num_input_tokens",
                   "return_num_output_tokens", "return_logprobs")
# config.pbtxt parameter -> (EngineConfig field, env override, parser)
_ENGINE_PARAMS = {
    "checkpoint": ("checkpoint", "DSV4_CHECKPOINT", str),
    "ops_backend": ("ops_backend", "DSV4_OPS_BACKEND", str),
    "device": ("device", "DSV4_DEVICE", str),
    "dtype": ("dtype", "DSV4_DTYPE", str),
    "kv_cache_memory_bytes": ("kv_cache_memory_bytes", "DSV4_KV_CACHE_MEMORY_BYTES", int),
    "num_kv_blocks": ("num_kv_blocks", "DSV4_NUM_KV_BLOCKS", int),
    "max_num_seqs": ("max_num_seqs", "DSV4_MAX_NUM_SEQS", int),
    "max_model_len": ("max_model_len", "DSV4_MAX_MODEL_LEN", int),
    "max_num_batched_tokens": ("max_num_batched_tokens", "DSV4_MAX_NUM_BATCHED_TOKENS", int),
    "enforce_eager": ("enforce_eager", "DSV4_ENFORCE_EAGER", bool),
    "cuda_graph_max_batch": ("cuda_graph_max_batch", "DSV4_CUDA_GRAPH_MAX_BATCH", int),
    "cuda_graph_max_tokens": ("cuda_graph_max_tokens", "DSV4_CUDA_GRAPH_MAX_TOKENS", int),
    "cuda_graph_full_max_tokens": ("cuda_graph_full_max_tokens", "DSV4_CUDA_GRAPH_FULL_MAX_TOKENS", int),
    "kv_cache_dtype": ("kv_cache_dtype", "DSV4_KV_CACHE_DTYPE", str),
    "async_scheduling": ("async_scheduling", "DSV4_ASYNC_SCHEDULING", bool),
    "async_prefill": ("async_prefill", "DSV4_ASYNC_PREFILL", bool),
    "max_waiting_steps": ("max_waiting_steps", "DSV4_MAX_WAITING_STEPS", int),
    "waiting_served_ratio": ("waiting_served_ratio", "DSV4_WAITING_SERVED_RATIO", float),
}
_TTFT_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
_ITL_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]
_CANCEL_CHECK_S = 0.2     # is_cancelled() poll period per request (an IPC round trip each)
_STATS_PERIOD_S = 0.5     # gauge refresh
_MAX_BATCH = 4096         # queue items moved to the backlog between two sends
_GIL_SWITCH_MS = 0.5      # default gil_switch_interval_ms (config.pbtxt explains why)
_LOAD_REPORT_S = 10.0     # dispatcher load line in the server log
_COUNTER_FLUSH_S = 0.1    # token and request counters go to the server at most this often


class _BadRequest(Exception):
    """A client error detected by the adapter (INVALID_ARG)."""


def _error_response(msg, code=None):
    if code is None:
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(msg))
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(msg, code))


def _parse_number(name, value, parser):
    try:
        return parser(value)
    except (TypeError, ValueError):
        raise ValueError(f"model parameter '{name}': expected {parser.__name__}, got {value!r}") from None


def _parse_bool(name, value):
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"model parameter '{name}': expected true/false, got {value!r}")


class _Metrics:
    """Triton custom metrics (pb_utils.MetricFamily); HISTOGRAM exists in the 2.51 Python backend."""

    def __init__(self, model_name, version):
        labels = {"model": model_name, "version": str(version)}
        MF = pb_utils.MetricFamily
        self.families = []

        def fam(name, desc, kind):
            f = MF(name=name, description=desc, kind=kind)
            self.families.append(f)
            return f

        self.histograms = hasattr(MF, "HISTOGRAM")
        if self.histograms:
            self.ttft = fam("dsv4_time_to_first_token_seconds", "Time to first token (s)",
                            MF.HISTOGRAM).Metric(labels=labels, buckets=_TTFT_BUCKETS)
            self.itl = fam("dsv4_inter_token_latency_seconds",
                           "Inter-token latency (s): one observation per finished request, the mean gap between "
                           "its tokens", MF.HISTOGRAM).Metric(labels=labels, buckets=_ITL_BUCKETS)
        else:  # older backends: sums and counts
            self.ttft_sum = fam("dsv4_time_to_first_token_seconds_sum", "Sum of TTFT (s)", MF.COUNTER).Metric(labels=labels)
            self.ttft_count = fam("dsv4_time_to_first_token_seconds_count", "Requests with a first token",
                                  MF.COUNTER).Metric(labels=labels)
            self.itl_sum = fam("dsv4_inter_token_latency_seconds_sum", "Sum of inter-token latencies (s)",
                               MF.COUNTER).Metric(labels=labels)
            self.itl_count = fam("dsv4_inter_token_latency_seconds_count", "Inter-token intervals",
                                 MF.COUNTER).Metric(labels=labels)
        self.gen_tokens = fam("dsv4_generation_tokens_total", "Generated tokens", MF.COUNTER).Metric(labels=labels)
        self.prompt_tokens = fam("dsv4_prompt_tokens_total", "Prompt tokens of started requests",
                                 MF.COUNTER).Metric(labels=labels)
        req = fam("dsv4_requests_total", "Finished requests by outcome", MF.COUNTER)
        self.requests = {o: req.Metric(labels=dict(labels, outcome=o))
                         for o in ("stop", "length", "abort", "error", "cancelled", "rejected")}
        self.kv_in_use = fam("dsv4_kv_blocks_in_use", "KV-cache blocks in use", MF.GAUGE).Metric(labels=labels)
        self.kv_total = fam("dsv4_kv_blocks_total", "KV-cache blocks in the pool", MF.GAUGE).Metric(labels=labels)
        self.waiting = fam("dsv4_num_requests_waiting", "Requests waiting to be scheduled",
                           MF.GAUGE).Metric(labels=labels)
        self.running = fam("dsv4_num_requests_running", "Requests being decoded", MF.GAUGE).Metric(labels=labels)
        self._pending_gen = self._pending_prompt = 0
        self._pending_outcomes = dict.fromkeys(self.requests, 0)
        self._flushed = 0.0

    def observe_ttft(self, s):
        if self.histograms:
            self.ttft.observe(s)
        else:
            self.ttft_sum.increment(s)
            self.ttft_count.increment(1)

    def observe_itl(self, s):
        if self.histograms:
            self.itl.observe(s)
        else:
            self.itl_sum.increment(s)
            self.itl_count.increment(1)

    def add_tokens(self, generated, prompt=0):
        self._pending_gen += generated
        self._pending_prompt += prompt

    def flush(self, now):
        """Counters go out at most every _COUNTER_FLUSH_S: every metric call is an IPC round trip to the server (as
        costly as a response send), and one flush per dispatcher wake-up plus one increment per finished request
        came to ~190 calls/s at c=32 (estimated 5-10 % of the dispatcher's time). Scrapes see them that much late."""
        if now - self._flushed < _COUNTER_FLUSH_S:
            return
        self._flushed = now
        if self._pending_gen:
            self.gen_tokens.increment(self._pending_gen)
            self._pending_gen = 0
        if self._pending_prompt:
            self.prompt_tokens.increment(self._pending_prompt)
            self._pending_prompt = 0
        for outcome, n in self._pending_outcomes.items():
            if n:
                self.requests[outcome].increment(n)
                self._pending_outcomes[outcome] = 0

    def finished(self, outcome):
        if outcome in self._pending_outcomes:
            self._pending_outcomes[outcome] += 1


class _DispatchLoad:
    """What the dispatcher did since the last report: wake-ups, deltas in, responses out, seconds inside
    response sends and seconds busy (a wake-up's handling). Logged every _LOAD_REPORT_S while there is traffic,
    because the response path is the serving bottleneck to watch (docs/PERF.md, "Serving path")."""

    __slots__ = ("wakeups", "deltas", "responses", "send_s", "busy_s", "since", "steps")

    def __init__(self, now, engine_steps):
        self.wakeups = self.deltas = self.responses = 0
        self.send_s = self.busy_s = 0.0
        self.since, self.steps = now, engine_steps

    def line(self, now, engine_steps):
        span = max(now - self.since, 1e-9)
        per = self.send_s / self.responses * 1e6 if self.responses else 0.0
        return (f"[deepseek_v4] dispatcher, last {span:.1f} s: {self.responses / span:.0f} responses/s carrying "
                f"{self.deltas / span:.0f} deltas/s, {per:.0f} us per send, busy {100 * self.busy_s / span:.0f} %, "
                f"{self.wakeups} wake-ups; engine {(engine_steps - self.steps) / span:.0f} steps/s")


class _Job:
    """One request in flight. Mutated only by the dispatcher thread."""

    __slots__ = ("rid", "sender", "stream", "prompt", "prepend", "want", "t0", "first_sent", "first_tok_t",
                 "last_tok_t", "n_tok", "texts", "ids", "lps", "n_prompt", "done", "next_cancel_check")

    def __init__(self, rid, sender, stream, prompt, prepend, want, t0):
        self.rid, self.sender, self.stream = rid, sender, stream
        self.prompt, self.prepend, self.want, self.t0 = prompt, prepend, want, t0
        self.first_sent = False
        self.first_tok_t = self.last_tok_t = None
        self.n_tok = 0
        self.texts, self.ids, self.lps = [], [], []
        self.n_prompt = 0
        self.done = False
        self.next_cancel_check = 0.0


class TritonPythonModel:
    """Threads: the stub's thread runs execute() (validate + add_request, no IPC); the engine process's reader thread
    (or, in-process, the engine thread) puts each delta (timestamped) on one queue through the request's on_output
    callback; ONE dispatcher thread does every call into the stub's IPC (response sends, is_cancelled, metrics).
    The 2.51 Python backend crashes the server (boost::interprocess::lock_exception / SIGSEGV in
    libtriton_python.so) when several Python threads make those calls concurrently: seen at perf_analyzer
    concurrency 4 with one sender thread per request."""

    # ------------------------------------------------------------------ lifecycle
    def initialize(self, args):
        self.model_config = json.loads(args["model_config"])
        self.model_name = args.get("model_name", "deepseek_v4")
        self.logger = pb_utils.Logger
        self._all_outputs = {o["name"] for o in self.model_config.get("output", [])}
        if not pb_utils.using_decoupled_model_transaction_policy(self.model_config):
            raise pb_utils.TritonModelException("deepseek_v4 must use model_transaction_policy { decoupled: true }")
        self._check_numpy()
        params = {k: v.get("string_value", "") for k, v in self.model_config.get("parameters", {}).items()}
        cfg_kwargs = {}
        for key, (fld, env, parser) in _ENGINE_PARAMS.items():
            value = os.environ.get(env) or params.get(key, "")
            if value == "" or value is None:
                continue
            if parser is bool:
                cfg_kwargs[fld] = _parse_bool(key, value)
            else:
                cfg_kwargs[fld] = _parse_number(key, value, parser) if parser in (int, float) else value
        raw = os.environ.get("DSV4_ENGINE_PROCESS") or params.get("engine_process", "")
        use_process = _parse_bool("engine_process", raw) if raw else True
        switch = os.environ.get("DSV4_GIL_SWITCH_INTERVAL_MS") or params.get("gil_switch_interval_ms", "")
        switch_ms = _parse_number("gil_switch_interval_ms", switch, float) if switch else _GIL_SWITCH_MS
        if not 0 < switch_ms <= 100:
            raise pb_utils.TritonModelException(f"model parameter 'gil_switch_interval_ms' must be in (0, 100], "
                                                f"got {switch_ms}")
        sys.setswitchinterval(switch_ms / 1000.0)
        cfg_kwargs["checkpoint"] = _resolve(cfg_kwargs.get("checkpoint") or "checkpoints/demo")
        if not Path(cfg_kwargs["checkpoint"]).exists():
            raise pb_utils.TritonModelException(
                f"checkpoint {cfg_kwargs['checkpoint']} does not exist: set the model parameter 'checkpoint' in "
                f"config.pbtxt or DSV4_CHECKPOINT (scripts/serve.py --checkpoint), or create the demo checkpoint")
        try:
            from dsv4 import errors
            from dsv4.config import EngineConfig
            from dsv4.engine.engine import Engine
            from dsv4.engine.params import SamplingParams
            from dsv4.engine.process import EngineProcess
            from dsv4.engine.send_order import Backlog
        except ImportError as e:
            raise pb_utils.TritonModelException(
                f"cannot import the dsv4 engine ({e}); sys.path starts with {sys.path[:6]}. Install the package "
                f"(pip install -e .) into the stub's Python or list its dirs in DSV4_STUB_SYSPATH / the "
                f"python_sys_path parameter") from e
        self.SamplingParams = SamplingParams
        self.errors = errors
        unknown = [f for f in cfg_kwargs if f not in getattr(EngineConfig, "__dataclass_fields__", cfg_kwargs)]
        if unknown:
            raise pb_utils.TritonModelException(f"EngineConfig has no setting(s) {unknown}")
        config = EngineConfig(**cfg_kwargs)
        where = "its own process" if use_process else "the stub's process"
        self.logger.log_info(f"[deepseek_v4] starting the engine in {where}: {config}")
        try:
            self.engine = EngineProcess(config, sys_path=_STUB_SYS_PATH) if use_process else Engine(config)
        except errors.DSV4Error as e:
            raise pb_utils.TritonModelException(f"the engine did not start: {type(e).__name__}: {e}") from e
        self.metrics = _Metrics(self.model_name, args.get("model_version", "1"))
        self._q = queue.Queue()
        self._active = {}  # rid -> _Job; dispatcher thread only
        # unsent (RequestOutput, t) per _Job; dispatcher thread only
        self._backlog = Backlog(is_final=lambda delta: delta[0].finished)
        self._dispatcher = threading.Thread(target=self._dispatch_loop, name="dsv4-dispatch", daemon=True)
        self._dispatcher.start()
        self.logger.log_info("[deepseek_v4] engine ready")

    def finalize(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            try:
                engine.shutdown()  # pending requests get a final "abort" delta -> CANCELLED errors
            except Exception as e:  # noqa: BLE001
                print(f"[deepseek_v4] engine.shutdown failed: {e!r}", flush=True)
        dispatcher = getattr(self, "_dispatcher", None)
        if dispatcher is not None:
            self._q.put(("stop",))
            dispatcher.join(timeout=10)

    def _check_numpy(self):
        """The 2.51 stub dies on BYTES inputs under numpy 2: refuse to load instead of hanging clients."""
        major = int(np.__version__.split(".")[0])
        if major >= 2 and _STUB_SYS_PATH and os.environ.get("DSV4_ALLOW_NUMPY2") != "1":
            raise pb_utils.TritonModelException(
                f"the Python-backend stub imported numpy {np.__version__} from {np.__file__}; the local Triton "
                f"2.51 stub needs numpy<2 first on its path (.triton/stub_site, built by `make setup`). "
                f"DSV4_STUB_SYSPATH/python_sys_path = {_STUB_SYS_PATH}. Set DSV4_ALLOW_NUMPY2=1 for a newer backend.")

    # ------------------------------------------------------------------ execute: validate + enqueue, no IPC
    def execute(self, requests):
        for request in requests:
            sender = None
            try:
                sender = request.get_response_sender()
                self._start(request, sender)
            except _BadRequest as e:
                self._q.put(("reject", sender, str(e), pb_utils.TritonError.INVALID_ARG))
            except self.errors.InvalidRequestError as e:
                self._q.put(("reject", sender, str(e), pb_utils.TritonError.INVALID_ARG))
            except self.errors.EngineDeadError as e:
                self._q.put(("reject", sender, f"engine is not running: {e}", pb_utils.TritonError.UNAVAILABLE))
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                self._q.put(("reject", sender, f"internal error while adding the request: {type(e).__name__}: {e}",
                             pb_utils.TritonError.INTERNAL))
        return None

    @staticmethod
    def _tensor(request, name):
        return pb_utils.get_input_tensor_by_name(request, name)

    def _bool(self, request, name):
        t = self._tensor(request, name)
        if t is None:
            return None
        a = t.as_numpy()
        if a.dtype != np.bool_ or a.size != 1:
            raise _BadRequest(f"input '{name}' must be BOOL with shape [1], got {a.dtype} {list(a.shape)}")
        return bool(a.reshape(-1)[0])

    def _text(self, request, name):
        t = self._tensor(request, name)
        if t is None:
            return None
        a = t.as_numpy()
        if a.dtype != np.object_ or a.size != 1:
            raise _BadRequest(f"input '{name}' must be BYTES (UTF-8 string) with shape [1], got {a.dtype} "
                              f"{list(a.shape)}")
        v = a.reshape(-1)[0]
        if isinstance(v, bytes):
            try:
                v = v.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _BadRequest(f"input '{name}' is not valid UTF-8: {e}") from None
        return str(v)

    def _sampling_dict(self, request):
        raw = self._text(request, "sampling_parameters")
        if raw is None:
            # vLLM backend fallback: Triton request parameters (e.g. from the HTTP generate endpoint)
            try:
                d = json.loads(request.parameters() or "{}")
            except (ValueError, TypeError):
                d = {}
            return {k: v for k, v in d.items() if k not in _OPTIONAL_BOOLS and not k.startswith("triton_")}
        if not raw.strip():
            return {}
        try:
            d = json.loads(raw)
        except ValueError as e:
            raise _BadRequest(f"input 'sampling_parameters' is not valid JSON ({e}); send a JSON object such as "
                              f'{{"max_tokens": 64, "temperature": 0}}') from None
        if not isinstance(d, dict):
            raise _BadRequest(f"input 'sampling_parameters' must be a JSON object, got {type(d).__name__}")
        return d

    def _start(self, request, sender):
        prompt = self._text(request, "text_input")
        ids_t = self._tensor(request, "input_ids")
        prompt_ids = None
        if ids_t is not None:
            a = ids_t.as_numpy()
            if a.dtype != np.int32 or a.ndim != 1:
                raise _BadRequest(f"input 'input_ids' must be INT32 with shape [-1], got {a.dtype} {list(a.shape)}")
            prompt_ids = [int(x) for x in a]
        if (prompt is None) == (prompt_ids is None):
            raise _BadRequest("send exactly one of 'text_input' (BYTES[1]) or 'input_ids' (INT32[-1])"
                              + ("" if prompt is None else ", not both"))
        stream = bool(self._bool(request, "stream"))
        exclude = self._bool(request, "exclude_input_in_output")
        want = {name: bool(self._bool(request, name)) for name in _OPTIONAL_BOOLS[2:]}
        # Triton lists every output as requested when the client names none: only a narrowed list is a choice
        requested = set(request.requested_output_names() or ())
        explicit = requested != self._all_outputs
        want["output_ids"] = prompt_ids is not None or (explicit and "output_ids" in requested)
        want["logprobs"] = want.pop("return_logprobs") or (explicit and "logprobs" in requested)
        sp_dict = self._sampling_dict(request)
        if want["logprobs"] and sp_dict.get("logprobs") is None:
            sp_dict["logprobs"] = 1
        params = self.SamplingParams.from_dict(sp_dict)
        prepend = (not stream) if exclude is None else (not exclude)

        client_id = request.request_id() or ""
        rid = f"{client_id[:64]}-{uuid.uuid4().hex[:16]}" if client_id else uuid.uuid4().hex
        t0 = time.monotonic()
        job = _Job(rid, sender, stream, prompt if prompt is not None else "", prepend, want, t0)
        self._q.put(("start", job))  # before any of its outputs
        q = self._q
        try:
            # the engine thread hands each delta (timestamped) straight to the dispatcher's queue
            self.engine.add_request(rid, prompt=prompt, prompt_token_ids=prompt_ids, params=params,
                                    on_output=lambda out: q.put(("out", job, out, time.monotonic())))
        except BaseException:
            q.put(("discard", job))
            raise

    # ------------------------------------------------------------------ dispatcher: the only IPC caller
    def _dispatch_loop(self):
        """One response per pass, picked by a Backlog (dsv4.engine.send_order): finals first, then round-robin. The
        queue is read again after every send, so a final delta that arrives while 30 streams wait goes out next."""
        last_sweep = last_stats = 0.0
        self._engine_steps = 0     # from the last stats (gauge refresh)
        self._load = load = _DispatchLoad(time.monotonic(), 0)
        backlog = self._backlog
        while True:
            idle = not backlog
            t_pass = time.perf_counter()
            stop = self._absorb(backlog, wait=idle)
            if idle:
                t_pass = time.perf_counter()     # waiting for the queue is not busy time
            if backlog:
                job, outs = backlog.pop()
                load.deltas += len(outs)
                try:
                    self._deliver(job, outs)
                except Exception as e:  # noqa: BLE001
                    traceback.print_exc()
                    self._fail(job, f"internal error: {type(e).__name__}: {e}", pb_utils.TritonError.INTERNAL, "error")
                load.busy_s += time.perf_counter() - t_pass
            now = time.monotonic()
            try:
                self.metrics.flush(now)
            except Exception:  # noqa: BLE001 - a metrics failure must not stop the responses
                traceback.print_exc()
            if now - load.since >= _LOAD_REPORT_S:
                if load.responses:
                    self.logger.log_info(load.line(now, self._engine_steps))
                self._load = load = _DispatchLoad(now, self._engine_steps)
            if now - last_sweep >= 0.05:
                last_sweep = now
                self._sweep_cancelled(now)
            if now - last_stats >= _STATS_PERIOD_S:
                last_stats = now
                self._update_gauges()
            if stop:
                for job in list(self._active.values()):
                    self._fail(job, "the model is being unloaded", pb_utils.TritonError.UNAVAILABLE, "abort")
                try:
                    self.metrics.flush(float("inf"))
                except Exception:  # noqa: BLE001
                    traceback.print_exc()
                return

    def _absorb(self, backlog, wait):
        """Move everything queued into the backlog (waiting up to 50 ms for the first item if ``wait``); handle the
        bookkeeping items on the way. Returns True once the model is being unloaded."""
        try:
            item = self._q.get(timeout=0.05) if wait else self._q.get_nowait()
        except queue.Empty:
            return False
        stop = False
        got_deltas = False
        taken = 0
        while True:
            kind = item[0]
            try:
                if kind == "out":
                    backlog.add(item[1], (item[2], item[3]))
                    got_deltas = True
                elif kind == "start":
                    self._active[item[1].rid] = item[1]
                elif kind == "reject":
                    self.metrics.finished("rejected")
                    self._send_error(item[1], item[2], item[3])
                elif kind == "discard":   # the engine refused it; execute() queued the error response
                    self._active.pop(item[1].rid, None)
                elif kind == "stop":
                    stop = True
            except Exception:  # noqa: BLE001
                traceback.print_exc()
            taken += 1
            if taken >= _MAX_BATCH:    # the rest waits for the next pass: a send must come between
                break
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                break
        if got_deltas:
            self._load.wakeups += 1
        return stop

    def _send_error(self, sender, msg, code):
        if sender is None:
            return
        try:
            sender.send(_error_response(msg, code), flags=_FINAL)
        except Exception:  # noqa: BLE001
            traceback.print_exc()

    def _close(self, job, outcome):
        job.done = True
        self._active.pop(job.rid, None)
        self.metrics.finished(outcome)

    def _fail(self, job, msg, code, outcome):
        """Final error response for ``job`` (once); aborts it in the engine."""
        if job.done:
            return
        try:
            self.engine.abort(job.rid)
        except Exception:  # noqa: BLE001
            pass
        self._close(job, outcome)
        self._send_error(job.sender, msg, code)

    def _sweep_cancelled(self, now):
        for job in list(self._active.values()):
            if job.done or now < job.next_cancel_check:
                continue
            job.next_cancel_check = now + _CANCEL_CHECK_S
            try:
                cancelled = job.sender.is_cancelled()
            except Exception:  # noqa: BLE001
                traceback.print_exc()
                continue
            if cancelled:
                self._fail(job, "request cancelled by the client", pb_utils.TritonError.CANCELLED, "cancelled")

    def _update_gauges(self):
        try:
            s = self.engine.stats()
        except Exception as e:  # noqa: BLE001
            print(f"[deepseek_v4] engine.stats failed: {e!r}", flush=True)
            return
        self._engine_steps = getattr(s, "steps", 0)
        # the request gauges before the block gauges: a scrape can land between two sets, and one that already
        # sees a pass's block count must see that pass's request counts too (0 blocks in use -> 0 running)
        for metric, attr in ((self.metrics.waiting, "num_waiting"), (self.metrics.running, "num_running"),
                             (self.metrics.kv_in_use, "kv_blocks_in_use"), (self.metrics.kv_total, "kv_blocks_total")):
            v = getattr(s, attr, None)
            if v is not None:
                metric.set(float(v))

    def _response(self, job, text, token_ids, logprobs, n_prompt, n_out, finish_reason):
        outs = [pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_))]
        w = job.want
        if w["return_finish_reason"]:
            outs.append(pb_utils.Tensor("finish_reason", np.array([str(finish_reason).encode()], dtype=np.object_)))
        if w["return_num_input_tokens"]:
            outs.append(pb_utils.Tensor("num_input_tokens", np.array([n_prompt], dtype=np.uint32)))
        if w["return_num_output_tokens"]:
            outs.append(pb_utils.Tensor("num_output_tokens", np.array([n_out], dtype=np.uint32)))
        if w["output_ids"]:
            outs.append(pb_utils.Tensor("output_ids", np.array(token_ids, dtype=np.int32)))
        if w["logprobs"]:
            outs.append(pb_utils.Tensor("logprobs", np.array(logprobs or [], dtype=np.float32)))
        return pb_utils.InferenceResponse(output_tensors=outs)

    def _deliver(self, job, outs):
        """Send the deltas that arrived for ``job`` since the last wake-up (merged into one response if several)."""
        if job.done:
            return
        # metrics use the arrival time of each delta; ITL is observed once per request, when it finishes (every
        # metric call is an IPC round trip: one per response took a fifth of the dispatcher's time at load)
        n_new = 0
        first_t = last_t = None
        for out, t in outs:
            job.n_prompt = out.num_prompt_tokens
            if out.token_ids:
                n_new += len(out.token_ids)
                first_t = t if first_t is None else first_t
                last_t = t
        if n_new:
            if job.last_tok_t is None:
                self.metrics.observe_ttft(first_t - job.t0)
                self.metrics.add_tokens(0, job.n_prompt)
                job.first_tok_t = first_t
            job.last_tok_t = last_t
            job.n_tok += n_new
            self.metrics.add_tokens(n_new)
        last = outs[-1][0]
        for out, _ in outs:
            if out.error or out.finish_reason == "error":
                self._fail(job, f"generation failed: {out.error or 'engine error'}", pb_utils.TritonError.INTERNAL,
                           "error")
                return
        if last.finish_reason == "abort":
            self._fail(job, f"request aborted by the engine{': ' + last.error if last.error else ''}",
                       pb_utils.TritonError.CANCELLED, "abort")
            return
        if last.finished and job.n_tok > 1:
            self.metrics.observe_itl((job.last_tok_t - job.first_tok_t) / (job.n_tok - 1))
        text = "".join(o.text or "" for o, _ in outs)
        ids = [i for o, _ in outs for i in (o.token_ids or ())]
        lps = [x for o, _ in outs for x in (o.logprobs or ())]
        if job.stream:
            if not job.first_sent and job.prepend:
                text = job.prompt + text
            if ids or text or last.finished:
                resp = self._response(job, text, ids, lps, job.n_prompt, len(ids), last.finish_reason)
                if last.finished:
                    self._close(job, last.finish_reason or "stop")
                self._send(job, resp, _FINAL if last.finished else 0)
                job.first_sent = True
        else:
            job.texts.append(text)
            job.ids.extend(ids)
            job.lps.extend(lps)
            if last.finished:
                full = (job.prompt if job.prepend else "") + "".join(job.texts)
                resp = self._response(job, full, job.ids, job.lps, job.n_prompt, last.num_output_tokens,
                                      last.finish_reason)
                self._close(job, last.finish_reason or "stop")
                self._send(job, resp, _FINAL)

    def _send(self, job, resp, flags):
        t = time.perf_counter()
        job.sender.send(resp, flags=flags)
        self._load.send_s += time.perf_counter() - t
        self._load.responses += 1
