"""shoal: a distributed LLM inference network."""

import os

# torch's OpenMP threads otherwise spin for a while after each parallel op, and on a CPU where numpy's OpenBLAS
# does the float32 products (model/matmul.py) they fight its threads for the cores: a sequence decoded on the
# main thread ran 5x slower (4.7 against 25 tokens/s on a 0.5B model, 2 cores). Read once, when torch loads, so
# it must be set before torch is imported; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
