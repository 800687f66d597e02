"""shoal: a distributed LLM inference network."""

__version__ = "0.1.0"
