"""The engine in a process of its own, behind the same asyncio API as Engine.

Serving a token takes two kinds of Python work: the engine's (forward, sampling, detokenizing)
and the server's (worker messages, SSE chunks, sockets). In one process they take turns on one
GIL, and a busy server streams a quarter fewer tokens than its engine makes. Here the engine
runs in a child process, which sends each tick's events as one message; this process checks
requests, forwards them, and hands events to their streams. (vLLM splits off its engine core
for the same reason.)
"""

import asyncio
import contextlib
import logging
import multiprocessing
import pickle
import signal
import threading
import uuid
from multiprocessing.connection import Connection
from pathlib import Path

from shoal import logs
from shoal.engine.engine import Engine, EngineConfig, Outlet
from shoal.engine.events import Event, RequestStream, Stats, deliver
from shoal.engine.intake import Prompt, Sessions, running_loop
from shoal.engine.params import EngineError, SamplingParams
from shoal.model.matmul import set_threads
from shoal.model.tokenizer import Tokenizer


class Forward:
    """The child's stand-in for a request's stream: its pending events are those sent less those the parent
    says its reader took, so a slow reader's request stops after event_queue_size events, however late
    the parent's word arrives."""

    def __init__(self, request_id: str):
        self.id, self.sent, self.read = request_id, 0, 0

    @property
    def pending(self) -> int:
        return self.sent - self.read


class Relay:
    """The child's side: runs the engine and sends each tick's events, with the snapshot when it changed
    (and, while idle, each second: the disk tier's saves land between ticks)."""

    def __init__(self, engine: Engine, conn: Connection):
        self.engine, self.conn = engine, conn
        self.outlets: dict[str, Forward] = {}
        self._last: dict | None = None
        self._lock = threading.Lock()
        engine.sink = self.send

    def send(self, events: list[tuple[Outlet, Event]]) -> None:
        with self._lock:
            snapshot = self.engine.snapshot()
            if events or snapshot != self._last:
                with contextlib.suppress(OSError):  # the parent is gone: serve() sees it and closes the engine
                    self.conn.send_bytes(pickle.dumps((snapshot, [(o.id, event) for o, event in events]), -1))
                self._last = snapshot
        for outlet, event in events:
            outlet.sent += 1
            if event.kind == "final":
                self.outlets.pop(outlet.id, None)

    def serve(self) -> None:
        """Carry out the parent's commands until it says close or goes away."""
        try:
            while True:
                if not self.conn.poll(1.0):
                    self.send([])
                    continue
                msg = self.conn.recv()
                if msg[0] == "close":
                    break
                kind, key, *args = msg  # key: the request's id, or end_session's session id
                if kind == "add":
                    outlet = self.outlets[key] = Forward(key)
                    self.engine.add(outlet, *args)
                elif kind == "cancel":
                    self.engine.cancel(key)
                elif kind == "end_session":
                    self.engine.end_session(key)
                elif kind == "read" and key in self.outlets:
                    self.outlets[key].read = args[0]
        except EOFError:
            pass
        finally:
            self.engine.close()


