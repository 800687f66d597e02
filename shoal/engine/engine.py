import hashlib
import itertools
import json
import logging
import queue
import secrets
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import torch

from shoal.engine.blocks import BlockManager
from shoal.engine.disk import DiskCache
from shoal.engine.events import Event, RequestStream, Stats, deliver
from shoal.engine.intake import Bounds, Prompt, Sessions, running_loop
from shoal.engine.params import EngineError, SamplingParams
from shoal.engine.runner import Runner, num_blocks_for
from shoal.engine.sampler import Sampler
from shoal.engine.saves import Saver
from shoal.engine.scheduler import Scheduler
from shoal.engine.sequence import Sequence, State, at_length, ends_on
from shoal.engine.stream import TextStream, marker_ids
from shoal.model import Transformer, load_model, openmp
from shoal.model.kv import BLOCK_SIZE
from shoal.model.matmul import take_threads
from shoal.model.tokenizer import Tokenizer

log = logging.getLogger("shoal.engine")


@dataclass
class EngineConfig:
    n_batch: int | None = None  # tokens a tick; None: 512 on a CPU, 2048 on a GPU (see Engine.__init__)
    prefill_chunk_size: int | None = None
    n_seq_max: int = 16
    kv_cache_mb: float = 256
    event_queue_size: int = 64
    stall_timeout_s: float = 30.0
    kv_disk_dir: str | None = None  # the prefix cache's disk tier; None: RAM only
    kv_disk_gb: float = 4.0
    save_min_tokens: int = 64
    continued_every: int = 256
    dtype: str | None = None  # the model's: float32, bfloat16 or float16; None: load_model's choice (resolve_dtype)
    packed_copies: bool = True  # on a CPU, packed copies of weights for batched products, memory allowing (matmul.py)
    cuda_graphs: bool = True  # on a GPU, replay ticks of at most n_seq_max tokens as CUDA graphs (model/graphs.py)

    @property
    def chunk(self) -> int:
        return self.prefill_chunk_size or max(64, self.n_batch // 4)


def fingerprint(model: Transformer) -> bytes:
    """Tells models (and layer ranges, and dtypes) apart, so two never share a prefix-cache key."""
    h = hashlib.blake2b(json.dumps(vars(model.config), sort_keys=True, default=str).encode(), digest_size=16)
    h.update(f"{model.start}:{model.end}:{model.dtype}".encode())
    for name, p in model.state_dict().items():
        p = p.to_dense() if p.is_mkldnn else p  # a weight packed for oneDNN (model/matmul.py) keys as it loaded
        h.update(name.encode() + p.flatten()[:256].float().cpu().numpy().tobytes())
    return h.digest()


class Outlet(Protocol):
    """Where a request's events go: its RequestStream, or a stand-in that forwards them to another process."""

    id: str

    @property
    def pending(self) -> int: ...


Sink = Callable[[list[tuple[Outlet, Event]]], None]


class Engine:
    """Continuous batching for one model: an asyncio API in front of a dedicated model thread.

    `sink`, when set before the first request, takes each tick's events in the model thread instead
    of the requests' streams (an EngineProcess child forwards them).
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer, config: EngineConfig | None = None):
        config = config or EngineConfig()
        if config.n_batch is None:
            # A GPU tick costs mostly the launching of its kernels, whatever its size: a tick of 512 tokens took
            # 61 ms on an H100 for a 0.5B model, so it takes fewer, larger ones
            config = replace(config, n_batch=2048 if model.device.type == "cuda" else 512)
        self.model, self.tokenizer, self.config = model, tokenizer, config
        c = self.config
        if c.n_batch < c.n_seq_max:
            raise EngineError(f"n_batch ({c.n_batch}) must be at least n_seq_max ({c.n_seq_max})")
        num_blocks = num_blocks_for(model, c.kv_cache_mb, BLOCK_SIZE)
        if num_blocks < 2:
            raise EngineError(f"kv_cache_mb={c.kv_cache_mb} holds fewer than 2 KV blocks for this model")
        self.blocks = BlockManager(num_blocks, BLOCK_SIZE, fingerprint(model))
        self.scheduler = Scheduler(self.blocks, c.n_batch, c.chunk, c.n_seq_max)
        self.runner = Runner(model, num_blocks, BLOCK_SIZE, c.n_seq_max, c.cuda_graphs)
        self.saver: Saver | None = None
        if c.kv_disk_dir is not None:
            disk = DiskCache(c.kv_disk_dir, int(c.kv_disk_gb * 2**30), self.blocks.root.hex())
            self.saver = Saver(disk, self.blocks, self.runner.kv, c.save_min_tokens, c.continued_every)
            self.scheduler.restore = self.saver.restore
            self.scheduler.on_evict = lambda seq: self.saver.finish(seq, self._finish_key(seq), True, "evict")
            self.blocks.on_evict = self.saver.evict
        self.sampler = Sampler(tokenizer.eos_token_ids)
        self.markers = marker_ids(tokenizer)
        self.bounds = Bounds(model.config.vocab_size, self.context_len, BLOCK_SIZE * num_blocks, c.kv_cache_mb,
                             self.blocks.root, BLOCK_SIZE)
        self.sessions = Sessions()
        self.sink: Sink | None = None
        self._commands: queue.Queue[Callable[[], None]] = queue.Queue()
        self._requests: dict[str, tuple[Sequence, Outlet, TextStream]] = {}
        self._ended_sessions: set[str] = set()
        self._arrivals = itertools.count(1)
        self._recent: deque[tuple[float, int]] = deque()
        self._last_hit = {"kind": None, "prefix_len": 0}
        self._phase = "idle"
        self._snapshot: dict = {}
        self._outbox: list[tuple[Outlet, Event]] = []
        self._stopped = False
        self._publish([])
        self._thread = threading.Thread(target=self._loop, name="shoal-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_dir(cls, path: str | Path, config: EngineConfig | None = None) -> "Engine":
        config = config or EngineConfig()
        model = load_model(path, dtype=config.dtype, packed_copies=config.packed_copies)
        return cls(model, Tokenizer.from_dir(path), config)

    @property
    def context_len(self) -> int:
        return self.model.config.max_position_embeddings

    def describe(self) -> dict:
        """What a worker announces of the model it serves."""
        return {**self.model.describe(), "context": self.context_len}

    # asyncio side ---------------------------------------------------------------------------

    def submit(self, prompt: Prompt, params: SamplingParams | None = None, *, session_id: str | None = None,
               parent_key: str | None = None, priority: int = 0, request_id: str | None = None) -> RequestStream:
        """Queue a request (from a running event loop) and return its event stream."""
        loop = running_loop()
        ids, params = self.bounds.admit(self.tokenizer, prompt, params or SamplingParams(), parent_key)
        self.sessions.claim(session_id)
        stream = RequestStream(request_id or uuid.uuid4().hex, ids, loop, self.cancel)
        self.add(stream, ids, params, priority, session_id, parent_key)
        return stream

    def add(self, outlet: Outlet, ids: list[int], params: SamplingParams, priority: int = 0,
            session_id: str | None = None, parent_key: str | None = None) -> None:
        """Queue an admitted request (see Bounds.admit) whose events go to `outlet`; callable from any thread, whose
        OpenMP workers, if it has any, end (see model/openmp.py)."""
        if threading.current_thread() is not self._thread:
            openmp.release()
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        seq = Sequence(outlet.id, list(ids), params, torch.Generator().manual_seed(seed), priority, session_id,
                       arrival=next(self._arrivals), parent_key=parent_key)
        text = TextStream(self.tokenizer, params.stop, self.markers)
        self._commands.put(lambda: self._add(seq, outlet, text))

    def cancel(self, request_id: str) -> None:
        self._commands.put(lambda: self._finish_id(request_id, "cancelled"))

    def end_session(self, session_id: str) -> None:
        """Release the session's pinned sequence; a request of it still in flight will not pin again."""
        self._commands.put(lambda: self._end_session(session_id))

    def snapshot(self) -> dict:
        """The engine's state as of its last tick, and the disk tier's as of now; never waits for the model thread."""
        snap = dict(self._snapshot, pending_len=self._snapshot["pending_len"] + self._commands.qsize())
        if self.saver is not None:  # saves land after the tick that queued them
            snap["kv_disk"] = self.saver.stats()
        return snap

    def close(self) -> None:
        """Stop the model thread; requests still in flight end with `cancelled`."""
        if self._thread.is_alive():
            self._commands.put(self._shutdown)
            self._thread.join()

    # model thread ---------------------------------------------------------------------------

    def _loop(self) -> None:
        take_threads()
        while True:
            self._drain(block=False)
            if self._stopped:
                break
            self._expire()
            batch = self.scheduler.schedule()
            if batch:
                self._step(batch)
            self._publish(batch)
            self._deliver()  # after the snapshot, so a reader never sees it lag an event
            if not batch:  # wait for a command; the next pass publishes what it did
                self._drain(block=True, timeout=0.005 if self._requests else None)
        self._deliver()  # what the shutdown ended

    def _deliver(self) -> None:
        if self.sink is not None:
            self.sink(self._outbox)
        else:
            deliver(self._outbox)
        self._outbox = []

    def _step(self, batch: list[tuple[Sequence, int]]) -> None:
        self.runner.copy(self.scheduler.take_copies())
        try:
            seqs, logits = self.runner.forward(batch)
        except Exception as e:
            log.exception("forward failed")
            for seq, _ in batch:
                self._finish(seq, "error", f"forward failed: {e!r}")
            return
        self._postprocess(batch, seqs, logits)

    def _drain(self, block: bool, timeout: float | None = None) -> None:
        try:
            command = self._commands.get(block=block, timeout=timeout)
            while True:
                command()
                command = self._commands.get_nowait()
        except queue.Empty:
            pass

    def _shutdown(self) -> None:
        for seq, _, _ in list(self._requests.values()):
            self._finish(seq, "cancelled", "the engine was closed")
        if self.saver is not None:
            for seq in self.scheduler.sessions.values():
                self.saver.finish(seq, self._finish_key(seq), True, "shutdown")
            self.saver.close()
        self._stopped = True

    def _end_session(self, session_id: str) -> None:
        self.scheduler.end_session(session_id)
        if any(seq.session_id == session_id for seq, _, _ in self._requests.values()):
            self._ended_sessions.add(session_id)

    def _add(self, seq: Sequence, stream: Outlet, text: TextStream) -> None:
        self._requests[seq.id] = (seq, stream, text)
        self.scheduler.add(seq)

    def _expire(self) -> None:
        now = time.monotonic()
        for seq, stream, _ in list(self._requests.values()):
            if seq.params.timeout_s and now - seq.times[State.RECEIVED.value] > seq.params.timeout_s:
                self._finish(seq, "timeout", f"the request ran past timeout_s={seq.params.timeout_s}")
            elif stream.pending < self.config.event_queue_size:
                seq.paused_since = None
            elif seq.paused_since is None:
                seq.paused_since = now
            elif now - seq.paused_since > self.config.stall_timeout_s:
                self._finish(seq, "timeout", f"the client read nothing for {self.config.stall_timeout_s} s")

    def _postprocess(self, batch: list[tuple[Sequence, int]], seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Advance the batch's sequences; sample the next token of those with logits (seqs, rows of logits)."""
        rows = dict(zip(seqs, logits, strict=True))
        try:
            together = self._sample_together(seqs, logits)
        except Exception:
            log.exception("batched sampling failed; sampling one by one")
            together = {}
        for seq, n in batch:
            seq.num_computed += n
            self.blocks.register(seq)
            if seq.state != State.ACTIVE:
                seq.mark(State.ACTIVE)
                self._last_hit = {"kind": seq.cache_hit_kind, "prefix_len": seq.cached_tokens}
            if seq in rows:
                try:
                    self._append(seq, together.get(seq) or self.sampler.sample(rows[seq].cpu(), seq))
                except Exception as e:
                    log.exception("sampling failed for %s", seq.id)
                    self._finish(seq, "error", f"sampling failed: {e!r}")

    def _sample_together(self, seqs: list[Sequence], logits: torch.Tensor) -> dict[Sequence, tuple[int, None]]:
        """The tokens of the sequences that set nothing but a temperature, in one batched pass; the others are
        sampled one by one, so that an error fails its own request only."""
        plain = [i for i, seq in enumerate(seqs) if self.sampler.plain(seq)]
        if not plain:
            return {}
        chosen = [seqs[i] for i in plain]
        rows = logits if len(plain) == len(seqs) else logits[torch.tensor(plain, device=logits.device)]
        tokens = self.sampler.sample_plain(rows, chosen)
        return {seq: (token, None) for seq, token in zip(chosen, tokens, strict=True)}

    def _append(self, seq: Sequence, sampled: tuple[int, dict | None]) -> None:
        _, stream, text = self._requests[seq.id]
        token, logprobs = sampled
        seq.token_ids.append(token)
        seq.times.setdefault("FIRST_TOKEN", time.monotonic())
        self._recent.append((time.monotonic(), 1))
        if ends_on(token, seq.params, self.tokenizer.eos_token_ids):
            self._finish(seq, "stop")
            return
        events = [Event(kind, t) for kind, t in text.push(token)] or [Event(text.kind)]
        events[0].token_ids, events[0].logprobs = [token], None if logprobs is None else [logprobs]
        self._outbox += [(stream, event) for event in events]
        if self.saver is not None:
            self.saver.after_token(seq)
        if text.stopped is not None:
            self._finish(seq, "stop")
        elif at_length(seq, self.context_len):
            self._finish(seq, "length")

    def _finish_id(self, request_id: str, reason: str) -> None:
        if request_id in self._requests:
            self._finish(self._requests[request_id][0], reason)

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        _, stream, text = self._requests.pop(seq.id)
        ended = seq.session_id in self._ended_sessions
        self._ended_sessions.discard(seq.session_id)
        if self.saver is not None and reason != "error" and seq.block_table:
            self.saver.finish(seq, self._finish_key(seq))
        self.scheduler.finish(seq, pin=reason != "error" and not ended)
        self.sessions.release(seq.session_id)
        self._outbox += [(stream, Event(kind, t)) for kind, t in text.flush()]
        seq.mark(State.FAILED if reason in ("error", "timeout") else State.COMPLETED)
        self._outbox.append((stream, Event("final", stats=self._stats(seq, reason, error, text.stopped))))

    def _stats(self, seq: Sequence, reason: str, error: str | None, stop: str | None) -> Stats:
        t = seq.times
        end = t.get(State.COMPLETED.value, t.get(State.FAILED.value))
        scheduled = t.get(State.SCHEDULED.value, end)
        first = t.get("FIRST_TOKEN", end)
        return Stats(seq.id, reason, seq.state.value, seq.num_prompt_tokens, len(seq.completion_ids),
                     seq.cache_hit_kind, {"read": seq.cached_tokens, "created": seq.created_tokens},
                     1000 * (scheduled - t[State.RECEIVED.value]), 1000 * (first - scheduled), 1000 * (end - first),
                     self._finish_key(seq), dict(t), seq.preemptions, error, stop)

    def _finish_key(self, seq: Sequence) -> str:
        return self.blocks.keys(seq.token_ids)[-1]

    def _publish(self, batch: list[tuple[Sequence, int]]) -> None:
        now = time.monotonic()
        while self._recent and now - self._recent[0][0] > 5:
            self._recent.popleft()
        span = now - self._recent[0][0] if len(self._recent) > 1 else 0
        if batch:
            self._phase = "prefilling" if any(n > 1 for _, n in batch) else "generating"
        waiting, running = len(self.scheduler.waiting), len(self.scheduler.running)
        b = self.blocks
        self._snapshot = {
            "phase": self._phase if waiting + running else "idle",
            "pending_len": waiting, "running": running, "queue_depth": waiting + running,
            "kv_blocks_used": b.num_used, "kv_blocks_free": b.num_free,
            "prefix_cache_hit_rate": b.hit_tokens / b.queried_tokens if b.queried_tokens else 0.0,
            "last_cache_hit": dict(self._last_hit),
            "tokens_per_s": len(self._recent) / span if span else 0.0,
            "sessions_pinned": len(self.scheduler.sessions),
        }
