from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

FINISH = {"stop": "stop", "length": "length", "cancelled": "stop", "timeout": "length"}  # engine -> OpenAI


class StreamOptions(BaseModel):
    include_usage: bool = False


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message's text; of structured content only text parts are kept."""
        if isinstance(self.content, list):
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class SamplingFields(BaseModel):
    """What chat and text completions share: OpenAI's fields, then shoal's extras."""

    model_config = ConfigDict(extra="ignore")

    model: str
    n: int = Field(1, ge=1, le=16)
    best_of: int | None = Field(None, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = Field(None, validate_default=True)
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = Field(None, max_length=256)
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    session_id: str | None = Field(None, max_length=256)
    priority: int = Field(0, ge=-100, le=100)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (v or {}).items():
            if not token.isdigit() or not -100 <= bias <= 100:
                raise ValueError("logit_bias maps token ids (as strings) to biases in [-100, 100]")
        return v

    @model_validator(mode="after")
    def _best_of(self) -> "SamplingFields":
        if self.best_of is None:
            return self
        if self.best_of < self.n:
            raise ValueError(f"best_of ({self.best_of}) must be at least n ({self.n})")
        if self.stream or self.session_id or self.logprobs_k() is not None:
            raise ValueError("best_of cannot be combined with stream, session_id or logprobs")
        return self

    def limit(self) -> int | None:
        return self.max_tokens

    def logprobs_k(self) -> int | None:
        return None

    def engine_params(self, max_tokens: int | None, index: int = 0) -> dict:
        """SamplingParams fields for choice `index` (seeded choices get seed + index)."""
        return {"max_tokens": max_tokens, "min_tokens": min(self.min_tokens, max_tokens or self.min_tokens),
                "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p,
                "repetition_penalty": self.repetition_penalty, "presence_penalty": self.presence_penalty,
                "frequency_penalty": self.frequency_penalty, "logit_bias": self.logit_bias or {},
                "seed": None if self.seed is None else self.seed + index, "stop": self.stop,
                "ignore_eos": self.ignore_eos, "logprobs": self.logprobs_k()}


class ChatCompletionRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def chat(self) -> list[dict]:
        return [{"role": m.role if m.role != "developer" else "system", "content": m.text()} for m in self.messages]


class CompletionRequest(SamplingFields):
    prompt: str | list[int] = Field(min_length=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    max_tokens: int | None = Field(16, ge=1)

    def logprobs_k(self) -> int | None:
        return self.logprobs
