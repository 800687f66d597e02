"""shoal: a distributed LLM inference network."""

import os

# torch's OpenMP threads otherwise spin for a while after each parallel op, and on a CPU where numpy's OpenBLAS
# does the float32 products (model/matmul.py) they fight its threads for the cores: a sequence decoded on the
# main thread ran 5x slower (4.7 against 25 tokens/s on a 0.5B model, 2 cores). Read once, when torch loads, so
# it must be set before torch is imported; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# But a worker that sleeps after every op takes 50-90 us to wake for the next (a 2-core Xeon VM): they spin this
# many turns first, about a millisecond by libgomp's estimate, which it honours while its threads are no more than
# the cores (see model/openmp.py)
os.environ.setdefault("GOMP_SPINCOUNT", "100000")
# numpy's OpenBLAS threads likewise spin after each product (2**28 cycles by default), taking the cores from the
# torch ops and the paged attention (model/paged.py) between products: on 2 cores a 64-sequence decode step of
# a 0.5B model took 0.70-0.73 s with it, 0.50 s with 2**12 cycles (read when numpy loads).
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "12")

__version__ = "0.1.0"
