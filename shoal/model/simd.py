"""Sixteen-lane float32 loops for numba, written as LLVM vector code: what numba's own loops do not compile well.

numba vectorizes a loop over contiguous elements, but a dot product of 64 becomes one chain of dependent FMAs and
a horizontal sum, and an accumulator array is loaded and stored at every step: the paged decode attention ran at
33-37 GFLOP/s on 2 cores that multiply matrices at 200-400. Here `scores16` takes 16 tokens' dot products at
once, each in a vector of partial sums, and turns the 16 vectors into one vector of 16 scores by four rounds of
shuffles and adds (on an AVX2 CPU in two groups of 8: see GROUP); `accumulate16` keeps a few query heads' weighted
sums of V in registers over a block's tokens, each row of V loaded once for them (on an AMX Xeon, 2 cores, the
attention went from 2.9 to 2.1 ms a layer of 64 sequences, bfloat16, from memory). Arrays are flat: float32, or
uint16 holding bfloat16 bits (numpy has no bfloat16), widened as they are loaded.
"""

from contextlib import contextmanager

import llvmlite.binding as llvm
from llvmlite import ir
from llvmlite.ir.types import _BaseFloatType
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

LANES = 16
# Tokens whose dot products `scores16` sums at once, in as many vectors of as many lanes: 16 fill 16 of AVX-512's
# 32 registers, but on AVX2 each is two of its 16 and the sums spill to memory. In 8s on a Zen 3 EPYC, float32, 54
# sequences of 250-450 tokens took 2.2-2.5 ms a layer from memory against 2.8-3.1, one of 4,096 tokens 338 us against
# 450 on one thread
GROUP = LANES if llvm.get_host_cpu_features().get("avx512f", False) else 8
# Columns of a weight panel that `tile` multiplies, 4 vectors on AVX-512 and 2 on AVX2: a tile of 6 rows keeps 24 of
# AVX-512's 32 registers in sums (12 of AVX2's 16). On an AMX Xeon, 2 cores, 64 rows of a 0.5B model's LM head and
# gate and up ran at 249 and 254 GFLOP/s with panels of 64, 173 and 169 with panels of 16 (oneDNN's: 211 and 231)
PANEL = 4 * GROUP if GROUP == LANES else 2 * GROUP
# AVX512-BF16's dot product of bfloat16 pairs (vdpbf16ps): two products and their sum into float32 lanes in one
# instruction. Without it, `tile` widens each pair's halves and makes two FMAs of them
DOT_PAIRS = GROUP == LANES and llvm.get_host_cpu_features().get("avx512bf16", False)
_F32 = ir.FloatType()
_VEC = ir.VectorType(_F32, LANES)
_FAST = ("fast",)


def _operands(context, builder, signature, args):
    """Each argument as the IR uses it: an array as a pointer to its data, an integer as an intp."""
    return [context.make_array(ty)(context, builder, arg).data if isinstance(ty, types.Array)
            else context.cast(builder, arg, ty, types.intp) for ty, arg in zip(signature.args, args, strict=True)]


def _declare(builder, name, result, *params):
    """An LLVM intrinsic function, declared in the module being built."""
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(result, params), name)


@contextmanager
def _steps(builder, count, step):
    """An IR loop over the offsets 0, step, 2 * step, ... below count (a multiple of step): yields the offset."""
    with cgutils.for_range(builder, builder.udiv(count, cgutils.intp_t(step))) as loop:
        yield builder.mul(loop.index, cgutils.intp_t(step))


def _fetch(builder, at, level):
    """Ask the CPU to bring the cache line at pointer `at` into its caches: level 3 into all, 2 from the second on."""
    i8, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
    fn = _declare(builder, "llvm.prefetch.p0i8", ir.VoidType(), i8, i32, i32, i32)
    builder.call(fn, [builder.bitcast(at, i8), i32(0), i32(level), i32(1)])


def _ints(values):
    return ir.Constant(ir.VectorType(ir.IntType(32), len(values)), values)


def _splat(builder, value, lanes=LANES):
    """A scalar (a float32, say) in every one of `lanes` lanes."""
    one = builder.insert_element(ir.Constant(ir.VectorType(value.type, lanes), ir.Undefined), value, ir.IntType(32)(0))
    return builder.shuffle_vector(one, one, _ints([0] * lanes))


def _madd(builder, a, b, c):
    """a * b + c, which LLVM fuses into one FMA."""
    return builder.fadd(builder.fmul(a, b, flags=_FAST), c, flags=_FAST)


