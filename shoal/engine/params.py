from dataclasses import dataclass, field


class EngineError(Exception):
    """A request the engine refuses; the message names the problem."""


class StickyBusy(EngineError):
    """The session named by the request already has a request in flight."""


@dataclass
class SamplingParams:
    """How one request samples; every field applies to that request alone."""

    max_tokens: int | None = None  # None: until the context is full
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    timeout_s: float | None = None

    @classmethod
    def from_wire(cls, fields: dict) -> "SamplingParams":
        """From a job's params as JSON carries them: unknown keys ignored, logit_bias keys back to ints."""
        params = cls(**{k: v for k, v in fields.items() if k in cls.__dataclass_fields__})
        params.logit_bias = {int(k): v for k, v in params.logit_bias.items()}
        return params

    def validate(self, vocab_size: int) -> None:
        checks = [
            (self.max_tokens is None or self.max_tokens >= 1, f"max_tokens must be at least 1, got {self.max_tokens}"),
            (0 <= self.min_tokens <= (self.max_tokens or self.min_tokens),
             f"min_tokens must be between 0 and max_tokens ({self.max_tokens}), got {self.min_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 is off), got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, f"logprobs must be in [0, 20], got {self.logprobs}"),
            (self.timeout_s is None or self.timeout_s > 0, f"timeout_s must be > 0, got {self.timeout_s}"),
            (all(s for s in self.stop), "stop strings must not be empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise EngineError(message)
        for name, ids in (("logit_bias", self.logit_bias), ("stop_token_ids", self.stop_token_ids)):
            bad = [i for i in ids if not 0 <= int(i) < vocab_size]
            if bad:
                raise EngineError(f"{name} names token ids outside the vocabulary of {vocab_size}: {bad[:5]}")
