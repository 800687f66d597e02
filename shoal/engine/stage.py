"""A pipeline stage: runs layer ranges of one model for the routed sequences of many jobs.

The coordinator drives each sequence step by step (a prefill chunk or one decode token); every
step that reaches this stage in the same tick joins one batched forward per layer range. The
stage that ends the model samples with the request's own seeded generator, so a replacement
stage that is replayed the same inputs draws the same tokens.

Decode steps run on the event loop's own thread when the model thread is idle: handing a step to a
thread and its answer back costs two cross-thread wake-ups, which on a small range took longer
than the forward itself. Prefill chunks, and anything arriving while the model thread works, go to
the model thread, so a long forward never holds up the loop.
"""

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from shoal.engine.engine import EngineConfig
from shoal.engine.intake import Prompt, tokenize
from shoal.engine.params import EngineError, SamplingParams
from shoal.engine.runner import num_blocks_for
from shoal.engine.sampler import Sampler, draw
from shoal.engine.sequence import Sequence, at_length, ends_on
from shoal.engine.stream import TextStream, marker_ids
from shoal.model import Transformer, load_model
from shoal.model.kv import BLOCK_SIZE, AttentionBatch
from shoal.model.matmul import take_threads
from shoal.model.tokenizer import Tokenizer

log = logging.getLogger("shoal.engine")


@dataclass(eq=False)
class StageSession:
    """One job's KV for layers [start, end) on this stage; on the model's last layers, its sampling state."""

    id: str
    start: int
    end: int
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0
    seq: Sequence | None = None
    text: TextStream | None = None


@dataclass(eq=False)
class Step:
    session_id: str
    position: int
    inputs: torch.Tensor
    sample: bool
    done: Callable[[dict | Exception], None]


Work = Step | Callable[[], None]
Answer = tuple[Step, dict | Exception]
Group = list[tuple[StageSession, Step]]


