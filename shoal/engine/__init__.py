"""One model process on one worker: continuous batching over a paged, prefix-sharing KV cache."""

from shoal.engine.engine import Engine, EngineConfig
from shoal.engine.events import Event, RequestStream, Stats
from shoal.engine.params import EngineError, SamplingParams, StickyBusy

__all__ = ["Engine", "EngineConfig", "EngineError", "Event", "RequestStream", "SamplingParams", "Stats",
           "StickyBusy"]