def _load(builder, arrty, ptr, index, lanes=LANES):
    """`lanes` elements from ptr[index] as float32: bfloat16 bits (uint16) shifted into the top of an int32."""
    at, vec = builder.gep(ptr, [index]), ir.VectorType(_F32, lanes)
    if arrty.dtype == types.float32:
        return builder.load(builder.bitcast(at, vec.as_pointer()), align=4)
    bits = builder.load(builder.bitcast(at, ir.VectorType(ir.IntType(16), lanes).as_pointer()), align=2)
    wide = builder.shl(builder.zext(bits, ir.VectorType(ir.IntType(32), lanes)), _ints([16] * lanes))
    return builder.bitcast(wide, vec)


class _BFloat(_BaseFloatType):
    """LLVM's bfloat, which llvmlite does not name: the operand type of vdpbf16ps's intrinsic."""

    null = "0.0"
    intrinsic_name = "bf16"

    def __str__(self) -> str:
        return "bfloat"


_BFloat._create_instance()


def _halves(builder, pairs):
    """Float32 vectors of the low (even) and high (odd) bfloat16 halves of int32 lanes."""
    vec, ints = ir.VectorType(_F32, pairs.type.count), pairs.type
    low = builder.shl(pairs, ir.Constant(ints, [16] * ints.count))
    high = builder.and_(pairs, ir.Constant(ints, [-65536] * ints.count))
    return builder.bitcast(low, vec), builder.bitcast(high, vec)


def _dot_pairs(builder, x, w, total):
    """total + x's pair times w's pairs, lane by lane: int32 lanes holding two bfloat16 each, x the same in all."""
    if DOT_PAIRS:
        bf = ir.VectorType(_BFloat(), 2 * GROUP)
        fn = _declare(builder, "llvm.x86.avx512bf16.dpbf16ps.512", total.type, total.type, bf, bf)
        return builder.call(fn, [total, builder.bitcast(x, bf), builder.bitcast(w, bf)])
    (x_low, x_high), (w_low, w_high) = _halves(builder, x), _halves(builder, w)
    return _madd(builder, x_high, w_high, _madd(builder, x_low, w_low, total))


def _narrow(builder, vec):
    """Float32 lanes as bfloat16 bits (int16), rounded to nearest even, in integer steps (LLVM's own conversion
    calls a runtime function where the CPU has no instruction for it)."""
    ints = ir.VectorType(ir.IntType(32), vec.type.count)
    bits = builder.bitcast(vec, ints)
    odd = builder.and_(builder.lshr(bits, ir.Constant(ints, [16] * ints.count)), ir.Constant(ints, [1] * ints.count))
    rounded = builder.add(bits, builder.add(odd, ir.Constant(ints, [0x7FFF] * ints.count)))
    top = builder.lshr(rounded, ir.Constant(ints, [16] * ints.count))
    return builder.trunc(top, ir.VectorType(ir.IntType(16), ints.count))


def _ints_at(builder, ptr, index, lanes):
    """A pointer to int32 (with `lanes`, a vector of them) at ptr[index] of bfloat16 bits: pairs of elements."""
    at = builder.bitcast(builder.gep(ptr, [index]), ir.IntType(32).as_pointer())
    return builder.bitcast(at, ir.VectorType(ir.IntType(32), lanes).as_pointer()) if lanes else at


def _sum_lanes(builder, vectors):
    """One vector whose lane t is the sum of vectors[t]'s lanes, of n vectors of n lanes: each round adds the two
    halves of every vector's remaining partial sums, packing two vectors into one."""
    n = width = len(vectors)
    while len(vectors) > 1:
        half = width // 2
        low = [i + j for i in range(0, 2 * n, width) for j in range(half)]
        high = [i + half for i in low]
        paired = []
        for a, b in zip(vectors[::2], vectors[1::2], strict=True):
            paired.append(builder.fadd(*(builder.shuffle_vector(a, b, _ints(m)) for m in (low, high)), flags=_FAST))
        vectors, width = paired, half
    return vectors[0]


