"""Comparing two workers' outputs for the same step: equal tokens, or hidden states within the dtype's noise."""

import numpy as np

from shoal.worker.channel import Message

# Replicas batch differently, so their sums round differently: agree within what the dtype can tell apart.
TOLERANCE = {"float32": 1e-3, "float16": 1e-2, "bfloat16": 5e-2}


def hidden(msg: Message) -> np.ndarray:
    """A stage output's hidden states as float32 (bfloat16 widened bit for bit)."""
    data = bytes(msg["data"])
    if msg["dtype"] == "bfloat16":
        return (np.frombuffer(data, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    return np.frombuffer(data, dtype=np.dtype(msg["dtype"])).astype(np.float32)


def agree(a: Message, b: Message) -> bool:
    if "token" in a or "token" in b:
        return a.get("token") == b.get("token")
    if a["dtype"] != b["dtype"] or list(a["shape"]) != list(b["shape"]):
        return False
    x, y = hidden(a), hidden(b)
    tol = TOLERANCE.get(a["dtype"], 1e-3)
    return bool(np.allclose(x, y, rtol=tol, atol=tol * max(1.0, float(np.abs(x).max(initial=0.0)))))
