from dataclasses import dataclass, field

from shoal.model.detokenize import StreamDecoder
from shoal.model.tokenizer import Tokenizer

MARKERS = {"<think>": ("thinking", True), "</think>": ("thinking", False),
           "<tool_call>": ("tool_call", True), "</tool_call>": ("tool_call", False)}


def marker_ids(tokenizer: Tokenizer) -> dict[int, tuple[str, bool]]:
    """Token id -> (event kind, opens) for the thinking and tool-call markers this tokenizer has."""
    ids = {tokenizer.token_to_id(text): kind for text, kind in MARKERS.items()}
    return {i: kind for i, kind in ids.items() if i is not None}


@dataclass
class TextStream:
    """One request's generated text: UTF-8-safe deltas, stop strings, thinking and tool-call sections.

    Text that could be the start of a stop string is held back until it cannot be; a stop string
    found in the text ends the request, is not part of the output, and is kept in `stopped`. Stop strings apply to
    plain text only. A tool call is emitted whole when its closing marker arrives.
    """

    tokenizer: Tokenizer
    stop: list[str]
    markers: dict[int, tuple[str, bool]]
    kind: str = "text"
    held: str = ""
    stopped: str | None = None
    decoder: StreamDecoder = field(init=False)

    def __post_init__(self) -> None:
        self.decoder = StreamDecoder(self.tokenizer)

    def push(self, token_id: int) -> list[tuple[str, str]]:
        """(kind, text) pieces made visible by one more token."""
        if token_id in self.markers:
            kind, opens = self.markers[token_id]
            pieces = self.flush()
            self.kind = kind if opens else "text"
            self.decoder = StreamDecoder(self.tokenizer)
            return pieces
        self.held += self.decoder.push(token_id)
        if self.kind == "tool_call":
            return []
        if self.kind == "thinking":
            return self.flush()
        return self._release()

    def flush(self) -> list[tuple[str, str]]:
        """Everything held back, at the end of a section or of the request."""
        text, self.held = self.held, ""
        return [(self.kind, text)] if text else []

    def _release(self) -> list[tuple[str, str]]:
        found = [(i, s) for s in self.stop if (i := self.held.find(s)) >= 0]
        if found:
            cut, self.stopped = min(found)
            self.held = self.held[:cut]
            return self.flush()
        keep = max((n for s in self.stop for n in range(1, len(s)) if self.held.endswith(s[:n])), default=0)
        text, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return [("text", text)] if text else []