@intrinsic
def scores16(typingctx, k, k_at, stride, q, q_at, dim, out, out_at):
    """out[out_at + t] = sum(q[q_at + e] * k[k_at + t * stride + e] for e < dim), t < 16; dim a multiple of 16."""
    sig = types.void(k, k_at, stride, q, q_at, dim, out, out_at)

    def codegen(context, builder, signature, args):
        tys = signature.args
        kp, k_at, stride, qp, q_at, dim, op, out_at = _operands(context, builder, signature, args)
        vec = ir.VectorType(_F32, GROUP)
        for first in range(0, LANES, GROUP):
            sums = [cgutils.alloca_once_value(builder, ir.Constant(vec, [0.0] * GROUP)) for _ in range(GROUP)]
            with _steps(builder, dim, GROUP) as e:
                qv = _load(builder, tys[3], qp, builder.add(q_at, e), GROUP)
                for t, total in enumerate(sums, first):
                    row = builder.add(builder.add(k_at, builder.mul(stride, cgutils.intp_t(t))), e)
                    kv = _load(builder, tys[0], kp, row, GROUP)
                    builder.store(_madd(builder, qv, kv, builder.load(total)), total)
            result = _sum_lanes(builder, [builder.load(total) for total in sums])
            at = builder.gep(op, [builder.add(out_at, cgutils.intp_t(first))])
            builder.store(result, builder.bitcast(at, vec.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


# Query heads whose sums of V `accumulate16` takes in one pass, each row of V loaded once for all of them: with
# their 16-lane sums held in registers, more would spill
HEADS = 4


@intrinsic
def accumulate16(typingctx, v, v_at, stride, p, p_at, p_stride, heads, count, dim, out, out_at):
    """out[out_at + h * dim + e] += sum(p[p_at + h * p_stride + t] * v[v_at + t * stride + e] for t < count), for
    e < dim, h < heads <= HEADS: the weighted sums of V of a few query heads; dim a multiple of 16."""
    sig = types.void(v, v_at, stride, p, p_at, p_stride, heads, count, dim, out, out_at)

    def codegen(context, builder, signature, args):
        operands = _operands(context, builder, signature, args)
        vp, v_at, stride, pp, p_at, p_stride, heads, count, dim, op, out_at = operands
        intp = cgutils.intp_t
        # A head past `heads` reads the last one's rows, and its sums are not stored
        rows = [builder.select(builder.icmp_unsigned("<", intp(h), heads), intp(h), builder.sub(heads, intp(1)))
                for h in range(HEADS)]
        weights = [builder.add(p_at, builder.mul(row, p_stride)) for row in rows]
        totals = [cgutils.alloca_once(builder, _VEC) for _ in range(HEADS)]
        with _steps(builder, dim, LANES) as e:
            sums = [builder.bitcast(builder.gep(op, [builder.add(builder.add(out_at, builder.mul(row, dim)), e)]),
                                    _VEC.as_pointer()) for row in rows]
            for at, total in zip(sums, totals, strict=True):
                builder.store(builder.load(at, align=4), total)
            with cgutils.for_range(builder, count) as token:
                t = token.index
                vv = _load(builder, signature.args[0], vp, builder.add(builder.add(v_at, builder.mul(stride, t)), e))
                for at, total in zip(weights, totals, strict=True):
                    weight = _splat(builder, builder.load(builder.gep(pp, [builder.add(at, t)])))
                    builder.store(_madd(builder, weight, vv, builder.load(total)), total)
            for h, (at, total) in enumerate(zip(sums, totals, strict=True)):
                with builder.if_then(builder.icmp_unsigned("<", intp(h), heads)):
                    builder.store(builder.load(total), at, align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def largest16(typingctx, arr, at, count):
    """max(arr[at:at + count]) for float32 arr; count a multiple of 16 (a scalar max does not vectorize)."""
    sig = types.float32(arr, at, count)

    def codegen(context, builder, signature, args):
        ptr, at, count = _operands(context, builder, signature, args)
        top = cgutils.alloca_once_value(builder, ir.Constant(_VEC, [float("-inf")] * LANES))
        maxnum = _declare(builder, "llvm.maxnum.v16f32", _VEC, _VEC, _VEC)
        with _steps(builder, count, LANES) as e:
            chunk = _load(builder, signature.args[0], ptr, builder.add(at, e))
            builder.store(builder.call(maxnum, [builder.load(top), chunk]), top)
        return builder.call(_declare(builder, "llvm.vector.reduce.fmax.v16f32", _F32, _VEC), [builder.load(top)])

    return sig, codegen


@intrinsic
def prefetch(typingctx, arr, at, count):
    """Ask the CPU to bring arr[at:at + count] into its caches (a block of a paged cache, read next)."""
    sig = types.void(arr, at, count)

    def codegen(context, builder, signature, args):
        data, at, count = _operands(context, builder, signature, args)
        ptr = builder.bitcast(data, ir.IntType(8).as_pointer())
        size = ir.Constant(cgutils.intp_t, context.get_abi_sizeof(context.get_data_type(signature.args[0].dtype)))
        start = builder.mul(at, size)
        with _steps(builder, builder.mul(count, size), 64) as line:  # a 64-byte cache line at a time
            _fetch(builder, builder.gep(ptr, [builder.add(start, line)]), 3)
        return context.get_dummy_value()

    return sig, codegen


def tile(rows: int, ahead: int = 0):
    """An intrinsic for `rows` rows of a matrix product's tile: c[c_at + r * c_stride + j] = sum(a[a_at + r * a_stride
    + e] * b[b_at + e * PANEL + j] for e < depth), r < rows, j < PANEL (added to c's values with `add`), b holding a
    panel of a weight, PANEL of its rows side by side (model/tiles.py). The tile's sums stay in registers (rows x
    PANEL / GROUP vectors) over the whole depth: each row of the panel is loaded once for all the rows, each element of
    a once for the panel. With `ahead`, each step also asks for the panel row `ahead` rows on to be brought into the
    second-level cache (past the panel's end that is the next panel's, past the array's nothing: a prefetch does not
    fault). Arrays of bfloat16 bits (uint16) hold the panel's rows in pairs, b[b_at + e * PANEL + 2 * j + t] being
    column j's element e + t (e even, depth too), multiplied pair by pair (`_dot_pairs`); the sums are float32 (with
    `add` starting from c's values) and are rounded into c once."""
    vec = ir.VectorType(_F32, GROUP)

    @intrinsic
    def kernel(typingctx, a, a_at, a_stride, b, b_at, depth, c, c_at, c_stride, add):
        sig = types.void(a, a_at, a_stride, b, b_at, depth, c, c_at, c_stride, add)
        pairs = b.dtype == types.uint16

        def codegen(context, builder, signature, args):
            ap, a_at, a_stride, bp, b_at, depth, cp, c_at, c_stride, add = _operands(context, builder, signature,
                                                                                     args)
            intp = cgutils.intp_t
            parts = range(0, PANEL, GROUP)
            out_rows = [builder.add(c_at, builder.mul(c_stride, intp(r))) for r in range(rows)]
            outs = [[builder.add(row, intp(j)) for j in parts] for row in out_rows]
            sums = [[cgutils.alloca_once_value(builder, ir.Constant(vec, [0.0] * GROUP)) for _ in row] for row in outs]
            # c is read only to add to: a fresh output's pages are not faulted in twice, read then written
            with builder.if_then(builder.icmp_unsigned("!=", add, intp(0))):
                for row, totals in zip(outs, sums, strict=True):
                    for at, total in zip(row, totals, strict=True):
                        builder.store(_load(builder, signature.args[6], cp, at, GROUP), total)
            starts = [builder.add(a_at, builder.mul(a_stride, intp(r))) for r in range(rows)]
            step = 2 if pairs else 1
            with _steps(builder, depth, step) as e:
                panel_row = builder.add(b_at, builder.mul(e, intp(PANEL)))
                for j in range(0, step * PANEL, 16 * step) if ahead else ():  # a 64-byte cache line at a time
                    _fetch(builder, builder.gep(bp, [builder.add(panel_row, intp(ahead * PANEL + j))]), 2)
                if pairs:
                    bs = [builder.load(_ints_at(builder, bp, builder.add(panel_row, intp(2 * j)), GROUP), align=2)
                          for j in parts]
                else:
                    bs = [_load(builder, signature.args[3], bp, builder.add(panel_row, intp(j)), GROUP) for j in parts]
                for start, row in zip(starts, sums, strict=True):
                    at = builder.add(start, e)
                    x = builder.load(_ints_at(builder, ap, at, 0), align=2) if pairs else builder.load(
                        builder.gep(ap, [at]))
                    splat = _splat(builder, x, GROUP)
                    for bv, total in zip(bs, row, strict=True):
                        so_far = builder.load(total)
                        sums_to = _dot_pairs(builder, splat, bv, so_far) if pairs else _madd(builder, splat, bv, so_far)
                        builder.store(sums_to, total)
            for row, totals in zip(outs, sums, strict=True):
                for at, total in zip(row, totals, strict=True):
                    result = builder.load(total)
                    if signature.args[6].dtype == types.uint16:
                        result = _narrow(builder, result)
                    builder.store(result, builder.bitcast(builder.gep(cp, [at]), result.type.as_pointer()), align=2)
            return context.get_dummy_value()

        return sig, codegen

    return kernel
