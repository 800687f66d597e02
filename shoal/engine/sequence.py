import time
from dataclasses import dataclass, field
from enum import StrEnum

import torch

from shoal.engine.params import SamplingParams


class State(StrEnum):
    RECEIVED = "RECEIVED"
    QUEUED = "QUEUED"
    SCHEDULED = "SCHEDULED"
    ACTIVE = "ACTIVE"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"


@dataclass(eq=False)
class Sequence:
    """One request's tokens, KV blocks and progress inside the engine.

    `token_ids` is the prompt followed by every generated token. `num_computed` tokens have K/V
    in the blocks of `block_table`; the rest are prefilled (or decoded) by later ticks. The last
    generated token is never computed until the next tick feeds it.
    """

    id: str
    token_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    priority: int = 0
    session_id: str | None = None
    num_prompt_tokens: int = 0
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    num_registered: int = 0
    chain: bytes = b""
    state: State = State.RECEIVED
    times: dict[str, float] = field(default_factory=dict)
    arrival: int = 0
    cache_hit_kind: str = "cold"
    cached_tokens: int = 0
    created_tokens: int = 0
    preemptions: int = 0
    paused_since: float | None = None
    parent_key: str | None = None

    def __post_init__(self) -> None:
        self.num_prompt_tokens = len(self.token_ids)
        self.mark(State.RECEIVED)

    def mark(self, state: State) -> None:
        self.state = state
        self.times.setdefault(state.value, time.monotonic())

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def completion_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_pending(self) -> int:
        """Tokens still to feed through the model before the next sample."""
        return len(self.token_ids) - self.num_computed

    @property
    def is_prefill(self) -> bool:
        return self.num_pending > 1


def ends_on(token: int, params: SamplingParams, eos_token_ids: list[int]) -> bool:
    """Whether sampling `token` ends the request with `stop` (its text never shown)."""
    return token in params.stop_token_ids or (not params.ignore_eos and token in eos_token_ids)


def at_length(seq: Sequence, context_len: int) -> bool:
    """Whether the request has all the tokens it may have: max_tokens, or the model's context."""
    return len(seq.completion_ids) >= (seq.params.max_tokens or context_len) or len(seq) >= context_len
