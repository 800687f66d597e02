"""The OpenMP runtime that torch's math and numba's kernels share (torch's libgomp), and how its threads wait.

After a parallel op, OpenMP's worker threads spin a while before they sleep (GOMP_SPINCOUNT, which shoal/__init__
sets short), so that the next op finds them awake: on a 2-core Xeon VM, waking a sleeping worker took 50-90 us a
parallel op, and one sequence's decode issues about five a layer. But libgomp spins only while the threads it
manages are no more than the cores, and every thread that has run a parallel op keeps a pool of workers of its own:
once the thread that loaded the model, or the event loop's, had run one, the engine's workers slept after every op.
`release` frees the calling thread's pool; a thread that hands work to the engine calls it, leaving the engine's
thread the only one with workers. A 0.5B model on that VM, spinning about a millisecond against not at all
(processes alternated): one sequence decoded 15-20% faster in bfloat16, 12-16% in float32 (where OpenBLAS's own
threads multiply some single rows), and 64 sequences ran 16-25% faster in bfloat16, 5-10% in float32.
"""

import ctypes
import functools
import os

OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: the threads end, the runtime stays


@functools.cache
def _runtime() -> ctypes.CDLL | None:
    """The libgomp already loaded (never a second one), if it has OpenMP 5's pause."""
    try:
        lib = ctypes.CDLL("libgomp.so.1", mode=getattr(os, "RTLD_NOLOAD", 0) | os.RTLD_LOCAL)
    except OSError:  # torch built with another OpenMP, or none
        return None
    return lib if hasattr(lib, "omp_pause_resource_all") else None


def release() -> None:
    """End the calling thread's pool of OpenMP workers, if it has one (a later parallel op of the thread starts
    another)."""
    lib = _runtime()
    if lib is not None:
        lib.omp_pause_resource_all(OMP_PAUSE_SOFT)
