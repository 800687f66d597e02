"""A worker's side of route steps: stage_open, stage_in and stage_close served on its StageEngine.

Hidden states and token ids travel as binary frames: the message names dtype and shape, `data`
holds the raw bytes. A step that carries the rest of its route is pushed on to the next hop
(worker/peers.py) as well as answered to the coordinator; a step that arrives twice (pushed, then
relayed by the coordinator after a push it thought had failed) is taken once.
"""

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable

import torch

from shoal.engine.params import EngineError, SamplingParams
from shoal.engine.sampler import logprob_entries
from shoal.engine.stage import StageEngine
from shoal.model.weights import DTYPES as MODEL_DTYPES
from shoal.worker.channel import Message
from shoal.worker.peers import Peers

log = logging.getLogger("shoal.worker")
DTYPES = {**MODEL_DTYPES, "int32": torch.int32}  # what hidden states and token ids travel as


def pack(t: torch.Tensor) -> dict:
    """A tensor as message fields: dtype, shape and its raw bytes (bfloat16 reinterpreted, numpy lacks it)."""
    raw = t.contiguous().cpu()
    raw = raw.view(torch.int16) if raw.dtype == torch.bfloat16 else raw
    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "data": raw.numpy().tobytes()}


def unpack(msg: Message) -> torch.Tensor:
    """The tensor in a message's dtype, shape and data fields; ValueError names what does not add up."""
    dtype = DTYPES.get(msg.get("dtype", ""))
    if dtype is None:
        raise ValueError(f"unknown dtype {msg.get('dtype')!r}; known: {sorted(DTYPES)}")
    shape, data = [int(n) for n in msg["shape"]], bytes(msg["data"])
    if len(data) != dtype.itemsize * int(torch.Size(shape).numel()):
        raise ValueError(f"{len(data)} bytes do not hold a {msg['dtype']} tensor of shape {shape}")
    return torch.frombuffer(bytearray(data), dtype=dtype).view(shape) if data else torch.empty(shape, dtype=dtype)


class StageServer:
    """Serves route steps for the coordinator; every reply names the session and step it answers."""

    def __init__(self, engine: StageEngine, send: Callable[[Message], Awaitable[None]]):
        self.engine, self.send = engine, send
        self.peers = Peers()
        self._tasks: set[asyncio.Task] = set()
        self._secrets: dict[str, str] = {}  # session -> what a push for it must carry
        self._next: dict[str, int] = {}  # session -> the first position not yet taken

    def model_info(self, name: str, fingerprint: str) -> dict:
        model = self.engine.model
        return {"name": name, "layers": [model.start, model.end], "n_layers": model.config.num_hidden_layers,
                "params_b": sum(p.numel() for p in model.parameters()) / 1e9, "context": self.engine.context_len,
                "fingerprint": fingerprint}

    async def measure(self, steps: int = 8) -> float:
        """Milliseconds one layer takes for one decode step, from a short run through every layer held."""
        model, sid = self.engine.model, "measure"
        first = model.start == 0
        self.engine.open(sid, (model.start, model.end), [1, 2, 3, 4], SamplingParams(temperature=0))
        inputs = torch.tensor([1, 2, 3, 4]) if first else torch.zeros(4, model.config.hidden_size)
        await self.engine.step(sid, 0, inputs)
        began = time.perf_counter()
        for i in range(steps):
            await self.engine.step(sid, 4 + i, inputs[:1])
        self.engine.end(sid)
        return round(1000 * (time.perf_counter() - began) / steps / model.num_layers, 3)

    def accept_push(self, msg: Message) -> None:
        """A step pushed by the previous hop: taken only with the session's secret."""
        session = msg.get("session")
        secret = self._secrets.get(session) if isinstance(session, str) else None
        if msg.get("type") != "stage_in" or secret is None or not hmac.compare_digest(
                secret.encode(), str(msg.get("secret")).encode()):
            log.warning("dropping a push without this session's secret", extra={"session": msg.get("session")})
            return
        self.handle(msg)

    def handle(self, msg: Message) -> None:
        if msg["type"] == "stage_in" and not self._take(msg):
            return
        task = asyncio.create_task(self._serve(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()

    def _take(self, msg: Message) -> bool:
        """Whether a step is new: one at an earlier position than the session has taken is a second copy."""
        try:
            session, position, rows = msg["session"], int(msg["position"]), int(msg["shape"][0])
            hash(session)
        except (KeyError, IndexError, TypeError, ValueError):
            return True  # malformed: its step answers with what is wrong
        if position < self._next.get(session, 0):
            return False
        self._next[session] = position + rows
        return True

    async def _push(self, msg: Message, hidden: dict) -> bool:
        """Send this step's output on to the next hop of its route, with the rest of the route."""
        hop, *rest = msg["route"]
        return await self.peers.push(hop["peer"], {
            "type": "stage_in", "session": hop["session"], "step": msg["step"], "position": msg["position"],
            "sample": hop["sample"], "secret": hop["secret"], "route": rest, **hidden})

    async def _serve(self, msg: Message) -> None:
        kind, session = msg["type"], msg.get("session")
        try:
            if kind == "stage_open":
                params = SamplingParams.from_wire(msg["params"]) if msg.get("params") is not None else None
                ids = self.engine.open(session, tuple(msg["layers"]), msg["prompt"], params, msg.get("generated"))
                if msg.get("push_secret"):
                    self._secrets[session] = msg["push_secret"]
                await self.send({"type": "stage_ready", "session": session, "prompt_ids": ids})
            elif kind == "stage_in":
                began = time.perf_counter()
                inputs = unpack(msg)
                out = await self.engine.step(session, int(msg["position"]), inputs.long() if inputs.dtype ==
                                             torch.int32 else inputs, bool(msg.get("sample")))
                hidden = out.pop("hidden", None)
                if hidden is None:
                    out["logprobs"] = logprob_entries(self.engine.tokenizer, [out["logprobs"]] if out["logprobs"]
                                                      else None)
                body = pack(hidden) if hidden is not None else out
                if hidden is not None and msg.get("route"):
                    body["pushed"] = await self._push(msg, body)
                await self.send({"type": "stage_out", "session": session, "step": msg["step"],
                                 "busy_ms": 1000 * (time.perf_counter() - began), **body})
            elif kind == "stage_close":
                self.engine.end(session)
                self._secrets.pop(session, None)
                self._next.pop(session, None)
        except (EngineError, ValueError, TypeError, KeyError) as e:
            await self.send({"type": "stage_error", "session": session, "step": msg.get("step"), "error": str(e)})