def child_main(conn: Connection, path: str, config: EngineConfig, threads: int | None,
               log_level: int | None = None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the parent closes us
    if log_level is not None:  # a spawned process starts with no handlers: it logs as its parent was set up to
        logs.configure(log_level)
    if threads:
        set_threads(threads)
    try:
        engine = Engine.from_dir(path, config)
    except Exception as e:
        try:
            conn.send(("error", e))
        except (pickle.PicklingError, TypeError, AttributeError):
            conn.send(("error", EngineError(f"{type(e).__name__}: {e}")))
        return
    relay = Relay(engine, conn)
    conn.send(("ready", engine.bounds, engine.describe()))
    relay.serve()


class ProcessStream(RequestStream):
    """A request's stream in the parent; each half queue of events its reader takes, it tells the child."""

    def __init__(self, request_id: str, prompt_ids: list[int], loop: asyncio.AbstractEventLoop, front: "EngineProcess",
                 session_id: str | None):
        super().__init__(request_id, prompt_ids, loop, front.cancel)
        self.front, self.session_id = front, session_id
        self.read = self.told = 0

    async def __anext__(self) -> Event:
        event = await super().__anext__()
        self.read += 1
        if self.read - self.told >= max(1, self.front.config.event_queue_size // 2):
            self.told = self.read
            self.front.took(self.id, self.read)
        return event


class EngineProcess:
    """Engine's asyncio API (submit, cancel, end_session, snapshot, describe, close) over an engine in a child
    process. Requests are checked here, against the child's bounds, so a bad one fails at submit as with Engine."""

    def __init__(self, path: str | Path, config: EngineConfig | None = None, threads: int | None = None):
        self.config = config or EngineConfig()
        self.tokenizer = Tokenizer.from_dir(path)
        context = multiprocessing.get_context("spawn")  # torch's threads do not survive a fork
        self._conn, child = context.Pipe()
        shoal = logging.getLogger("shoal")
        self._process = context.Process(target=child_main, name="shoal-engine", daemon=True, args=(
            child, str(path), self.config, threads, shoal.level if shoal.handlers else None))
        self._process.start()
        child.close()
        try:
            reply = self._conn.recv()
        except EOFError as e:
            raise EngineError(f"the engine process exited while loading {path}") from e
        if reply[0] == "error":
            raise reply[1]
        _, self.bounds, self._description = reply
        self.sessions = Sessions()
        self._streams: dict[str, ProcessStream] = {}
        self._snapshot: dict = {}
        self._lock = threading.Lock()
        self._exited: str | None = None
        self._reader = threading.Thread(target=self._read, name="shoal-engine-reader", daemon=True)
        self._reader.start()

    @property
    def context_len(self) -> int:
        return self.bounds.context_len

    def describe(self) -> dict:
        return dict(self._description)

    def submit(self, prompt: Prompt, params: SamplingParams | None = None, *, session_id: str | None = None,
               parent_key: str | None = None, priority: int = 0, request_id: str | None = None) -> RequestStream:
        loop = running_loop()
        ids, params = self.bounds.admit(self.tokenizer, prompt, params or SamplingParams(), parent_key)
        self.sessions.claim(session_id)
        stream = ProcessStream(request_id or uuid.uuid4().hex, ids, loop, self, session_id)
        self._streams[stream.id] = stream
        self._send(("add", stream.id, ids, params, priority, session_id, parent_key))  # to a dead child: a no-op
        if self._exited is not None:
            self._streams.pop(stream.id, None)
            self.sessions.release(session_id)
            raise EngineError(self._exited)
        return stream

    def cancel(self, request_id: str) -> None:
        self._send(("cancel", request_id))

    def end_session(self, session_id: str) -> None:
        self._send(("end_session", session_id))

    def snapshot(self) -> dict:
        return dict(self._snapshot)

    def close(self) -> None:
        """Stop the child; its requests still in flight end with `cancelled`."""
        self._send(("close", None))
        self._process.join(timeout=60)
        if self._process.is_alive():
            self._process.kill()
        self._reader.join(timeout=10)

    def took(self, request_id: str, read: int) -> None:
        """Tell the child how many of the request's events its reader has taken."""
        self._send(("read", request_id, read))

    def _send(self, msg: tuple) -> None:
        with self._lock:  # the event loop's thread and the reader's (cancelling abandoned requests) both send
            try:
                self._conn.send(msg)
            except OSError:
                self._exited = self._exited or "the engine process has exited"

    def _read(self) -> None:
        try:
            while True:
                self._snapshot, events = pickle.loads(self._conn.recv_bytes())
                batch = [(self._streams[rid], event) for rid, event in events if rid in self._streams]
                for stream, event in batch:
                    if event.kind == "final":  # before its reader sees it, so that the session's next request may go
                        self._streams.pop(stream.id, None)
                        self.sessions.release(stream.session_id)
                deliver(batch)
        except (EOFError, OSError):
            self._exited = "the engine process has exited"
            deliver([(s, Event("final", stats=failed(s, self._exited))) for s in list(self._streams.values())])
            self._streams.clear()


def failed(stream: RequestStream, error: str) -> Stats:
    return Stats(stream.id, "error", "FAILED", len(stream.prompt_ids), 0, "cold", {"read": 0, "created": 0},
                 0.0, 0.0, 0.0, None, {}, error=error)
