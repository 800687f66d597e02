"""What a request must pass before it reaches the model thread, checked on the asyncio side.

Both the in-process Engine and the EngineProcess front use these, so a request gets the same
answer whichever runs the model.
"""

import asyncio
import threading
from dataclasses import dataclass, replace

from shoal.engine.blocks import chain_keys
from shoal.engine.params import EngineError, SamplingParams, StickyBusy
from shoal.model.errors import ModelError
from shoal.model.tokenizer import Tokenizer

Prompt = str | list[dict] | list[int]


def tokenize(tokenizer: Tokenizer, vocab_size: int, prompt: Prompt) -> list[int]:
    """Token ids of text, of chat messages (through the chat template), or of ids given directly."""
    if not isinstance(prompt, str | list):
        raise EngineError("a prompt is text, a list of chat messages, or a list of token ids")
    try:
        if isinstance(prompt, str):
            ids = tokenizer.encode(prompt)
        elif prompt and all(isinstance(m, dict) for m in prompt):
            ids = tokenizer.encode_chat(prompt)
        elif all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise EngineError(f"prompt token ids outside the vocabulary of {vocab_size}: {bad[:5]}")
        else:
            raise EngineError("a prompt is text, a list of chat messages, or a list of token ids")
    except ModelError as e:
        raise EngineError(str(e)) from e
    if not ids:
        raise EngineError("the prompt is empty")
    return ids


def running_loop() -> asyncio.AbstractEventLoop:
    try:
        return asyncio.get_running_loop()
    except RuntimeError as e:
        raise EngineError("submit() must be called from a running asyncio event loop") from e


@dataclass(frozen=True)
class Bounds:
    """The facts of one loaded engine a request is checked against."""

    vocab_size: int
    context_len: int
    kv_tokens: int  # what the KV pool holds
    kv_cache_mb: float
    root: bytes  # the prefix cache's chain seed, for parent_key
    block_size: int

    def admit(self, tokenizer: Tokenizer, prompt: Prompt, params: SamplingParams,
              parent_key: str | None) -> tuple[list[int], SamplingParams]:
        """The prompt's token ids and the params with max_tokens filled in; EngineError names what does not fit."""
        params.validate(self.vocab_size)
        ids = tokenize(tokenizer, self.vocab_size, prompt)
        room = self.context_len - len(ids)
        if room <= 0:
            raise EngineError(f"the prompt is {len(ids)} tokens; the model's context is {self.context_len} tokens")
        if params.max_tokens is None:
            params = replace(params, max_tokens=room)
        elif params.max_tokens > room:
            raise EngineError(f"the prompt is {len(ids)} tokens and max_tokens is {params.max_tokens}: more than the "
                              f"model's context of {self.context_len} tokens")
        if len(ids) + params.max_tokens > self.kv_tokens:
            raise EngineError(f"the prompt and max_tokens need {len(ids) + params.max_tokens} tokens of KV cache; "
                              f"kv_cache_mb={self.kv_cache_mb} holds {self.kv_tokens}")
        if parent_key is not None and parent_key not in chain_keys(self.root, ids[:-1], self.block_size):
            raise EngineError(f"parent_key {parent_key!r} is not the key of a context this prompt extends")
        return ids, params


class Sessions:
    """Sessions with a request in flight: a second request of one is refused with sticky_busy."""

    def __init__(self) -> None:
        self._busy: set[str] = set()
        self._lock = threading.Lock()

    def claim(self, session_id: str | None) -> None:
        if session_id is None:
            return
        with self._lock:
            if session_id in self._busy:
                raise StickyBusy(f"sticky_busy: session {session_id!r} already has a request in flight")
            self._busy.add(session_id)

    def release(self, session_id: str | None) -> None:
        with self._lock:
            self._busy.discard(session_id)
