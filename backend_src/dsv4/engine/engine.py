"""The engine: loads a checkpoint, owns the scheduler, cache and model, and runs them on its own loop thread.

Callers (Triton's model.py, the CLI, tests) use three thread-safe calls: `add_request` (validates synchronously,
returns a `RequestStream` of deltas), `abort`, `shutdown`. An exception inside a step fails the requests of that
step with the error and frees their cache; the engine keeps serving the others.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Callable

import torch
from tokenizers import Tokenizer

from dsv4.checkpoint.loader import load_checkpoint
from dsv4.config import EngineConfig, ceil_div
from dsv4.engine.detokenizer import IncrementalDetokenizer
from dsv4.engine.kv_cache import KVCache
from dsv4.engine.params import SamplingParams
from dsv4.engine.prompt import PromptProcessor
from dsv4.engine.decode_inputs import PendingTokens
from dsv4.engine.request import PENDING_TOKEN, RequestOutput, RequestStream, Sequence, Status
from dsv4.engine.cuda_graphs import DecodeGraphs, bucket_sizes
from dsv4.engine.mixed_graphs import MixedGraphs, token_buckets
from dsv4.engine.readback import PendingReadback, TokenReadback
from dsv4.engine.runner import ModelRunner
from dsv4.engine.sampler import Sampler, make_generator
from dsv4.engine.scheduler import ScheduledStep, Scheduler
from dsv4.engine.stop import StopChecker
from dsv4.errors import ConfigError, EngineDeadError, InvalidRequestError
from dsv4.model.deepseek_v4 import DeepseekV4Model
from dsv4.ops import select_ops

log = logging.getLogger("dsv4.engine")


# Decode steps a request waits (at most) to be admitted with others while CUDA graphs serve the decode steps: a
# step with prompt tokens cost ~10 decode steps of the `small` model on an H100 eagerly, 3-5 through the piecewise
# graphs (docs/PERF.md); with those, 0/2/4/8 measured alike at c=32 under desynchronised arrivals and 8 best at c=64.
# Whole-step graphs (session 24) brought such a step to ~2-3 decode steps; not re-tuned since
AUTO_MAX_WAITING_STEPS = 8


@dataclass
class _InFlight:
    """A launched step whose sampled tokens the host has not read yet."""

    seqs: list[Sequence]          # the sequences that sample in it, in the order of `tokens`
    slots: list[int]              # index of each one's PENDING_TOKEN in its output_ids
    tokens: torch.Tensor          # [n] sampled ids (device): the next step may take them from there
    readback: PendingReadback     # the same ids and their logprobs, on their way to the host


@dataclass
class EngineStats:
    num_waiting: int
    num_running: int
    kv_blocks_in_use: int
    kv_blocks_total: int
    num_preemptions: int
    steps: int
    graph_steps: int = 0           # decode steps replayed from a CUDA graph
    mixed_graph_steps: int = 0     # steps with prompt tokens run through CUDA graphs (piecewise or whole)
    whole_graph_steps: int = 0     # of those, steps replayed as one graph (cuda_graph_full_max_tokens)
    overlapped_prompt_steps: int = 0  # steps with prompt tokens launched before the previous step was read
    overlapped_steps: int = 0      # steps launched before the previous step's tokens were read
    cuda_graph_sizes: tuple[int, ...] = ()


class Engine:
    def __init__(self, config: EngineConfig, *, after_step: Callable[[], None] | None = None):
        """`after_step`, if given, is called on the engine thread after every loop iteration (a step, or aborts
        handled) and once when the loop ends: the engine process sends the iteration's deltas from there."""
        self.config = config
        self._after_step = after_step
        self.device = _pick_device(config.device)
        self.dtype = _pick_dtype(config.dtype, self.device)
        ckpt = load_checkpoint(config.checkpoint, progress=False)
        self.model_config = cfg = ckpt.config
        self.tokenizer = Tokenizer.from_file(str(ckpt.tokenizer_path))
        self.prompts = PromptProcessor(self.tokenizer, cfg.vocab_size, cfg.bos_token_id, config.max_model_len)
        if config.max_model_len > cfg.max_position_embeddings:
            raise ConfigError(f"engine setting 'max_model_len'={config.max_model_len} exceeds the model's "
                              f"max_position_embeddings={cfg.max_position_embeddings}")
        self.ops = select_ops(config.ops_backend, self.device, self.dtype)
        self.model = DeepseekV4Model(cfg, ckpt.tensors, self.ops, self.device, self.dtype)
        del ckpt
        num_blocks = config.num_kv_blocks or KVCache.blocks_for_budget(
            cfg, config.block_size, self.dtype, config.kv_cache_memory_bytes, config.max_num_seqs,
            config.fp8_kv_cache)
        need = ceil_div(config.max_model_len, config.block_size)
        if num_blocks < need:
            raise ConfigError(f"the KV cache has {num_blocks} blocks of {config.block_size} tokens but one request "
                              f"of max_model_len={config.max_model_len} needs {need}: raise num_kv_blocks / "
                              "kv_cache_memory_bytes or lower max_model_len")
        self.cache = KVCache(cfg, num_blocks, config.block_size, config.max_num_seqs, self.device, self.dtype,
                             fp8=config.fp8_kv_cache)
        self.scheduler = Scheduler(self.cache, config.max_num_seqs, config.max_num_batched_tokens)
        self.ops.reserve_positions(config.max_model_len)
        self.runner = ModelRunner(self.model, self.cache, self.device, config.max_model_len,
                                  self._capture_graphs(config), self._capture_mixed_graphs(config))
        wait = config.max_waiting_steps
        self.scheduler.max_waiting_steps = (AUTO_MAX_WAITING_STEPS if self.runner.graphs else 0) if wait is None else wait
        self.scheduler.waiting_served_ratio = config.waiting_served_ratio
        self.sampler = Sampler()
        self.eos_token_id = cfg.eos_token_id
        self._lock = threading.Condition()
        self._new: list[Sequence] = []
        self._aborts: set[str] = set()
        self._live: dict[str, Sequence] = {}
        self._stopped = False
        self._dead: BaseException | None = None
        self._steps = 0
        self._overlapped_steps = 0
        self._overlapped_prompt_steps = 0
        self._inflight: _InFlight | None = None
        self._readback = TokenReadback(self.device, config.max_num_seqs)
        self._thread = threading.Thread(target=self._loop, name="dsv4-engine", daemon=True)
        self._thread.start()

    def _capture_graphs(self, config: EngineConfig) -> DecodeGraphs | None:
        """Decode CUDA graphs where they apply; a capture that fails is logged and the engine runs eagerly."""
        if config.enforce_eager or self.device.type != "cuda":
            return None
        if not self.ops.supports_cuda_graphs:
            log.warning("ops backend %r cannot be captured in CUDA graphs: decode runs eagerly", self.ops.name)
            return None
        sizes = bucket_sizes(min(config.cuda_graph_max_batch or config.max_num_seqs, config.max_num_seqs))
        graphs = DecodeGraphs(self.model, self.cache.layers, self.device, sizes, config.max_model_len,
                              config.block_size)
        try:
            graphs.capture()
        except Exception as e:  # noqa: BLE001 - serving eagerly beats not serving
            log.warning("CUDA graph capture failed, decode runs eagerly: %s\n%s", e, traceback.format_exc())
            return None
        return graphs

    def _capture_mixed_graphs(self, config: EngineConfig) -> MixedGraphs | None:
        """Piecewise graphs of steps with prompt tokens (engine.mixed_graphs); a failed capture is logged and those
        steps run eagerly."""
        if config.enforce_eager or self.device.type != "cuda" or not self.ops.supports_cuda_graphs:
            return None
        limit = config.cuda_graph_max_tokens
        limit = min(1024, config.max_num_batched_tokens) if limit is None else min(limit, config.max_num_batched_tokens)
        if limit == 0:
            return None
        graphs = MixedGraphs(self.model, self.cache.layers, self.device, token_buckets(limit),
                             whole_max_tokens=config.cuda_graph_full_max_tokens, max_model_len=config.max_model_len,
                             block_size=config.block_size, max_rows=config.max_num_seqs)
        try:
            graphs.prepare()
        except Exception as e:  # noqa: BLE001 - serving eagerly beats not serving
            log.warning("mixed-step CUDA graph capture failed, steps with prompt tokens run eagerly: %s\n%s", e,
                        traceback.format_exc())
            return None
        return graphs

    # --- public API --------------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | None = None, prompt_token_ids: list[int] | None = None,
                    params: SamplingParams | None = None,
                    on_output: Callable[[RequestOutput], None] | None = None) -> RequestStream:
        """Queue a request. Its deltas arrive on the returned stream, or, with `on_output`, are passed to that
        callable on the engine thread (it must be quick and must not raise)."""
        params = params or SamplingParams()
        ids = self.prompts.token_ids(prompt, prompt_token_ids, params)
        stream = RequestStream(request_id, on_output)
        seq = Sequence(request_id=request_id, prompt_ids=ids, params=params, stream=stream,
                       detokenizer=IncrementalDetokenizer(self.tokenizer, ids),
                       stop=StopChecker(params, self.eos_token_id),
                       generator=make_generator(params.seed, self.device))
        with self._lock:
            if self._dead is not None:
                raise EngineDeadError(f"the engine stopped after an internal error: {self._dead}")
            if self._stopped:
                raise EngineDeadError("the engine is shut down")
            if request_id in self._live:
                raise InvalidRequestError(f"request id {request_id!r} is already in use")
            self._live[request_id] = seq
            self._new.append(seq)
            self._lock.notify()
        return stream

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.add(request_id)
            self._lock.notify()

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(num_waiting=len(self.scheduler.waiting) + len(self._new),
                               num_running=len(self.scheduler.running),
                               kv_blocks_in_use=self.cache.blocks_in_use, kv_blocks_total=self.cache.blocks_total,
                               num_preemptions=self.scheduler.num_preemptions, steps=self._steps,
                               graph_steps=self.runner.graph_steps, mixed_graph_steps=self.runner.mixed_graph_steps,
                               whole_graph_steps=self.runner.whole_graph_steps,
                               overlapped_steps=self._overlapped_steps,
                               overlapped_prompt_steps=self._overlapped_prompt_steps,
                               cuda_graph_sizes=tuple(self.runner.graphs.sizes) if self.runner.graphs else ())

    def shutdown(self) -> None:
        with self._lock:
            self._stopped = True
            self._lock.notify()
        self._thread.join(timeout=30)

    def generate(self, prompt: str | None = None, prompt_token_ids: list[int] | None = None,
                 params: SamplingParams | None = None, request_id: str | None = None) -> RequestOutput:
        """Blocking convenience: the whole output as one RequestOutput (text and ids concatenated)."""
        rid = request_id or f"gen-{time.monotonic_ns()}"
        text, ids, lps, last = [], [], [], None
        for out in self.add_request(rid, prompt, prompt_token_ids, params):
            text.append(out.text)
            ids += out.token_ids
            lps += out.logprobs or []
            last = out
        assert last is not None
        return RequestOutput(rid, "".join(text), ids, lps if last.logprobs is not None else None, True,
                             last.finish_reason, last.num_prompt_tokens, last.num_output_tokens, last.error)

    # --- loop --------------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    while not (self._stopped or self._new or self._aborts or self.scheduler.has_work()):
                        self._lock.wait()
                    if self._stopped:
                        break
                    for seq in self._new:
                        self.scheduler.add(seq)
                    self._new.clear()
                    aborts, self._aborts = self._aborts, set()
                for rid in aborts:
                    seq = self._live.get(rid)
                    if seq is not None:
                        self._finish(seq, "abort")
                if self.scheduler.has_work():
                    self._step()
                if self._after_step is not None:
                    self._after_step()
        except BaseException as e:  # noqa: BLE001 - the loop must report, not vanish
            log.exception("engine loop died")
            with self._lock:
                self._dead = e
        finally:
            with self._lock:
                pending = list(self._live.values()) + self._new
                self._new.clear()
            for seq in pending:
                if seq.status is not Status.FINISHED:
                    self._finish(seq, "abort" if self._dead is None else "error",
                                 error=None if self._dead is None else f"engine stopped: {self._dead}")
            if self._after_step is not None:
                self._after_step()

    # --- one step; decode steps run one ahead of the host ------------------------------------------------------
    # A decode step is launched before the host reads the tokens of the step before it: those tokens stay on the
    # GPU and the new step takes them from there (PendingTokens), while the host turns the previous step's tokens
    # into text, stop checks and deltas. Each sequence's slot for a token still on the GPU holds PENDING_TOKEN.
    # Steps with prompt tokens (admissions, prefill chunks) run ahead too (`async_prefill`): their decode rows take
    # the pending tokens on the device like a decode step's. Steps that might preempt wait for the previous step's
    # results first (a preempted sequence is recomputed from its tokens on the host). A sequence that turns out to
    # have finished in the step being read has one extra token computed in the step already launched; it is dropped.
    def _step(self) -> None:
        if self._inflight is not None and not (self.config.async_scheduling and self._can_run_ahead()):
            self._drain()
        step = self.scheduler.schedule()
        if step.empty:
            self._drain()
            return
        launched = None
        prompt = step.num_tokens.count(1) != len(step.num_tokens)
        try:
            ran = self.runner.execute(step, self._pending_inputs(step))
            seqs = [step.seqs[k] for k in ran.sampling]
            if seqs:
                out = self.sampler.sample(ran.logits, [s.params for s in seqs], [s.generator for s in seqs],
                                          suppress_token_ids=[s.stop.suppressed_token_ids(s.num_pending)
                                                              for s in seqs], precomputed=ran.greedy)
                launched = _InFlight(seqs, [len(s.output_ids) for s in seqs], out.token_ids,
                                     self._readback.start(out.token_ids, out.logprobs))
                for s in seqs:
                    s.output_ids.append(PENDING_TOKEN)
                    s.num_pending += 1
        except Exception as e:  # noqa: BLE001 - one bad step fails its requests, not the engine
            log.error("step failed: %s\n%s", e, traceback.format_exc())
            for seq in step.seqs:
                if seq.status is not Status.FINISHED:
                    self._finish(seq, "error", error=f"internal error while running the model: {e}")
        if self._inflight is not None:
            self._overlapped_steps += 1
            self._overlapped_prompt_steps += prompt
        self._drain()
        self._inflight = launched
        self._steps += 1

    def _can_run_ahead(self) -> bool:
        """Whether the next schedule() may run before the host has read the in-flight step's tokens: it must not
        preempt (a preempted sequence is recomputed from its tokens on the host), and every running sequence must
        fit the token budget. Without `async_prefill` it must also be a decode step of every running sequence with
        no admission. (The tokens still on the GPU are only ever inputs of decode rows: runner.execute takes them
        there, for steps with prompt tokens too.)"""
        sch = self.scheduler
        if len(sch.running) > sch.max_num_batched_tokens:
            return False
        mixed = self.config.async_prefill
        if not mixed and sch.admission_due():
            return False
        need = 0
        for seq in sch.running:
            if seq.num_uncomputed != 1 and not mixed:
                return False
            need += self.cache.blocks_needed(seq.request_id, seq.num_tokens)
        return need <= min(self.cache.window.num_free, self.cache.compressed.num_free)

    def _pending_inputs(self, step: ScheduledStep) -> PendingTokens | None:
        fl = self._inflight
        if fl is None:
            return None
        where = {id(s): i for i, s in enumerate(fl.seqs)}
        rows, src = [], []
        for r, seq in enumerate(step.seqs):
            if seq.num_pending:
                rows.append(r)
                src.append(where[id(seq)])
        return PendingTokens(rows, src, fl.tokens) if rows else None

    def _drain(self) -> None:
        """Read the in-flight step's tokens (waits for the GPU) and hand them to their sequences."""
        fl, self._inflight = self._inflight, None
        if fl is None:
            return
        try:
            tokens, lps = fl.readback.read()
        except Exception as e:  # noqa: BLE001
            log.error("reading a step's tokens failed: %s\n%s", e, traceback.format_exc())
            for seq in fl.seqs:
                self._finish(seq, "error", error=f"internal error while running the model: {e}")
            return
        now = time.monotonic()
        for seq, slot, tok, lp in zip(fl.seqs, fl.slots, tokens, lps):
            if seq.status is Status.FINISHED:    # finished (or aborted) while this step ran
                continue
            seq.output_ids[slot] = tok
            seq.num_pending -= 1
            self._append(seq, tok, lp, now)

    def _append(self, seq: Sequence, token: int, logprob: float, now: float) -> None:
        if seq.first_token_time is None:
            seq.first_token_time = now
        seq.last_token_time = now
        upd = seq.stop.update(token, seq.detokenizer)  # EOS, stop ids/strings and max_tokens
        self._emit(seq, upd.text, [token], [logprob], upd.finish_reason if upd.finished else None)

    def _emit(self, seq: Sequence, text: str, ids: list[int], lps: list[float], finish: str | None,
              error: str | None = None) -> None:
        if finish is not None and seq.num_pending:      # tokens of a step launched after the one that finished it
            del seq.output_ids[len(seq.output_ids) - seq.num_pending:]
            seq.num_pending = 0
        seq.stream.put(RequestOutput(
            request_id=seq.request_id, text=text, token_ids=ids,
            logprobs=lps if seq.params.logprobs is not None else None, finished=finish is not None,
            finish_reason=finish, num_prompt_tokens=len(seq.prompt_ids), num_output_tokens=seq.num_output_tokens,
            error=error))
        if finish is not None:
            self._release(seq)

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        if seq.status is Status.FINISHED:
            return
        self._emit(seq, "", [], [], reason, error)

    def _release(self, seq: Sequence) -> None:
        self.scheduler.remove(seq)
        with self._lock:
            self._live.pop(seq.request_id, None)


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"engine setting 'device'={name!r} but no CUDA GPU is visible")
    return torch.device(name)


def _pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


__all__ = ["Engine", "EngineStats", "RequestOutput", "RequestStream"]