class StageEngine:
    """Layer ranges of one model for routed sequences: an asyncio API in front of a dedicated model thread."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, config: EngineConfig | None = None):
        self.model, self.tokenizer, self.config = model, tokenizer, config or EngineConfig()
        num_blocks = num_blocks_for(model, self.config.kv_cache_mb, BLOCK_SIZE)
        if num_blocks < 2:
            raise EngineError(f"kv_cache_mb={self.config.kv_cache_mb} holds fewer than 2 KV blocks for this range")
        self.kv = model.new_cache(num_blocks, BLOCK_SIZE)
        self.num_blocks, self.free = num_blocks, list(range(num_blocks))
        self.sampler = Sampler(tokenizer.eos_token_ids)
        self.markers = marker_ids(tokenizer)
        self.sessions: dict[str, StageSession] = {}
        self._inbox: queue.Queue[Work | None] = queue.Queue()
        self._ready: list[Work] = []  # work taken on the loop's thread, run or handed on at its next turn
        self._handed = self._finished = 0  # work items handed to the model thread, and finished by it
        self._thread = threading.Thread(target=self._loop, name="shoal-stage", daemon=True)
        self._thread.start()

    @classmethod
    def from_dir(cls, path: str | Path, layers: tuple[int, int], config: EngineConfig | None = None) -> "StageEngine":
        config = config or EngineConfig()
        model = load_model(path, layers, dtype=config.dtype, packed_copies=config.packed_copies)
        return cls(model, Tokenizer.from_dir(path), config)

    @property
    def context_len(self) -> int:
        return self.model.config.max_position_embeddings

    def describe(self) -> dict:
        return {**self.model.describe(), "context": self.context_len}

    def snapshot(self) -> dict:
        return {"sessions": len(self.sessions), "kv_blocks_free": len(self.free), "kv_blocks": self.num_blocks}

    # asyncio side ---------------------------------------------------------------------------

    def open(self, session_id: str, layers: tuple[int, int], prompt: Prompt, params: SamplingParams | None = None,
             generated: list[int] | None = None) -> list[int]:
        """Start a job's session on layers [start, end) and return its prompt's token ids. On the model's last
        layers, `params` say how to sample; `generated` are tokens an earlier stage already sampled (a
        replacement resumes after them, its generator advanced past their draws)."""
        start, end = layers
        if not self.model.start <= start < end <= self.model.end:
            raise EngineError(f"layers {start}:{end} are not within this stage's {self.model.start}:{self.model.end}")
        ids = tokenize(self.tokenizer, self.model.config.vocab_size, prompt)
        session = StageSession(session_id, start, end)
        if end == self.model.config.num_hidden_layers:
            session.seq, session.text = self._sampling(session_id, ids, params or SamplingParams(), generated or [])
        self._submit(lambda: self.sessions.__setitem__(session_id, session))
        return ids

    async def step(self, session_id: str, position: int, inputs: torch.Tensor, sample: bool = False) -> dict:
        """Run one step of a session: inputs for positions [position, position + n). Returns {"hidden"} (the
        output rows) or, on the model's last layers with `sample`, the sampled token and what it means."""
        loop, caller = asyncio.get_running_loop(), threading.get_ident()
        future = loop.create_future()

        def done(result: dict | Exception) -> None:
            if threading.get_ident() == caller:
                _settle(future, result)
            else:
                loop.call_soon_threadsafe(_settle, future, result)

        self._submit(Step(session_id, position, inputs, sample, done))
        return await future

    def end(self, session_id: str) -> None:
        """Free a session's KV."""
        self._submit(lambda: self._close(session_id))

    def close(self) -> None:
        if self._thread.is_alive():
            self._inbox.put(None)
            self._thread.join()

    def _sampling(self, session_id: str, ids: list[int], params: SamplingParams,
                  generated: list[int]) -> tuple[Sequence, TextStream]:
        params.validate(self.model.config.vocab_size)
        if params.max_tokens is None:
            params = replace(params, max_tokens=self.context_len - len(ids))
        seq = Sequence(session_id, list(ids), params, torch.Generator().manual_seed(params.seed or 0))
        text = TextStream(self.tokenizer, params.stop, self.markers)
        for token in generated:  # replay what was sampled before, so the generator and the text are where they were
            if params.temperature > 0:
                draw(seq.generator)
            seq.token_ids.append(token)
            text.push(token)
        return seq, text

    def _submit(self, work: Work) -> None:
        """Take work in order; at the loop's next turn it runs there or goes to the model thread (`_dispatch`).
        Outside a running loop it goes straight to the model thread."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._hand([work])
            return
        self._ready.append(work)
        if len(self._ready) == 1:  # work taken in the same turn (steps of concurrent sequences) runs as one batch
            loop.call_soon(self._dispatch)

    def _dispatch(self) -> None:
        work, self._ready = self._ready, []
        idle = self._handed == self._finished  # each counter is written by one thread only
        if idle and all(not isinstance(w, Step) or len(w.inputs) == 1 for w in work):
            _answer(self._tick(work))
        else:
            self._hand(work)

    def _hand(self, work: list[Work]) -> None:
        self._handed += len(work)
        for w in work:
            self._inbox.put(w)

    # model thread (or the loop's, for decode steps while it idles) ------------------------------------

    def _loop(self) -> None:
        take_threads()
        while True:
            work = [self._inbox.get()]
            while work[-1] is not None:
                try:
                    work.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            stop = work[-1] is None
            if stop:
                work.pop()
            answers = self._tick(work)
            self._finished += len(work)  # before answering: an answer may bring the next step at once
            _answer(answers)
            if stop:
                return

    def _tick(self, work: list[Work]) -> list[Answer]:
        """Run the work; return each step's answer, for the caller to deliver once the model is free for more."""
        steps: list[Step] = []
        answers: list[Answer] = []
        for w in work:
            if isinstance(w, Step):
                steps.append(w)
            else:
                w()
        for group in self._groups(steps, answers).values():
            self._run(group, answers)
        return answers

    def _groups(self, steps: list[Step], answers: list[Answer]) -> dict[tuple[int, int], Group]:
        groups: dict[tuple[int, int], Group] = {}
        for step in steps:
            session = self.sessions.get(step.session_id)
            if session is None:
                answers.append((step, EngineError(f"no open session {step.session_id!r} on this stage")))
            elif step.position != session.num_computed:
                answers.append((step, EngineError(f"session {step.session_id!r} is at position "
                                                  f"{session.num_computed}, not {step.position}")))
            elif not self._reserve(session, step.position + len(step.inputs)):
                answers.append((step, EngineError(f"no KV room for {len(step.inputs)} more tokens on this stage")))
            else:
                groups.setdefault((session.start, session.end), []).append((session, step))
        return groups

    def _reserve(self, session: StageSession, tokens: int) -> bool:
        need = -(-tokens // BLOCK_SIZE) - len(session.block_table)
        if need > len(self.free):
            return False
        session.block_table += [self.free.pop() for _ in range(max(0, need))]
        return True

    def _run(self, group: Group, answers: list[Answer]) -> None:
        start, end = group[0][0].start, group[0][0].end
        try:
            model = self.model
            batch = AttentionBatch.build([s.block_table for s, _ in group], [step.position for _, step in group],
                                         [len(step.inputs) for _, step in group], BLOCK_SIZE,
                                         model.config.sliding_window, model.device, self.kv.in_place)
            inputs = torch.cat([step.inputs for _, step in group]) if len(group) > 1 else group[0][1].inputs
            if inputs.is_floating_point():  # an earlier stage may hold the model in another dtype
                inputs = inputs.to(model.dtype)
            keep = _kept(group, model.device) if end == model.config.num_hidden_layers else None
            hidden = model(inputs.to(model.device), batch, self.kv, start, end, keep=keep)
        except Exception as e:
            log.exception("stage forward failed")
            for _, step in group:
                answers.append((step, EngineError(f"forward failed: {e!r}")))
            return
        row = 0
        for session, step in group:
            n = 1 if step.sample and keep is not None else len(step.inputs)
            session.num_computed += len(step.inputs)
            out = hidden[row:row + n]
            row += n
            try:
                answers.append((step, self._sample(session, out[-1]) if step.sample else {"hidden": out.cpu()}))
            except Exception as e:
                log.exception("stage sampling failed")
                answers.append((step, EngineError(f"sampling failed: {e!r}")))

    def _sample(self, session: StageSession, hidden: torch.Tensor) -> dict:
        seq, text = session.seq, session.text
        if seq is None or text is None:
            raise EngineError(f"layers {session.start}:{session.end} do not end the model: nothing to sample")
        token, logprobs = self.sampler.sample(self.model.compute_logits(hidden[None])[0].cpu(), seq)
        seq.token_ids.append(token)
        if ends_on(token, seq.params, self.tokenizer.eos_token_ids):
            return {"token": token, "pieces": text.flush(), "finish_reason": "stop", "logprobs": None,
                    "stop_token": True}
        pieces = text.push(token)
        reason = "stop" if text.stopped is not None else "length" if at_length(seq, self.context_len) else None
        if reason is not None:
            pieces += text.flush()
        return {"token": token, "pieces": pieces, "finish_reason": reason, "logprobs": logprobs,
                "stop_sequence": text.stopped}

    def _close(self, session_id: str) -> None:
        session = self.sessions.pop(session_id, None)
        if session is not None:
            self.free += session.block_table


def _kept(group: Group, device: torch.device) -> torch.Tensor | None:
    """The rows the model's last layer must finish: a sampling step's last (its others need only their K/V, as in
    the engine's runner), every row of a step that returns its hidden states; None where that is every row."""
    rows, row = [], 0
    for _, step in group:
        n = len(step.inputs)
        rows += [row + n - 1] if step.sample else range(row, row + n)
        row += n
    return None if len(rows) == row else torch.tensor(rows, dtype=torch.long, device=device)


def _settle(future: asyncio.Future, result: dict | Exception) -> None:
    if not future.done():
        future.set_exception(result) if isinstance(result, Exception) else future.set_result(result)


def _answer(answers: list[Answer]) -> None:
    for step, result in answers:
        step.done(result)
