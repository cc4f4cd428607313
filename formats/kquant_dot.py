"""The board's dot kernels for the k-quants Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (256-value super-blocks).

The same three operations as formats/kernels.py gives the 32-element ggml types, with the
signatures of `BoardOps` (formats/quants.py) plus a leading ggml type id (10..14), which the
type table binds with functools.partial:

  prepare_activation(type_id, int8_mode, x, xf, xq, xd, xs)
  matvec_blocks(type_id, int8_mode, buf, n_blocks, first_block, blocks_per_row, xf, xq, xd, xs,
                out, row_state=None)
  dequantize_into(type_id, buf, out)

A matrix is stored row-major, each row `blocks_per_row` whole super-blocks (ggml's layouts,
formats/kquants.py). The simulator streams it through a small buffer and calls `matvec_blocks`
on each run of whole blocks; a run may start or end in the middle of a row (`first_block`
continues it). Every block adds its own contribution to out[row] as soon as it is read, so
`row_state` is accepted and ignored, and `out` is bit-identical however a matrix is split.

Arithmetic (float32 throughout, one rounding per operation, no FMA: formats/jit.py):

* float mode: prepare_activation copies x into xf. A block's weights are dequantized exactly as
  ggml's `dequantize_row_q*_K` (the type table's dequantize): w = dl*q - ml with, per group of
  16 values, dl = d*scale and ml = dmin*min (Q3_K, Q6_K: ml = 0, so w = dl*q exactly). The
  block's dot is kept in 8 float32 lanes, lane l summing w[e]*x[e] for the elements
  e = l, l+8, l+16, ... in increasing order; the block's value is
  ((l0+l4) + (l2+l6)) + ((l1+l5) + (l3+l7)), and out[row] += that.

* int8 mode: the activation is quantized as ggml's `quantize_row_q8_K_ref` (block_q8_K): per
  256-value block b, max = the first value of largest magnitude, iscale = -127/max,
  q = min(127, nearest_int(iscale*x)) into xq, d = 1/iscale (float32, not fp16) into xd[b]; an
  all-zero block gets d = 0 and q = 0. xs[j] holds the sum of the 32 quants of 32-group j
  (ggml's bsums[2j] + bsums[2j+1]; Q4_K/Q5_K read these, Q2_K recomputes its 16-value bsums
  from xq, Q3_K/Q6_K need none). Each weight block is then dotted as ggml's reference C
  `ggml_vec_dot_q*_K_q8_K_generic` (ggml-cpu/quants.c) computes a row of ONE super-block, and
  that value is added to out[row]:
    Q2_K: isum = sum over 16-groups of scale*sum(q8*q), summs = sum of bsums*min (exact
          integers); value = (y.d*d)*isum - (y.d*dmin)*summs.
    Q3_K, Q6_K: the 8 integer lanes aux32[l] = sum of scale*(q8*q) over elements e = l mod 8
          (exact); value = 0 + D*aux32[0] + D*aux32[1] + ... + D*aux32[7], left to right,
          D = d*y.d.
    Q4_K, Q5_K: the same lanes, and sumi = sum of bsums*min; value starts at
          0 - (dmin*y.d)*sumi, then + D*aux32[l] for l = 0..7, left to right.
  For Q2_K, a row summed block by block into a zeroed out[row] is exactly ggml's result; for
  the others ggml keeps the 8 lane sums across the blocks of a row and adds them at the end,
  so a row of several blocks can differ from ggml's in the last bits (the integers are the
  same). (rwkv.cpp has no k-quants, so unlike formats/kernels.py nothing here emulates ggml's
  AVX2 lanes; the generic C is what every ggml build without SIMD kernels computes.)

Kernels take the type as a run-time int (one compile each, cached on disk), compiled for one
explicit signature the first time a wrapper runs (read-only inputs, C-contiguous 1-D arrays):
wrong dtypes or strided arrays fail numba's dispatch and are reported as BadInput. The
wrappers validate sizes and never allocate.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from . import kquants
from .errors import BadInput
from .jit import kernel
from .kernels import (_F32, _I32, _I64, _at, _bad_arrays, _data_ptr, _f16_bits_to_f32, _load,
                      _ro, _rw, _splat, _store, _vt, check_run)
from .kquants import _nearest_int, _q3_scale, _scale_min_k4

QK_K = 256
T_Q2_K, T_Q3_K, T_Q4_K, T_Q5_K, T_Q6_K = 10, 11, 12, 13, 14

# ggml type id -> (name, kquants' kind code, bytes per block)
TYPES = {T_Q2_K: ("Q2_K", kquants._Q2_K, 84), T_Q3_K: ("Q3_K", kquants._Q3_K, 110),
         T_Q4_K: ("Q4_K", kquants._Q4_K, 144), T_Q5_K: ("Q5_K", kquants._Q5_K, 176),
         T_Q6_K: ("Q6_K", kquants._Q6_K, 210)}

_F0 = np.float32(0.0)


# ---------------------------------------------------------------------------------------------
# The kernels

@kernel
def _half(buf, o):
    return _f16_bits_to_f32(np.int64(buf[o]) | (np.int64(buf[o + 1]) << 8))


@kernel
def _scales(buf, o, kind, sc, mn):
    """sc[g] and mn[g], the scale and min of 16-group g of the block at buf[o:] (Q3_K: scale -
    32; Q6_K: the int8 scale; Q4_K/Q5_K: the 32-group's 6-bit values, repeated for its two
    16-groups; mn = 0 for Q3_K/Q6_K). Returns (d, dmin) as float32 (dmin = 0 for Q3_K/Q6_K)."""
    if kind == 0:                                    # Q2_K
        for g in range(16):
            s = np.int32(buf[o + g])
            sc[g] = s & 0xF
            mn[g] = s >> 4
        return _half(buf, o + 80), _half(buf, o + 82)
    if kind == 1:                                    # Q3_K
        for g in range(16):
            sc[g] = _q3_scale(buf, o + 96, g) - 32
            mn[g] = 0
        return _half(buf, o + 108), _F0
    if kind == 4:                                    # Q6_K
        for g in range(16):
            s = np.int32(buf[o + 192 + g])
            sc[g] = s - ((s & 128) << 1)
            mn[g] = 0
        return _half(buf, o + 208), _F0
    for j in range(8):                               # Q4_K / Q5_K
        s, m = _scale_min_k4(j, buf, o + 4)
        sc[2 * j] = s
        sc[2 * j + 1] = s
        mn[2 * j] = m
        mn[2 * j + 1] = m
    return _half(buf, o), _half(buf, o + 2)


# The dot of one unpacked block as straight-line vector IR: the 8 lanes are one <8 x float>
# (<8 x i32>) in a register, lane l taking elements l, l+8, l+16, ... in increasing order,
# which is the order the module header specifies, so the vectors change nothing but speed.

def _bytes8(context, builder, bt, buf, o, at):
    """buf[o+at : o+at+8] as <8 x i32> (unsigned bytes)."""
    p = _data_ptr(context, builder, bt, buf, builder.add(o, ir.Constant(_I64, at)))
    return builder.zext(_load(builder, p, _vt(ir.IntType(8), 8)), _vt(_I32, 8))


def _bits(builder, v, shift, mask):
    """(v >> shift) & mask, lane-wise on <8 x i32>."""
    if shift:
        v = builder.lshr(v, _splat(builder, ir.Constant(_I32, shift), 8))
    return builder.and_(v, _splat(builder, ir.Constant(_I32, mask), 8))


def _quants8(context, builder, kind, bt, buf, o, e):
    """Elements e .. e+7 (e % 8 == 0) of the block at buf[o:] as <8 x i32>, as the dot uses
    them (Q2_K 0..3, Q3_K -4..3, Q4_K 0..15, Q5_K 0..31, Q6_K -32..31): ggml's layouts
    (formats/kquants.py), each 8 consecutive elements being 8 consecutive bytes of a plane."""
    def plane(at, shift, mask):
        return _bits(builder, _bytes8(context, builder, bt, buf, o, at), shift, mask)

    if kind in (0, 1, 4):            # 128-element halves h, four 32-quarters j, ll in a quarter
        h, j, ll = e // 128, (e % 128) // 32, e % 32
        if kind == 0:                                # Q2_K: 2 bits at 2j of qs[32h + ll]
            return plane(16 + 32 * h + ll, 2 * j, 3)
        if kind == 1:                                # Q3_K: minus 4 where hmask bit is clear
            lo = plane(32 + 32 * h + ll, 2 * j, 3)
            hm = plane(ll, 4 * h + j, 1)
            return builder.sub(lo, builder.shl(builder.xor(hm, _splat(
                builder, ir.Constant(_I32, 1), 8)), _splat(builder, ir.Constant(_I32, 2), 8)))
        lo = plane(64 * h + 32 * (j % 2) + ll, 4 * (j // 2), 0xF)     # Q6_K
        hi = plane(128 + 32 * h + ll, 2 * j, 3)
        q = builder.or_(lo, builder.shl(hi, _splat(builder, ir.Constant(_I32, 4), 8)))
        return builder.sub(q, _splat(builder, ir.Constant(_I32, 32), 8))
    h, hi_nib, ll = e // 64, (e % 64) // 32, e % 32  # Q4_K / Q5_K: 64-element pieces
    qs = 16 if kind == 2 else 48
    q = plane(qs + 32 * h + ll, 4 * hi_nib, 0xF)
    if kind == 3:
        q = builder.or_(q, builder.shl(plane(16 + ll, 2 * h + hi_nib, 1),
                                       _splat(builder, ir.Constant(_I32, 4), 8)))
    return q


def _scalar(context, builder, at, a, i):
    return builder.load(_data_ptr(context, builder, at, a, i))


@intrinsic
def _block_float(typingctx, kind, buf, o, sc, mn, d, dmin, xf, x0):
    """float mode: the value of the block at buf[o:] (kind: a literal), ((l0+l4)+(l2+l6)) +
    ((l1+l5)+(l3+l7)) of the lanes l += (d*sc[g]*q - dmin*mn[g]) * x, element by element."""
    if not isinstance(kind, types.IntegerLiteral):
        return None
    k = kind.literal_value
    sig = types.float32(kind, buf, types.int64, sc, mn, types.float32, types.float32, xf,
                        types.int64)

    def codegen(context, builder, sig, args):
        _, buf, o, sc, mn, d, dmin, xf, x0 = args
        _, bt, _, sct, mnt, _, _, xft, _ = sig.args
        v8 = _vt(_F32, 8)
        acc = ir.Constant(v8, [0.0] * 8)
        for g in range(16):
            gi = ir.Constant(_I64, g)
            a = builder.fmul(d, builder.sitofp(_scalar(context, builder, sct, sc, gi), _F32))
            m = builder.fmul(dmin, builder.sitofp(_scalar(context, builder, mnt, mn, gi), _F32))
            for h in range(2):
                e = 16 * g + 8 * h
                w = builder.fsub(builder.fmul(_splat(builder, a, 8), builder.sitofp(
                    _quants8(context, builder, k, bt, buf, o, e), v8)), _splat(builder, m, 8))
                x = _load(builder, _data_ptr(context, builder, xft, xf,
                                             builder.add(x0, ir.Constant(_I64, e))), v8)
                acc = builder.fadd(acc, builder.fmul(w, x))
        lane = [builder.extract_element(acc, ir.Constant(_I32, i)) for i in range(8)]
        return builder.fadd(builder.fadd(builder.fadd(lane[0], lane[4]),
                                         builder.fadd(lane[2], lane[6])),
                            builder.fadd(builder.fadd(lane[1], lane[5]),
                                         builder.fadd(lane[3], lane[7])))

    return sig, codegen


@intrinsic
def _block_int(typingctx, kind, buf, o, sc, mn, xq, x0, lanes):
    """int8 mode: lanes[0:8] = the 8 integer lanes of the block at buf[o:] (kind: a literal),
    lane l = sum of sc[g]*(q*q8) over the elements e = l mod 8; Q2_K also lanes[8:16], the
    same sums of mn[g]*q8, which add up to its summs. Exact int32, so the order of the terms
    does not matter."""
    if not isinstance(kind, types.IntegerLiteral):
        return None
    k = kind.literal_value
    sig = types.void(kind, buf, types.int64, sc, mn, xq, types.int64, lanes)

    def codegen(context, builder, sig, args):
        _, buf, o, sc, mn, xq, x0, lanes = args
        _, bt, _, sct, mnt, xqt, _, lt = sig.args
        i8 = _vt(_I32, 8)
        acc = acc_m = ir.Constant(i8, [0] * 8)
        for g in range(16):
            gi = ir.Constant(_I64, g)
            s = _splat(builder, _scalar(context, builder, sct, sc, gi), 8)
            if k == 0:
                mv = _splat(builder, _scalar(context, builder, mnt, mn, gi), 8)
            for h in range(2):
                e = 16 * g + 8 * h
                x = builder.sext(_load(builder, _data_ptr(
                    context, builder, xqt, xq, builder.add(x0, ir.Constant(_I64, e))),
                    _vt(ir.IntType(8), 8)), i8)
                prod = builder.mul(_quants8(context, builder, k, bt, buf, o, e), x)
                acc = builder.add(acc, builder.mul(s, prod))
                if k == 0:
                    acc_m = builder.add(acc_m, builder.mul(mv, x))
        _store(builder, acc, _data_ptr(context, builder, lt, lanes, ir.Constant(_I64, 0)))
        if k == 0:
            _store(builder, acc_m, _data_ptr(context, builder, lt, lanes, ir.Constant(_I64, 8)))
        return context.get_dummy_value()

    return sig, codegen


@kernel
def _matvec_kernel(kind, int8_mode, buf, n_blocks, first_block, blocks_per_row, xf, xq, xd, xs,
                   out):
    """The n_blocks blocks in buf (global blocks first_block, ...) into out (module header):
    each block's scales unpacked, then its quants decoded and dotted by the intrinsics above."""
    if kind == 0:
        bb = 84
    elif kind == 1:
        bb = 110
    elif kind == 2:
        bb = 144
    elif kind == 3:
        bb = 176
    else:
        bb = 210
    sc = np.empty(16, np.int32)
    mn = np.empty(16, np.int32)
    lanes = np.empty(16, np.int32)
    for k in range(n_blocks):
        blk = first_block + k
        row = blk // blocks_per_row
        c = blk - row * blocks_per_row              # column block: activation x[256c:256c+256]
        x0 = QK_K * c
        o = k * bb
        d, dmin = _scales(buf, o, kind, sc, mn)
        if not int8_mode:
            if kind == 0:                            # the IR is specialised per layout
                t = _block_float(0, buf, o, sc, mn, d, dmin, xf, x0)
            elif kind == 1:
                t = _block_float(1, buf, o, sc, mn, d, dmin, xf, x0)
            elif kind == 2:
                t = _block_float(2, buf, o, sc, mn, d, dmin, xf, x0)
            elif kind == 3:
                t = _block_float(3, buf, o, sc, mn, d, dmin, xf, x0)
            else:
                t = _block_float(4, buf, o, sc, mn, d, dmin, xf, x0)
            out[row] += t
            continue
        yd = xd[c]
        if kind == 0:                                # the 8 exact integer lanes
            _block_int(0, buf, o, sc, mn, xq, x0, lanes)
        elif kind == 1:
            _block_int(1, buf, o, sc, mn, xq, x0, lanes)
        elif kind == 2:
            _block_int(2, buf, o, sc, mn, xq, x0, lanes)
        elif kind == 3:
            _block_int(3, buf, o, sc, mn, xq, x0, lanes)
        else:
            _block_int(4, buf, o, sc, mn, xq, x0, lanes)
        i0, i1, i2, i3, i4, i5, i6, i7 = (lanes[0], lanes[1], lanes[2], lanes[3], lanes[4],
                                          lanes[5], lanes[6], lanes[7])
        if kind == 0:                                # Q2_K
            isum = np.int64(i0) + i1 + i2 + i3 + i4 + i5 + i6 + i7
            summs = np.int64(0)
            for j in range(8, 16):
                summs += lanes[j]
            v = (yd * d) * np.float32(isum) - (yd * dmin) * np.float32(summs)
        else:
            v = _F0
            if kind == 2 or kind == 3:               # Q4_K / Q5_K: the mins
                sumi = np.int64(0)
                for j in range(8):
                    sumi += np.int64(_at(xs, 8 * c + j)) * mn[2 * j]
                v = v - (dmin * yd) * np.float32(sumi)
            dd = d * yd
            v = v + dd * np.float32(i0)
            v = v + dd * np.float32(i1)
            v = v + dd * np.float32(i2)
            v = v + dd * np.float32(i3)
            v = v + dd * np.float32(i4)
            v = v + dd * np.float32(i5)
            v = v + dd * np.float32(i6)
            v = v + dd * np.float32(i7)
        out[row] += v


