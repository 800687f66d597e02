"""The elementwise work between a layer's products, each chain in one pass, on a CPU in float32 or bfloat16.

torch runs every elementwise op as its own parallel loop, and each wakes the sleeping OpenMP threads: at 64 rows a
0.5B model's layer ran about 15 of them (norms, residual adds, rotation, SiLU and its product) for about 1.5 ms,
10% of a decode step on 2 cores. Here a residual add and the norm after it, a rotation, and SiLU with its product
are each one numba loop over the rows. Tensors smaller than a loop's grain (one sequence's decode, and for the light
loops a few hundred rows) take the same loop compiled to run on the calling thread, where waking numba's threads
would cost more than the work: one call where torch ran several ops (a single sequence's decode step 3-6% faster
than with torch's ops, four runs alternated in one process). bfloat16 tensors take the same loops: numpy, and so
numba, has no bfloat16, so their bits are read as uint16, widened to float32, computed on, and rounded back (to
nearest even) once at the end of each chain. torch's bfloat16 ops convert at every op: a 0.5B model's 64-row decode
step took 301 ms with them, 249 with these loops (medians of eight runs alternated in one process; one row 103 against
100). Other dtypes and devices keep torch's ops.

exp is written out (a polynomial and exponent bits) because numba, without Intel's SVML, calls libm's scalar
exp, which keeps a loop from vectorizing: in the paged attention's softmax that alone was a quarter of its time.
"""

import types
from typing import NamedTuple

import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange
from numba import types as nb_types
from numba.core.dispatcher import Dispatcher
from numba.extending import intrinsic, overload

# exp(r) for |r| <= ln(2) / 2 as its Taylor series to r**7, highest power first: within a float32 rounding or two
_TAYLOR = tuple(np.float32(1 / np.prod(np.arange(1, i + 1, dtype=np.float64))) for i in range(7, -1, -1))
_LN2_HI, _LN2_LO = np.float32(0.693145751953125), np.float32(1.428606765330187e-06)  # ln 2 split: k * HI is exact


DTYPES = (torch.float32, torch.bfloat16)