@kernel
def _prepare_kernel(int8_mode, x, xf, xq, xd, xs):
    """float mode: xf = x; int8 mode: quantize_row_q8_K_ref into xq/xd, 32-sums into xs."""
    n = x.size
    if not int8_mode:
        for i in range(n):
            xf[i] = x[i]
        return
    for b in range(n // QK_K):
        i0 = QK_K * b
        mx = _F0
        amax = _F0
        for j in range(QK_K):
            ax = np.abs(x[i0 + j])
            if ax > amax:
                amax = ax
                mx = x[i0 + j]
        if amax == _F0:
            xd[b] = _F0
            for j in range(QK_K):
                xq[i0 + j] = 0
            for j in range(8):
                xs[8 * b + j] = _F0
            continue
        iscale = np.float32(-127.0) / mx
        for j in range(QK_K):
            v = min(127, _nearest_int(iscale * x[i0 + j]))
            xq[i0 + j] = ((v + 128) & 0xFF) - 128          # int8_t store
        for j in range(8):
            s = np.int64(0)
            for ll in range(32):
                s += np.int64(xq[i0 + 32 * j + ll])
            xs[8 * b + j] = np.float32(s)
        xd[b] = np.float32(1.0) / iscale


@kernel
def _dequantize_into_kernel(kind, buf, n_blocks, out):
    """The table's dequantizer (formats/kquants.py) on the whole blocks at the start of buf."""
    bb = 84 if kind == 0 else 110 if kind == 1 else 144 if kind == 2 else 176 if kind == 3 \
        else 210
    kquants._dequantize_blocks(buf[:n_blocks * bb], out[:n_blocks * QK_K], kind)


_SIGNATURES = {
    "matvec": (_matvec_kernel, types.void(
        types.int64, types.boolean, _ro(types.uint8), types.int64, types.int64, types.int64,
        _ro(types.float32), _ro(types.int8), _ro(types.float32), _ro(types.float32),
        _rw(types.float32))),
    "prepare": (_prepare_kernel, types.void(
        types.boolean, _ro(types.float32), _rw(types.float32), _rw(types.int8),
        _rw(types.float32), _rw(types.float32))),
    "dequantize_into": (_dequantize_into_kernel, types.void(
        types.int64, _ro(types.uint8), types.int64, _rw(types.float32))),
}
_ready: dict = {}


def _compiled(which: str):
    """The kernel compiled (or loaded from the cache) for its one signature on first use."""
    fn = _ready.get(which)
    if fn is None:
        fn, sig = _SIGNATURES[which]
        fn.compile(sig)
        fn.disable_compile()
        _ready[which] = fn
    return fn


# ---------------------------------------------------------------------------------------------
# Public wrappers: cheap checks, no allocation

def _spec(what: str, type_id):
    spec = TYPES.get(type_id)
    if spec is None:
        raise BadInput(f"{what}: type id {type_id!r} is not a k-quant "
                       f"(known: {', '.join(f'{k} {v[0]}' for k, v in TYPES.items())})")
    return spec


def prepare_activation(type_id: int, int8_mode: bool, x: np.ndarray, xf: np.ndarray,
                       xq: np.ndarray, xd: np.ndarray, xs: np.ndarray) -> None:
    """Fill the preallocated buffers with the activation x (float32[n], n a multiple of 256)
    for a k-quant dot: float mode xf[:n] = x; int8 mode ggml's quantize_row_q8_K_ref into
    xq[:n] (int8) and xd[:n // 256] (float32 d), and the 32-value sums of the quants into
    xs[:n // 32] (module header). Finite x assumed."""
    name, _, _ = _spec("prepare_activation", type_id)
    n = len(x)
    if n % QK_K:
        raise BadInput(f"prepare_activation {name}: needs a multiple of {QK_K} values, got {n}")
    if not int8_mode:
        if len(xf) < n:
            raise BadInput(f"prepare_activation {name}: xf holds {len(xf)} values, needs {n}")
    elif len(xq) < n or len(xd) < n // QK_K or len(xs) < n // 32:
        raise BadInput(f"prepare_activation {name}: {n} values need xq of {n}, xd of "
                       f"{n // QK_K} and xs of {n // 32}, got {len(xq)}, {len(xd)}, {len(xs)}")
    try:
        _compiled("prepare")(bool(int8_mode), x, xf, xq, xd, xs)
    except TypeError:
        raise _bad_arrays("prepare_activation", x=x, xf=xf, xq=xq, xd=xd, xs=xs) from None


def matvec_blocks(type_id: int, int8_mode: bool, buf: np.ndarray, n_blocks: int,
                  first_block: int, blocks_per_row: int, xf: np.ndarray, xq: np.ndarray,
                  xd: np.ndarray, xs: np.ndarray, out: np.ndarray, row_state=None) -> None:
    """Add the n_blocks whole super-blocks in buf[:n_blocks * block_bytes] to out: global
    blocks first_block, first_block + 1, ... of a row-major matrix of blocks_per_row blocks a
    row (block g: row g // blocks_per_row, columns 256 * (g % blocks_per_row) + 0..255).
    Each block's value (module header) is added to out[row] on its own, so runs may start and
    end anywhere; row_state is ignored. xf/xq/xd/xs: what prepare_activation filled for the
    same type and mode (only those the mode reads are checked for size)."""
    name, kind, bb = _spec("matvec", type_id)
    check_run(name, buf, bb, n_blocks, first_block, blocks_per_row, out)
    n_in = blocks_per_row * QK_K
    if not int8_mode:
        if len(xf) < n_in:
            raise BadInput(f"matvec {name}: rows of {n_in} need xf of {n_in}, got {len(xf)}")
    elif len(xq) < n_in or len(xd) < blocks_per_row or len(xs) < n_in // 32:
        raise BadInput(f"matvec {name}: rows of {n_in} need xq of {n_in}, xd of "
                       f"{blocks_per_row} and xs of {n_in // 32}, got {len(xq)}, {len(xd)}, "
                       f"{len(xs)}")
    try:
        _compiled("matvec")(kind, bool(int8_mode), buf, n_blocks, first_block, blocks_per_row,
                            xf, xq, xd, xs, out)
    except TypeError:
        raise _bad_arrays("matvec", buf=buf, xf=xf, xq=xq, xd=xd, xs=xs, out=out) from None


def dequantize_into(type_id: int, buf: np.ndarray, out: np.ndarray) -> None:
    """Dequantize the whole blocks in buf (uint8, whole blocks) into out[:blocks * 256]
    (float32), exactly as the type table's dequantize (ggml's dequantize_row_q*_K)."""
    name, kind, bb = _spec("dequantize_into", type_id)
    nb, rem = divmod(len(buf), bb)
    if rem:
        raise BadInput(f"dequantize_into {name}: {len(buf)} bytes are not whole {bb}-byte blocks")
    if len(out) < nb * QK_K:
        raise BadInput(f"dequantize_into {name}: {nb * QK_K} values do not fit in out of "
                       f"{len(out)}")
    try:
        _compiled("dequantize_into")(kind, buf, nb, out)
    except TypeError:
        raise _bad_arrays("dequantize_into", buf=buf, out=out) from None