def supports(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in DTYPES


def array(x: torch.Tensor) -> np.ndarray:
    """A CPU tensor's memory as numpy sees it: float32 as float32, bfloat16 as its uint16 bits (see wide)."""
    return x.numpy() if x.dtype == torch.float32 else x.view(torch.uint16).numpy()


def on_caller(kernel: Dispatcher) -> Dispatcher:
    """The kernel's loops compiled again without threads (prange runs as range), under a name of its own: numba's
    disk cache keys a function by its name and bytecode, not by how it was compiled."""
    fn = kernel.py_func
    copy = types.FunctionType(fn.__code__, fn.__globals__, f"{fn.__name__}_on_caller")
    copy.__qualname__ = copy.__name__
    return njit(fastmath=True, cache=True, error_model=kernel.targetoptions.get("error_model", "python"))(copy)


class Kernel(NamedTuple):
    """A loop compiled twice: split among numba's threads, and on the calling thread for fewer than `grain`
    elements."""

    threaded: Dispatcher
    caller: Dispatcher
    grain: int


def _pick(kernel: Kernel, x: torch.Tensor) -> Dispatcher:
    return kernel.threaded if x.numel() >= kernel.grain else kernel.caller


@intrinsic
def float_bits(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return nb_types.float32(nb_types.int32), codegen


@intrinsic
def _int_bits(typingctx, value):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return nb_types.uint32(nb_types.float32), codegen


def wide(v):  # typed per call by numba: see _wide
    raise NotImplementedError


@overload(wide, inline="always")
def _wide(v):
    """An element as float32: a float32 as it is, a bfloat16's uint16 bits as the float32 they are the top half of."""
    if v == nb_types.float32:
        return lambda v: v
    return lambda v: float_bits(np.int32(v) << np.int32(16))


def narrow(a, v):  # typed per call by numba: see _narrow
    raise NotImplementedError


@overload(narrow, inline="always")
def _narrow(a, v):
    """float32 v as an element of array a: as it is for a float32 array, rounded to the nearest bfloat16 (ties to
    even) for a uint16 one."""
    if a.dtype == nb_types.float32:
        return lambda a, v: v

    def to_bfloat16(a, v):
        bits = _int_bits(v)
        return np.uint16((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))

    return to_bfloat16


@njit(inline="always", fastmath=True)
def exp(x):
    """exp(x) for float32 x as 2**k * exp(r), k the integer nearest x / ln 2. It is 0 below about -87.3 (k = -127
    gives zero exponent bits) and exp(88) above 88, never inf: fastmath code may not divide by inf."""
    x = min(max(x, np.float32(-88.0)), np.float32(88.0))
    k = np.floor(x * np.float32(1.4426950408889634) + np.float32(0.5))
    r = x - k * _LN2_HI - k * _LN2_LO
    p = np.float32(0.0)
    for c in _TAYLOR:
        p = p * r + c
    return p * float_bits((np.int32(k) + np.int32(127)) << np.int32(23))


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """residual += x (in place), and the norm of the sum: rows [n, dim]."""
    out = torch.empty_like(x)
    _pick(_ADD_NORM, x)(array(x), array(residual), array(weight.detach()), np.float32(eps), array(out))
    return out, residual


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    out = torch.empty_like(x)
    _pick(_NORM, x)(array(x), array(weight.detach()), np.float32(eps), array(out))
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for rows [n, 2 * width] of gate then up, as a new contiguous [n, width]."""
    out = gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)
    _pick(_SILU_MUL, out)(array(gate_up), array(out))
    return out


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in place on x [n, heads, dim], with rope.py's cos and signed sin [n, 1, dim]. Each row's
    heads must lie side by side (rows may be apart: q and k in a fused projection's output).

    The loop reads x as one flat span from its first element: numba compiles a strided view's loops element by
    element, and on an AMX Xeon 512 rows of a 0.5B model's q and k took 621 us strided, 208 flat (bfloat16; 85 and
    38 at 64 rows)."""
    n, heads, dim = x.shape
    if x.stride(2) != 1 or (heads > 1 and x.stride(1) != dim):  # one head's stride is never stepped
        raise ValueError(f"rotate takes rows of side-by-side heads; got strides {x.stride()} for shape {x.shape}")
    if n:
        span = x.as_strided(((n - 1) * x.stride(0) + heads * dim,), (1,))
        _pick(_ROTATE, x)(array(span), x.stride(0), heads, dim, array(cos[:, 0]), array(signed_sin[:, 0]))
    return x


def warm(dtype: torch.dtype) -> None:
    """Compile (or load from numba's disk cache) every kernel for a dtype now, not in a request's first tick: both
    variants."""
    for rows in (8, max(k.grain for k in _KERNELS) // 4):  # the narrowest tensor below has 4 elements a row
        x, w, c = (torch.ones(*shape, dtype=dtype) for shape in ((rows, 8), (8,), (rows, 1, 4)))
        add_rms_norm(x, x.clone(), w, 1e-6), rms_norm(x, w, 1e-6), silu_mul(x)
        rotate(c.clone(), c, c)


@njit(inline="always", fastmath=True)
def _normed(h, weight, eps, out):
    total = np.float32(0.0)
    for j in range(h.shape[0]):
        total += wide(h[j]) * wide(h[j])
    scale = np.float32(1.0) / np.sqrt(total / h.shape[0] + eps)
    for j in range(h.shape[0]):
        out[j] = narrow(out, wide(h[j]) * scale * wide(weight[j]))


@njit(parallel=True, fastmath=True, cache=True)
def _add_norm(x, residual, weight, eps, out):
    for i in prange(x.shape[0]):
        h = residual[i]
        for j in range(h.shape[0]):
            h[j] = narrow(h, wide(h[j]) + wide(x[i, j]))
        _normed(h, weight, eps, out[i])


@njit(parallel=True, fastmath=True, cache=True)
def _norm(x, weight, eps, out):
    for i in prange(x.shape[0]):
        _normed(x[i], weight, eps, out[i])


# numpy's error model: a float division by zero gives inf, not an exception. Python's model checks every divisor,
# and that branch kept the loop from vectorizing once compiled without threads (prange's loops take numpy's model
# anyway): at one row of a 0.5B model's MLP 18-28 us against 3-4, at four rows 75-105 against 13-14
@njit(parallel=True, fastmath=True, cache=True, error_model="numpy")
def _silu_mul(gate_up, out):
    width = out.shape[1]
    for i in prange(out.shape[0]):
        for j in range(width):
            g = wide(gate_up[i, j])
            out[i, j] = narrow(out, g / (np.float32(1.0) + exp(-g)) * wide(gate_up[i, width + j]))


@njit(parallel=True, fastmath=True, cache=True)
def _rotate(x, row_stride, heads, dim, cos, signed_sin):
    half = dim // 2
    for i in prange(cos.shape[0]):
        c, s = cos[i], signed_sin[i]
        row = x[i * row_stride:i * row_stride + heads * dim].reshape(heads, dim)
        for h in range(heads):
            r = row[h]  # indexed from its own start: an offset into x kept the loop from vectorizing
            for e in range(half):
                a, b = wide(r[e]), wide(r[e + half])
                r[e] = narrow(x, a * wide(c[e]) + b * wide(s[e]))
                r[e + half] = narrow(x, b * wide(c[e + half]) + a * wide(s[e + half]))


# Grains: waking numba's threads after a product costs about 100 us on 2 cores, so a loop stays on the caller until
# it alone would take longer than the two threads woken, by element counts measured per loop (AMD EPYC, AVX2, float32,
# medians of 200 calls each after a product; caller against threads): add_norm over 896-wide rows 119 against 202 us
# at 192 rows, 723 against 584 at 1,024; silu_mul over 4,864-wide rows 160 against 183 at 32 rows, 277 against 228
# at 48; rotate over 16 heads of 64, 158 against 203 at 384 rows, 331 against 300 at 1,024. torch's grain (32,768
# elements) sent a 64-sequence decode step's norms and rotations to the threads at twice their cost on the caller
_KERNELS = _ADD_NORM, _NORM, _SILU_MUL, _ROTATE = tuple(
    Kernel(k, on_caller(k), grain) for k, grain in ((_add_norm, 2**18), (_norm, 2**18), (_silu_mul, 2**17),
                                                    (_rotate, 2**20)))
