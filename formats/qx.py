"""QX: mixed per-block precision with sparse FP16 outliers (type id 128, a variable-size type).

Every block of B = 32 or 64 consecutive elements of a row picks its own bit width (0..8, or a
raw fp16 block), a symmetric or asymmetric grid, and up to 7 outliers stored exactly as fp16
(position + value pairs, not a bitmap). A block's size follows from its first byte, so a
reader walks a row block by block; rows never share a block. The byte layout is in
docs/format.md (7.1 "QX blocks"); in short:

  byte 0   bits 0-3 width code c (0..8 = bits per quant, 15 = raw fp16 block)
           bit 4    S (symmetric grid, no offset field)
           bits 5-7 n_out (outliers, 0..7)
  c == 15:  f16 value[B]                              (S = 0, n_out = 0)
  else:     f16 d              if c > 0
            f16 m              if S == 0
            u8  pos[n_out]     strictly increasing, < B
            f16 val[n_out]
            quants: B/32 groups of 32 elements, 4c bytes each, as bit planes (below)
  size = 1 + 2*(c > 0) + 2*(S == 0) + 3*n_out + B*c/8   (c == 15: 1 + 2B)

  value of element e: val[j] if pos[j] == e; else S == 0: q_e*d + m (two f32 roundings;
  c == 0: m); S == 1: (q_e - 2^(c-1))*d (c == 0: 0).

Quants of a 32-element group are bit planes, lowest bits first: c = 8 is one byte per element;
otherwise a 4-bit plane if c & 4, then a 2-bit plane if c & 2, then a 1-bit plane if c & 1,
and q = plane4 | plane2 << (c & 4) | plane1 << (c & 6). A plane of b bits is 4b bytes; element
e (0..31) sits in byte e mod 4b at bit b*floor(e / 4b) (ggml's split-nibble order for b = 4),
so a few vector loads, uniform shifts and shuffles unpack a whole group, and a width
known only at run time needs no branch (the planes sit at offsets computed from c).

The payload of a record (what QuantType._quantize returns) is `u32 row_offset[rows + 1]`
(byte offsets from the payload start; row_offset[0] = 4*(rows + 1), row_offset[rows] = size)
followed by the rows.

Quantizer (`quantize_rows`): every block's candidate encodings (each width of the settings and
0 and fp16, symmetric or not, 0..max_outliers outliers taken from the ends of the value range)
are evaluated exactly (the f32 values a board computes), then
* error-bound mode (`err=`, `rel=`): grids that cover the non-outliers' range (d rounded up);
  each block takes its smallest encoding with every weight within
  tol_e = max(err, rel * max(|x_e|, floor)) of its source (floor = the tensor's RMS in rel
  mode; an outlier's error is its fp16 rounding), the lowest weighted squared error among
  equal sizes; a block no encoding meets (a bound finer than fp16) is stored as raw fp16;
* target-size mode (`bpw=`): least-squares grids (symmetric: ggml's Q4_0 choice
  d = vmax / -2^(c-1); then one weighted least-squares refit of d, m for the quants found, kept
  if better), the lower convex hull (bytes, weighted squared error) of each block's
  encodings, and hull steps taken globally in order of error saved per byte while the tensor
  (row table and block headers included) fits rows*cols*bpw/8 bytes; what is left is less
  than one block's next step (so less than one block).
Importance weights (float32[cols]) weight each column's squared error (in error-bound mode
they only break ties).

Board kernels (BoardOps): `prepare_activation` (xf = x; int8 mode adds ggml's Q8_0 arithmetic
per block of B elements in xq/xd -- one activation scale per weight block, so the int8 dot of
a block is one integer sum -- and xs[b] = the exact integer sum of xq over block b as float32),
`matvec_blocks`, `dequantize_into`, `count_blocks`. The 32-element group unpack and dot
products are LLVM vector IR (formats/kernels.py explains why), and so are the matvec's loops
over a class of blocks and its header walk (_fdense_run, _idense_run, _Walker); the chunk and
class control is numba.
"""
from __future__ import annotations

import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from . import kernels as K
from .errors import BadInput
from .jit import kernel
from .kernels import (_I8, _I32, _I64, _F32, _at, _const_vec, _data_ptr, _f16_bits_to_f32,
                      _f32_to_f16_bits, _load, _splat, _store, _tree_sum, _vt)

TYPE_ID = 128
NAME = "QX"
RAW = 15                  # width code of a raw fp16 block
MAX_OUT = 7               # n_out is 3 bits
G = 32                    # elements per quant group (and per Q8_0 activation block)
DEFAULT_WIDTHS = (1, 2, 3, 4, 5, 6, 8)
# 64, not 32: at the same bits per weight 64-blocks measured lower KL on every fixture
# (docs/quality) and half the per-block cost of the matvec (a block's header walk and
# bookkeeping cost about as much as Q4_0's whole 32-block dot)
DEFAULT_BLOCK_SIZE = 64
_MAX_THREADS = 8                  # quantize_rows: threads at most, and weights at least per
_MIN_THREAD_WEIGHTS = 1 << 16     # thread (below that a thread costs more than it saves)


# ---------------------------------------------------------------------------------------------
# Settings

@dataclass(frozen=True)
class QXSettings:
    """How to quantize: block_size 32 or 64; exactly one of bpw (target bits per weight,
    everything included), err (absolute bound), rel (relative bound); the widths a block may
    use besides 0 and fp16; at most max_outliers (0..7) fp16 outliers per block."""
    block_size: int = DEFAULT_BLOCK_SIZE
    bpw: float | None = 4.5
    err: float | None = None
    rel: float | None = None
    widths: tuple = DEFAULT_WIDTHS
    max_outliers: int = 4

    def __post_init__(self):
        if self.block_size not in (32, 64):
            raise BadInput(f"QX block size must be 32 or 64, got {self.block_size}")
        modes = [v for v in (self.bpw, self.err, self.rel) if v is not None]
        if len(modes) != 1:
            raise BadInput("QX needs exactly one of bpw=, err=, rel=")
        if not all(np.isfinite(v) and v > 0 for v in modes):
            raise BadInput(f"QX: bpw/err/rel must be a positive number, got {modes[0]}")
        if not self.widths or any(w not in range(1, 9) for w in self.widths):
            raise BadInput(f"QX widths must be among 1..8, got {self.widths}")
        if self.max_outliers not in range(0, MAX_OUT + 1):
            raise BadInput(f"QX outliers must be 0..{MAX_OUT}, got {self.max_outliers}")

    def options(self) -> str:
        mode = (f"bpw={self.bpw:g}" if self.bpw is not None else
                f"err={self.err:g}" if self.err is not None else f"rel={self.rel:g}")
        return (f"bs={self.block_size},{mode},widths={','.join(map(str, self.widths))},"
                f"outliers={self.max_outliers}")


def parse_options(options: str, base: QXSettings | None = None) -> QXSettings:
    """"bs=64,bpw=3.5,widths=2,3,4,5,6,8,outliers=4" -> QXSettings (bare numbers after
    widths= continue its list)."""
    base = base or QXSettings()
    got: dict = {}
    key = None
    for tok in (t.strip() for t in options.split(",")):
        if not tok:
            continue
        if "=" in tok:
            key, _, val = (s.strip() for s in tok.partition("="))
            key = key.lower()
        elif key == "widths":
            val = tok
        else:
            raise BadInput(f"QX option {tok!r} is not key=value (keys: bs, bpw, err, rel, "
                           "widths, outliers)")
        try:
            if key in ("bs", "block_size"):
                got["block_size"] = int(val)
            elif key in ("bpw", "err", "rel"):
                got[key] = float(val)
            elif key == "widths":
                got["widths"] = got.get("widths", ()) + (int(val),) if "=" not in tok \
                    else (int(val),)
            elif key == "outliers":
                got["max_outliers"] = int(val)
            else:
                raise BadInput(f"unknown QX option {key!r} (keys: bs, bpw, err, rel, widths, "
                               "outliers)")
        except ValueError:
            raise BadInput(f"QX option {key}={val!r} is not a number") from None
    if any(k in got for k in ("bpw", "err", "rel")):
        got = {"bpw": None, "err": None, "rel": None, **got}
    if "widths" in got:
        got["widths"] = tuple(sorted(set(got["widths"])))
    return replace(base, **got)


def block_bytes(code: int, sym: int, n_out: int, B: int) -> int:
    if code == RAW:
        return 1 + 2 * B
    return 1 + 2 * (code > 0) + 2 * (sym == 0) + 3 * n_out + B * code // 8


def max_block_bytes(B: int) -> int:
    return max(1 + 2 * B, block_bytes(8, 0, MAX_OUT, B))


# ---------------------------------------------------------------------------------------------
# Scalar helpers (numba)

@kernel(inline="always")
def _f16(h):
    return _f16_bits_to_f32(h)


@kernel(inline="always")
def _f16_up(f):
    """The fp16 bits of the smallest-magnitude fp16 >= |f| in magnitude, with f's sign."""
    h = _f32_to_f16_bits(f)
    if np.abs(_f16_bits_to_f32(h)) < np.abs(f) and (h & 0x7FFF) < 0x7C00:
        h += 1
    return h


@kernel(inline="always")
def _put_q(out, qo, c, e, q):
    """Store quant q of element e of the group at out[qo] (planes zeroed beforehand)."""
    if c == 8:
        out[qo + e] = q
        return
    off = qo
    for b in (4, 2, 1):
        if c & b:
            nb = 4 * b
            out[off + e % nb] |= (q & ((1 << b) - 1)) << (b * (e // nb))
            q >>= b
            off += nb


# ---------------------------------------------------------------------------------------------
# Vector IR: one 32-element group

def _concat(builder, parts):
    """Concatenate equal-length vectors, in order (a shuffle tree)."""
    while len(parts) > 1:
        n = parts[0].type.count
        parts = [builder.shuffle_vector(parts[i], parts[i + 1], _const_vec(_I32, range(2 * n)))
                 for i in range(0, len(parts), 2)]
    return parts[0]


def _emit_q32(builder, ptr, c):
    """The 32 quants (unsigned, < 2^c) of the group whose planes start at i8* ptr."""
    if c == 8:
        return _load(builder, ptr, _vt(_I8, 32))
    q = None
    off = 0
    shift = 0
    for b in (4, 2, 1):
        if not c & b:
            continue
        nb = 4 * b
        v = _load(builder, builder.gep(ptr, [ir.Constant(_I64, off)]), _vt(_I8, nb))
        if b == 1:
            # bit e // 4 of byte e % 4, moved to bit `shift`: a test and a select
            rep = builder.shuffle_vector(v, v, _const_vec(_I32, [e % 4 for e in range(32)]))
            bit = builder.and_(rep, _const_vec(_I8, [1 << (e // 4) for e in range(32)]))
            part = builder.select(builder.icmp_unsigned("!=", bit, _const_vec(_I8, [0] * 32)),
                                  _const_vec(_I8, [1 << shift] * 32),
                                  _const_vec(_I8, [0] * 32))
        else:
            # segment s of the group = (plane >> b*s) & mask: uniform shifts, then concatenated
            mask = _const_vec(_I8, [(1 << b) - 1] * nb)
            segs = []
            for sgm in range(8 // b):
                t = v if sgm == 0 else builder.lshr(v, _const_vec(_I8, [b * sgm] * nb))
                segs.append(builder.and_(t, mask))
            part = _concat(builder, segs)
            if shift:
                part = builder.shl(part, _const_vec(_I8, [shift] * 32))
        q = part if q is None else builder.or_(q, part)
        off += nb
        shift += b
    return q


@intrinsic
def _fdot_const(typingctx, v, xf, xo):
    """Tree sum of v * xf[xo:xo+32]."""
    sig = types.float32(types.float32, xf, types.int64)

    def codegen(context, builder, sig, args):
        v, xf, xo = args
        x = _load(builder, _data_ptr(context, builder, sig.args[1], xf, xo), _vt(_F32, 32))
        return _tree_sum(builder, builder.fmul(_splat(builder, v, 32), x), 32)

    return sig, codegen


@intrinsic
def _fdot_f16(typingctx, buf, o, xf, xo):
    """Tree sum of the 32 fp16 values at buf[o:] times xf[xo:xo+32]."""
    sig = types.float32(buf, types.int64, xf, types.int64)

    def codegen(context, builder, sig, args):
        buf, o, xf, xo = args
        h = _load(builder, _data_ptr(context, builder, sig.args[0], buf, o), _vt(K._I16, 32))
        w = builder.fpext(builder.bitcast(h, _vt(ir.HalfType(), 32)), _vt(_F32, 32))
        x = _load(builder, _data_ptr(context, builder, sig.args[2], xf, xo), _vt(_F32, 32))
        return _tree_sum(builder, builder.fmul(w, x), 32)

    return sig, codegen


def _emit_w32(builder, ptr, c, d, m, zq):
    """float(q - zq)*d + m for the group at ptr, as <32 x float>."""
    return _emit_wq(builder, _emit_q32(builder, ptr, c), d, m, zq)


def _switch_width(builder, c, emit, result_type):
    """LLVM `switch` over the width code c (1..8): emit(builder, width) in each case, the
    results merged by a phi (c outside 1..8 takes width 8's path; callers never pass it)."""
    fn = builder.function
    merge = fn.append_basic_block("qx_merge")
    cases = [fn.append_basic_block(f"qx_w{w}") for w in range(1, 9)]
    sw = builder.switch(builder.trunc(c, _I32), cases[7])
    for w in range(1, 8):
        sw.add_case(ir.Constant(_I32, w), cases[w - 1])
    incoming = []
    for w, bb in zip(range(1, 9), cases):
        builder.position_at_end(bb)
        v = emit(builder, w)
        incoming.append((v, builder.block))
        builder.branch(merge)
    builder.position_at_end(merge)
    if result_type is None:
        return None
    phi = builder.phi(result_type)
    for v, bb in incoming:
        phi.add_incoming(v, bb)
    return phi


@intrinsic
def _deq_any(typingctx, buf, o, c, d, m, zq, out, i):
    """out[i:i+32] = float(q - zq)*d + m for the group (width c = 1..8) at buf[o:]."""
    sig = types.void(buf, types.int64, types.int64, types.float32, types.float32, types.int64,
                     out, types.int64)

    def codegen(context, builder, sig, args):
        buf, o, c, d, m, zq, out, i = args
        ptr = _data_ptr(context, builder, sig.args[0], buf, o)
        dst = _data_ptr(context, builder, sig.args[6], out, i)

        def emit(b, w):
            _store(b, _emit_w32(b, ptr, w, d, m, zq), dst)
            return None

        _switch_width(builder, c, emit, None)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _f16x32(typingctx, buf, o, out, i):
    """out[i:i+32] = the 32 fp16 values at buf[o:] (exact)."""
    sig = types.void(buf, types.int64, out, types.int64)

    def codegen(context, builder, sig, args):
        buf, o, out, i = args
        h = _load(builder, _data_ptr(context, builder, sig.args[0], buf, o), _vt(K._I16, 32))
        w = builder.fpext(builder.bitcast(h, _vt(ir.HalfType(), 32)), _vt(_F32, 32))
        _store(builder, w, _data_ptr(context, builder, sig.args[2], out, i))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _h(typingctx, buf, o):
    """The fp16 at buf[o:o+2] as float32 (exact)."""
    def codegen(context, builder, sig, args):
        return K._half_at(context, builder, sig, args, 0)
    return types.float32(buf, types.int64), codegen


@intrinsic
def _fill32(typingctx, out, i, v):
    """out[i:i+32] = v."""
    sig = types.void(out, types.int64, types.float32)

    def codegen(context, builder, sig, args):
        out, i, v = args
        _store(builder, _splat(builder, v, 32), _data_ptr(context, builder, sig.args[0], out, i))
        return context.get_dummy_value()

    return sig, codegen


def _run_header(context, builder, sig, buf, offs, x0s, lst, base, i, w, sym, kd):
    """For entry i of a block list: (block index, offset, x0, n_out, d, m, offset of the
    quants) of a block of width w (1..8), S = sym (m = -0.0 if S = 1) and outlier kind kd
    (_width_runs: below 3 the class fixes n_out, so the header byte is not read)."""
    bt, ot, xt, lt = sig.args[:4]
    kb = builder.sext(builder.load(_data_ptr(context, builder, lt, lst, builder.add(base, i))),
                      _I64)
    o = builder.load(_data_ptr(context, builder, ot, offs, kb))
    x0 = builder.load(_data_ptr(context, builder, xt, x0s, kb))
    if kd < 3:
        n_out = ir.Constant(_I64, kd)
    else:
        hdr = builder.zext(builder.load(_data_ptr(context, builder, bt, buf, o)), _I64)
        n_out = builder.lshr(hdr, ir.Constant(_I64, 5))
    h = _load(builder, _data_ptr(context, builder, bt, buf, builder.add(o, ir.Constant(_I64, 1))),
              _vt(K._I16, 2))
    f = builder.fpext(builder.bitcast(h, _vt(ir.HalfType(), 2)), _vt(_F32, 2))
    d = builder.extract_element(f, ir.Constant(_I32, 0))
    m = (ir.Constant(_F32, -0.0) if sym else builder.extract_element(f, ir.Constant(_I32, 1)))
    qo = builder.add(builder.add(o, ir.Constant(_I64, 3 if sym else 5)),
                     builder.mul(n_out, ir.Constant(_I64, 3)))
    return kb, o, x0, n_out, d, m, qo


def _width_runs(builder, c, sym, kind, B, emit):
    """emit(builder, width, S, outlier kind, groups) for the run-time width c (1..8), S flag,
    outlier kind (0: none, 1: one, 2: two, 3: more) and block size B (32/64): the switches are
    outside the caller's loop, so the loop body is straight-line code (computing only what
    its kind of block needs)."""
    def split(flag, then):
        with builder.if_else(builder.icmp_signed("!=", flag, ir.Constant(_I64, 0))) as (y, n):
            with y:
                then(True)
            with n:
                then(False)

    def kinds(two, s):
        split(builder.icmp_signed(">=", kind, ir.Constant(_I64, 2)), lambda hi: split(
            builder.and_(kind, ir.Constant(_I64, 1)),
            lambda odd: emit_all(two, s, 2 * hi + odd)))

    def emit_all(two, s, kd):
        _switch_width(builder, c, lambda b, w: emit(b, w, s, kd, 2 if two else 1), None)

    split(builder.icmp_signed("==", B, ir.Constant(_I64, 64)),
          lambda two: split(sym, lambda s: kinds(two, s)))


def _outlined(builder, name, args, body):
    """Call `name`(args), an internal noinline function of the module made once by
    body(builder, params): a hot loop in a function of its own gets registers for its own
    values (in the big kernel the allocator spilled the header walk's offset, which put a
    store and a reload on the walk's chain of dependent loads). The header walk and each
    class's loop are made this way."""
    name = f"{name}_{zlib.crc32(str([a.type for a in args]).encode()):08x}"
    fn = builder.module.globals.get(name)
    if fn is None:
        fn = ir.Function(builder.module, ir.FunctionType(ir.VoidType(), [a.type for a in args]),
                         name)
        fn.linkage = "internal"
        fn.attributes.add("noinline")
        b = ir.IRBuilder(fn.append_basic_block("entry"))
        body(b, list(fn.args))
        b.ret_void()
    builder.call(fn, args)


def _dense_loops(context, sig, args, prefix, k_tables, block):
    """The `emit` of _width_runs for a dense-run intrinsic (args: buf, offs, x0s, lst, base,
    n, ..., the walker's tables at k_tables .. k_tables + 5, ch after them): each class's
    loop, block(builder, params, j, width, S, outlier kind, groups) per block plus a step of
    the walk, in a function of its own (_outlined)."""
    def emit(b, w, is_sym, kd, ng):
        def loop(fb, a):
            walker = _Walker.from_args(context, fb, sig, a, 0, k_tables, ng == 2,
                                       a[k_tables + 6])
            _run_loop(fb, a[5], walker, lambda fb, j: block(fb, a, j, w, is_sym, kd, ng))
        _outlined(b, f"{prefix}_w{w}s{int(is_sym)}k{kd}g{ng}", args, loop)
    return emit


def _intrinsic_call(builder, name, ret, args):
    fn = cgutils.get_or_insert_function(builder.module,
                                        ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args)


def _q_at(context, builder, bt, buf, qo, w, p):
    """Quant p (0..B-1) of the block of width w (1..8) whose quants start at buf[qo], as i32:
    byte loads and shifts, a few per bit plane."""
    i64 = lambda v: ir.Constant(_I64, v)
    e = builder.and_(p, i64(31))
    base = builder.add(qo, builder.mul(builder.lshr(p, i64(5)), i64(4 * w)))
    if w == 8:
        return builder.zext(builder.load(_data_ptr(context, builder, bt, buf,
                                                   builder.add(base, e))), _I32)
    q = None
    off = sh = 0
    for b in (4, 2, 1):
        if not w & b:
            continue
        nb = 4 * b
        byte = builder.zext(builder.load(_data_ptr(
            context, builder, bt, buf, builder.add(base, builder.add(
                builder.and_(e, i64(nb - 1)), i64(off))))), _I64)
        seg = builder.mul(builder.lshr(e, i64(nb.bit_length() - 1)), i64(b))
        v = builder.and_(builder.lshr(byte, seg), i64((1 << b) - 1))
        v = builder.shl(v, i64(sh)) if sh else v
        q = v if q is None else builder.or_(q, v)
        sh += b
        off += nb
    return builder.trunc(q, _I32)


def _outlier_slots(context, builder, bt, buf, o, n_out, kd, sym, B, x0, xft, xf):
    """[(live, position mod B, value, xf at x0 + position)] for the outliers of a block of
    width >= 1: kd = 1 or 2 of them, or kd = 3: n_out (3..7) in 7 slots, live an i1 (None: a
    slot always live); a dead slot reads the last live one again (no load leaves the block)."""
    i64 = lambda v: ir.Constant(_I64, v)
    po = builder.add(o, i64(3 if sym else 5))
    k = i64(kd) if kd < 3 else n_out
    slots = []
    for j in range(kd if kd < 3 else MAX_OUT):
        live = None if kd < 3 or j < 3 else builder.icmp_signed("<", i64(j), n_out)
        jj = i64(j) if live is None else builder.select(live, i64(j),
                                                       builder.sub(n_out, i64(1)))
        p = builder.and_(builder.zext(builder.load(_data_ptr(
            context, builder, bt, buf, builder.add(po, jj))), _I64), i64(B - 1))
        # the value with the next two bytes (another value or quants): a pair of fp16
        # converts well, a lone one badly
        h = _load(builder, _data_ptr(context, builder, bt, buf, builder.add(
            builder.add(po, k), builder.shl(jj, i64(1)))), _vt(K._I16, 2))
        val = builder.extract_element(builder.fpext(builder.bitcast(h, _vt(ir.HalfType(), 2)),
                                                    _vt(_F32, 2)), ir.Constant(_I32, 0))
        x = builder.load(_data_ptr(context, builder, xft, xf, builder.add(x0, p)))
        slots.append((live, p, val, x))
    return slots


def _add_term(builder, t, live, v):
    """t + v, or for a dead slot t + -0.0, which changes no bits of any t."""
    return builder.fadd(t, v if live is None else builder.select(live, v,
                                                                 ir.Constant(_F32, -0.0)))


@intrinsic
def _fdense_run(typingctx, buf, offs, x0s, lst, base, n, B, c, sym, kind, xf, tout, size_t,
                cls_t, offs2, lst2, ws, wcnt, ch):
    """Float mode, blocks lst[base:base+n] (indices into offs/x0s/tout), all of width c
    (1..8), S = sym and outlier kind `kind` (_width_runs): tout[kb] = the block's dot, 0 +
    the tree sums of the grid values times xf group by group, then each outlier's
    (val - grid value)*xf. Also walks the next chunk's headers (_Walker on size_t .. wcnt,
    ch)."""
    sig = types.void(buf, offs, x0s, lst, types.int64, types.int64, types.int64, types.int64,
                     types.int64, types.int64, xf, tout, size_t, cls_t, offs2, lst2, ws, wcnt,
                     types.int64)

    def codegen(context, builder, sig, args):
        B, c, sym, kind = args[6:10]
        bt, xft, tt = sig.args[0], sig.args[10], sig.args[11]

        def block(b, a, j, w, is_sym, kd, ng):
            buf, offs, x0s, lst, base = a[:5]
            xf, tout = a[10:12]
            # n_out from the header byte even where the class fixes it: measured, the float
            # loops run faster with that load (0.19 against 0.22 ns/w; int8 the other way)
            kb, o, x0, n_out, d, m, qo = _run_header(context, b, sig, buf, offs, x0s, lst,
                                                     base, j, w, is_sym, 3)
            zq = ir.Constant(_I64, (1 << (w - 1)) if is_sym else 0)
            t = ir.Constant(_F32, 0.0)
            for g in range(ng):
                ptr = _data_ptr(context, b, bt, buf, b.add(qo, ir.Constant(_I64, 4 * w * g)))
                x = _load(b, _data_ptr(context, b, xft, xf,
                                       b.add(x0, ir.Constant(_I64, G * g))), _vt(_F32, 32))
                # S = 1: the add of m = -0.0 changes no bits, so it is left out
                wv = _emit_wq(b, _emit_q32(b, ptr, w), d, None if is_sym else m, zq)
                t = b.fadd(t, _tree_sum(b, b.fmul(wv, x), 32))
            if kd:
                for live, p, val, xo in _outlier_slots(context, b, bt, buf, o, n_out, kd,
                                                       is_sym, G * ng, x0, xft, xf):
                    qp = b.sub(_q_at(context, b, bt, buf, qo, w, p), b.trunc(zq, _I32))
                    wp = b.fmul(b.sitofp(qp, _F32), d)
                    wp = wp if is_sym else b.fadd(wp, m)
                    t = _add_term(b, t, live, b.fmul(b.fsub(val, wp), xo))
            b.store(t, _data_ptr(context, b, tt, tout, kb))

        _width_runs(builder, c, sym, kind, B, _dense_loops(context, sig, args, "qx_fdense", 12,
                                                           block))
        return context.get_dummy_value()

    return sig, codegen


def _emit_wq(builder, q, d, m, zq):
    """float(q - zq)*d + m for <32 x i8> quants q, as <32 x float> (as _emit_w32); m None:
    no add, zq the constant 0: no subtract."""
    q = builder.zext(q, _vt(_I32, 32))
    if not (isinstance(zq, ir.Constant) and zq.constant == 0):
        q = builder.sub(q, _splat(builder, builder.trunc(zq, _I32), 32))
    w = builder.fmul(builder.sitofp(q, _vt(_F32, 32)), _splat(builder, d, 32))
    return w if m is None else builder.fadd(w, _splat(builder, m, 32))


def _reduce_add(builder, v):
    """Exact integer sum of an <n x i32> (the order is free: LLVM may use a dot-product
    instruction for a sum of products)."""
    return _intrinsic_call(builder, f"llvm.vector.reduce.add.v{v.type.count}i32", _I32, [v])


def _emit_isum(builder, q, x):
    """Exact sum of q_e*x_e for <n x i8> q (unsigned) and x (signed), as i32."""
    vn = _vt(_I32, q.type.count)
    return _reduce_add(builder, builder.mul(builder.zext(q, vn), builder.sext(x, vn)))


@intrinsic
def _idense_run(typingctx, buf, offs, x0s, lst, base, n, B, c, sym, kind, xq, xd, xs, xf,
                tout, size_t, cls_t, offs2, lst2, ws, wcnt, ch):
    """int8 mode, blocks lst[base:base+n] as _fdense_run: tout[kb] = the block's dot, group
    by group xd*(d*I + m*X) or xd*(d*(I - z*X)) over the non-outliers (I and X exact: those
    over the whole group less each outlier's terms), then each outlier's val*xf. Walks as
    _fdense_run."""
    sig = types.void(buf, offs, x0s, lst, types.int64, types.int64, types.int64, types.int64,
                     types.int64, types.int64, xq, xd, xs, xf, tout, size_t, cls_t, offs2, lst2,
                     ws, wcnt, types.int64)

    def codegen(context, builder, sig, args):
        B, c, sym, kind = args[6:10]
        bt = sig.args[0]
        xqt, xdt, xst, xft, tt = sig.args[10:15]

        def block(b, a, j, w, is_sym, kd, ng):
            buf, offs, x0s, lst, base = a[:5]
            xq, xd, xs, xf, tout = a[10:15]
            kb, o, x0, n_out, d, m, qo = _run_header(context, b, sig, buf, offs, x0s, lst,
                                                     base, j, w, is_sym, kd)
            slots = terms = ()
            if kd:
                slots = _outlier_slots(context, b, bt, buf, o, n_out, kd, is_sym, G * ng,
                                       x0, xft, xf)
                terms = []
                for live, p, _, _ in slots:
                    xp = b.sext(b.load(_data_ptr(context, b, xqt, xq, b.add(x0, p))), _I32)
                    gp = b.lshr(p, ir.Constant(_I64, 5))
                    terms.append((live, gp, xp,
                                  b.mul(_q_at(context, b, bt, buf, qo, w, p), xp)))
            # the activation is quantized per block (B values): one I and X per block
            q = _emit_q32(b, _data_ptr(context, b, bt, buf, qo), w)
            for g in range(1, ng):
                q2 = _emit_q32(b, _data_ptr(context, b, bt, buf,
                                            b.add(qo, ir.Constant(_I64, 4 * w * g))), w)
                q = b.shuffle_vector(q, q2, _const_vec(_I32, range(64)))
            x = _load(b, _data_ptr(context, b, xqt, xq, x0), _vt(_I8, G * ng))
            xi = b.lshr(x0, ir.Constant(_I64, 5 + ng - 1))
            xsum = b.fptosi(b.load(_data_ptr(context, b, xst, xs, xi)), _I32)
            isum = _emit_isum(b, q, x)              # |I| < 2^22, |z*X| < 2^21: exact
            for live, _, xp, qxp in terms:          # each outlier (a repeat too) leaves
                if live is not None:
                    xp = b.select(live, xp, ir.Constant(_I32, 0))
                    qxp = b.select(live, qxp, ir.Constant(_I32, 0))
                xsum = b.sub(xsum, xp)
                isum = b.sub(isum, qxp)
            dx = b.load(_data_ptr(context, b, xdt, xd, xi))
            if is_sym:
                zx = b.mul(ir.Constant(_I32, 1 << (w - 1)), xsum)
                v = b.fmul(dx, b.fmul(d, b.sitofp(b.sub(isum, zx), _F32)))
            else:
                v = b.fmul(dx, b.fadd(b.fmul(d, b.sitofp(isum, _F32)),
                                      b.fmul(m, b.sitofp(xsum, _F32))))
            t = b.fadd(ir.Constant(_F32, 0.0), v)
            for live, _, val, xo in slots:
                t = _add_term(b, t, live, b.fmul(val, xo))
            b.store(t, _data_ptr(context, b, tt, tout, kb))

        _width_runs(builder, c, sym, kind, B, _dense_loops(context, sig, args, "qx_idense", 15,
                                                           block))
        return context.get_dummy_value()

    return sig, codegen


class _Walker:
    """Stage (1) of _matvec_kernel, the header walk, one header at a time: block i of the
    next chunk (at o) gets offs[i] = o and is appended to its class list lst[cls*ch:]
    (wcnt[cls] its length). The walk from header to header is a chain of dependent loads
    (byte, size table), and the list lengths another (through memory), so it is done a step
    per block of the dense loops of the chunk before (_fdense_run, _idense_run), where both
    chains run next to their work, and the rest by _walk.

    State: ws = [blocks walked i, o, blocks wanted n, status] (status 1: a bad header or a
    block past the end of buf, 2: a header at or past the end; stored where it is met)."""

    def __init__(self, builder, bufp, size_buf, sizep, clsp, offsp, lstp, ch, wsp, cntp):
        self.b = builder
        self.buf, self.size_buf, self.sizes, self.classes = bufp, size_buf, sizep, clsp
        self.offs, self.lst, self.ch, self.ws, self.cnt = offsp, lstp, ch, wsp, cntp

    def load(self):
        """(i, o, headers left to walk: 0 once a status is set)."""
        b = self.b
        i, o, n, st = [b.load(b.gep(self.ws, [ir.Constant(_I64, j)])) for j in range(4)]
        return i, o, b.select(b.icmp_signed("==", st, ir.Constant(_I64, 0)), n, i)

    def save(self, i, o):
        b = self.b
        for j, v in ((0, i), (1, o)):
            b.store(v, b.gep(self.ws, [ir.Constant(_I64, j)]))

    def step(self, i, o):
        """One header: (i, o, whether it was a block), from a join block (left current)."""
        b = self.b
        fn = b.function
        i64 = lambda v: ir.Constant(_I64, v)
        hdr = fn.append_basic_block("walk_hdr")
        blk = fn.append_basic_block("walk_block")
        bad = fn.append_basic_block("walk_bad")
        join = fn.append_basic_block("walk_join")
        start = b.block
        b.cbranch(b.icmp_signed(">=", o, self.size_buf), bad, hdr)
        b.position_at_end(hdr)
        h = b.zext(b.load(b.gep(self.buf, [o])), _I64)
        size = b.load(b.gep(self.sizes, [h]))
        b.cbranch(b.or_(b.icmp_signed("==", size, i64(0)),
                        b.icmp_signed(">", b.add(o, size), self.size_buf)), bad, blk)
        b.position_at_end(bad)
        st = b.phi(_I64)
        st.add_incoming(i64(2), start)
        st.add_incoming(i64(1), hdr)
        b.store(st, b.gep(self.ws, [i64(3)]))
        b.branch(join)
        b.position_at_end(blk)
        cls = b.load(b.gep(self.classes, [h]))
        cp = b.gep(self.cnt, [cls])
        n_c = b.load(cp)
        b.store(b.add(n_c, i64(1)), cp)
        b.store(b.trunc(i, _I32), b.gep(self.lst, [b.add(b.mul(cls, self.ch), n_c)]))
        b.store(o, b.gep(self.offs, [i]))
        nxt = (b.add(i, i64(1)), b.add(o, size))
        b.branch(join)
        b.position_at_end(join)
        out = []
        for v, v2 in zip((i, o), nxt):
            phi = b.phi(v.type)
            phi.add_incoming(v, bad)
            phi.add_incoming(v2, blk)
            out.append(phi)
        ok = b.phi(ir.IntType(1))
        ok.add_incoming(ir.Constant(ir.IntType(1), 0), bad)
        ok.add_incoming(ir.Constant(ir.IntType(1), 1), blk)
        return out + [ok]

    @staticmethod
    def from_args(context, builder, sig, args, k_buf, k_tables, B64, ch):
        """A walker on the intrinsic arguments buf (index k_buf) and size table, class table,
        offs, lst, ws, wcnt (k_tables .. k_tables + 5)."""
        ptr = lambda k, off=0: _data_ptr(context, builder, sig.args[k], args[k], off)
        size_buf = context.make_array(sig.args[k_buf])(context, builder, args[k_buf]).nitems
        return _Walker(builder, ptr(k_buf), size_buf, ptr(k_tables, 256 if B64 else 0),
                       ptr(k_tables + 1), ptr(k_tables + 2), ptr(k_tables + 3), ch,
                       ptr(k_tables + 4), ptr(k_tables + 5))


@intrinsic
def _walk(typingctx, buf, B, size_t, cls_t, offs, lst, ws, wcnt, ch):
    """The walk (_Walker) to its end: ws[0] blocks walked of the ws[2] wanted, ws[1] the next
    header's offset, ws[3] the status; wcnt[cls] = the class list lengths."""
    sig = types.void(buf, types.int64, size_t, cls_t, offs, lst, ws, wcnt, ch)

    def codegen(context, builder, sig, args):
        B, ch = args[1], args[8]
        ptr = lambda k, off=0: _data_ptr(context, builder, sig.args[k], args[k], off)
        tb = builder.select(builder.icmp_signed("==", B, ir.Constant(_I64, 64)),
                            ir.Constant(_I64, 256), ir.Constant(_I64, 0))
        size_buf = context.make_array(sig.args[0])(context, builder, args[0]).nitems

        def rest(b, params):        # a step per header still wanted (idle after a bad one)
            walker = _Walker(b, *params)
            i0, _, n = walker.load()
            _run_loop(b, b.sub(n, i0), walker, lambda b, j: None)

        # in a function of its own, so that the big caller's register allocation cannot
        # spill the walk's state
        _outlined(builder, "qx_walk_headers", [ptr(0), size_buf, ptr(2, tb), ptr(3), ptr(4),
                                               ptr(5), ch, ptr(6), ptr(7)], rest)
        return context.get_dummy_value()

    return sig, codegen


def _run_loop(builder, n, walker, body):
    """for j in range(n): body(builder, j), each iteration also one step of the walker (while
    it has headers left): the walk's chains of loads run next to the body's work."""
    fn = builder.function
    wi0, wo0, wn0 = walker.load()
    pre = builder.block
    head = fn.append_basic_block("run_head")
    blk = fn.append_basic_block("run_body")
    exit_ = fn.append_basic_block("run_exit")
    builder.branch(head)
    builder.position_at_end(head)
    j = builder.phi(_I64)
    wi = builder.phi(_I64)
    wo = builder.phi(_I64)
    wn = builder.phi(_I64)
    builder.cbranch(builder.icmp_signed("<", j, n), blk, exit_)
    builder.position_at_end(blk)
    body(builder, j)
    step = fn.append_basic_block("run_walk")
    latch = fn.append_basic_block("run_latch")
    idle = builder.block
    builder.cbranch(builder.icmp_signed("<", wi, wn), step, latch)
    builder.position_at_end(step)
    wi2, wo2, ok = walker.step(wi, wo)
    wn2 = builder.select(ok, wn, wi2)              # a bad header ends the walk
    walked = builder.block
    builder.branch(latch)
    builder.position_at_end(latch)
    nxt = []
    for v, v2 in ((wi, wi2), (wo, wo2), (wn, wn2)):
        phi = builder.phi(_I64)
        phi.add_incoming(v, idle)
        phi.add_incoming(v2, walked)
        nxt.append(phi)
    j2 = builder.add(j, ir.Constant(_I64, 1))
    builder.branch(head)
    for phi, v0, v2 in zip((j, wi, wo, wn), (ir.Constant(_I64, 0), wi0, wo0, wn0),
                           (j2,) + tuple(nxt)):
        phi.add_incoming(v0, pre)
        phi.add_incoming(v2, latch)
    builder.position_at_end(exit_)
    walker.save(wi, wo)


# ---------------------------------------------------------------------------------------------
# Board kernels (numba)

@kernel
def _count_kernel(buf, max_blocks, B):
    """(whole blocks at the start of buf, their bytes); blocks = -1 - index of a bad header.
    A board runs this on every chunk, so the walk is the size table's (_SIZE) short chain."""
    tb = 256 if B == 64 else 0
    o = 0
    n = 0
    size = buf.size
    while n < max_blocks and o < size:
        s = _SIZE[tb + np.int64(_at(buf, o))]
        if s == 0:
            return -1 - n, o
        if o + s > size:
            break
        o += s
        n += 1
    return n, o


@kernel(inline="always")
def _block_params(buf, o, B):
    """(code, S, n_out, d, m, zq, offset of positions, offset of quants, size)."""
    h = np.int64(buf[o])
    c = h & 15
    sym = (h >> 4) & 1
    k = h >> 5
    p = o + 1
    d = np.float32(0.0)
    m = np.float32(0.0)
    if c == RAW:
        return c, sym, np.int64(0), d, m, np.int64(0), p, p, 1 + 2 * B
    if c > 0:
        d = _h(buf, p)
        p += 2
    if sym == 0:
        m = _h(buf, p)
        p += 2
    zq = np.int64(1) << (c - 1) if (sym == 1 and c > 0) else np.int64(0)
    if sym == 1 and c > 0:
        m = np.float32(-0.0)        # x + -0.0 == x bit for bit: the value is (q - z)*d
    po = p
    qo = p + 3 * k
    return c, sym, k, d, m, zq, po, qo, qo + B * c // 8 - o


@kernel
def _dequantize_kernel(buf, n_blocks, B, out, i0):
    """n_blocks blocks (headers already checked) from buf[0:] into out[i0:]; returns the
    bytes read."""
    o = 0
    for b in range(n_blocks):
        c, sym, k, d, m, zq, po, qo, size = _block_params(buf, o, B)
        i = i0 + b * B
        if c == RAW:
            for g in range(B // G):
                _f16x32(buf, qo + 2 * G * g, out, i + G * g)
        else:
            for g in range(B // G):
                if c == 0:
                    _fill32(out, i + G * g, m)
                else:
                    _deq_any(buf, qo + 4 * c * g, c, d, m, zq, out, i + G * g)
            for j in range(k):
                out[i + (np.int64(buf[po + j]) & (B - 1))] = _h(buf, po + k + 2 * j)
        o += size
    return o


_CHUNK = 1024             # blocks per chunk of the matvec kernel: longer class runs (each run
                          # costs a dispatch)
_N_CLASS = 66             # block classes: width 0; widths 1..8 with S = 0, with S = 1, those
                          # without outliers, with one, with two, with more; raw fp16


def _header_tables():
    """Per header byte: its block's size for B = 32 (entries 0..255) and B = 64 (256..511),
    0 for a header no block has; and its class."""
    size = np.zeros(512, np.int64)
    cls = np.zeros(256, np.int64)
    for h in range(256):
        c, sym, k = h & 15, (h >> 4) & 1, h >> 5
        if c == RAW:
            cls[h] = _N_CLASS - 1
            if h >> 4 == 0:
                size[h], size[256 + h] = block_bytes(c, 0, 0, 32), block_bytes(c, 0, 0, 64)
        elif c <= 8:
            cls[h] = 0 if c == 0 else c + 8 * sym + 16 * min(k, 3)
            size[h], size[256 + h] = block_bytes(c, sym, k, 32), block_bytes(c, sym, k, 64)
    return size, cls


# the walk from header to header is a chain of dependent loads: a table lookup is its
# shortest link (and takes the validity checks off it)
_SIZE, _CLASS = _header_tables()


@kernel
def _matvec_kernel(int8_mode, buf, n_blocks, first_block, bpr, B, xf, xq, xd, xs, out):
    """Returns 0, or -1 - k if block k's header is bad or it overruns buf.

    Works in chunks of blocks: (1) the headers alone (each block's offset and class: width,
    S, no, one, two or more outliers, or raw; a chain of dependent loads, walked during (2)
    of the chunk before: _Walker); (2) per class, a loop with all that fixed (straight-line
    unpack and dot, no branch on the width or the outliers per block) computing each block's
    dot; (3) the dots added to the rows in block order. The arithmetic of every block is the
    one in the matvec_blocks docstring, bit for bit."""
    ng = B // G
    row = first_block // bpr
    col = first_block - row * bpr
    acc = out[row] if n_blocks > 0 else np.float32(0.0)   # out[row], kept in a register
    ch = min(_CHUNK, n_blocks)
    offs2 = np.empty((2, ch), np.int64)                    # this chunk's and the next one's
    lst2 = np.empty((2, _N_CLASS * ch), np.int32)
    wcnt2 = np.zeros((2, _N_CLASS), np.int64)
    ws = np.zeros(4, np.int64)                             # the walk (_Walker)
    x0s2 = np.empty((2, ch), np.int64)
    tout = np.empty(ch, np.float32)
    cur = 0
    ws[2] = ch
    _walk(buf, B, _SIZE, _CLASS, offs2[0], lst2[0], ws, wcnt2[0], ch)
    k0 = 0
    xc = col
    for i in range(ws[0]):
        x0s2[0, i] = xc * B
        xc += 1
        if xc == bpr:
            xc = 0
    while k0 < n_blocks:
        offs = offs2[cur]
        lst = lst2[cur]
        cnt = wcnt2[cur]
        x0s = x0s2[cur]
        nch = ws[0]
        status = 0
        flush = False
        if ws[3]:
            status = -1 - (k0 + nch)
            flush = ws[3] == 2
        nxt = 1 - cur                  # (1) of the next chunk starts
        ws[0] = 0
        ws[2] = 0 if status else min(ch, n_blocks - k0 - nch)
        wcnt2[nxt, :] = 0
        offs_n = offs2[nxt]
        lst_n = lst2[nxt]
        wcnt_n = wcnt2[nxt]
        # (2) each class with its width, S and outlier kind fixed
        for cls in range(_N_CLASS):
            n = np.int64(cnt[cls])
            if n == 0:
                continue
            base = cls * ch
            if cls == _N_CLASS - 1:                     # raw fp16
                for j in range(n):
                    i = np.int64(lst[base + j])
                    ob = offs[i] + 1
                    x0 = x0s[i]
                    t = np.float32(0.0)
                    for g in range(ng):
                        t += _fdot_f16(buf, ob + 2 * G * g, xf, x0 + G * g)
                    tout[i] = t
            elif cls == 0:                              # constant blocks (rare): scalar
                for j in range(n):
                    i = np.int64(lst[base + j])
                    ob = offs[i]
                    x0 = x0s[i]
                    h = np.int64(buf[ob])
                    sym = (h >> 4) & 1
                    k = h >> 5
                    po = ob + (1 if sym else 3)
                    m = _h(buf, ob + 1) if sym == 0 else np.float32(0.0)
                    d = np.float32(0.0)
                    t = np.float32(0.0)
                    if not int8_mode:
                        for g in range(ng):
                            t += _fdot_const(m, xf, x0 + G * g)
                    else:               # the activation is quantized per block: one X
                        xsum = np.int64(_at(xs, x0 // B))
                        for jo in range(k):
                            xsum -= np.int64(_at(xq, x0 + (np.int64(buf[po + jo]) & (B - 1))))
                        if not sym:
                            t += _at(xd, x0 // B) * (d * np.float32(0) + m * np.float32(xsum))
                        else:
                            t += _at(xd, x0 // B) * (d * np.float32(0))
                    for jo in range(k):
                        p = np.int64(buf[po + jo]) & (B - 1)
                        v = _h(buf, po + k + 2 * jo)
                        if not int8_mode:
                            t += (v - m) * _at(xf, x0 + p)
                        else:
                            t += v * _at(xf, x0 + p)
                    tout[i] = t
            else:
                c = (cls - 1) % 8 + 1
                sym = ((cls - 1) >> 3) & 1
                kind = (cls - 1) >> 4
                if int8_mode:
                    _idense_run(buf, offs, x0s, lst, base, n, B, c, sym, kind, xq, xd, xs, xf,
                                tout, _SIZE, _CLASS, offs_n, lst_n, ws, wcnt_n, ch)
                else:
                    _fdense_run(buf, offs, x0s, lst, base, n, B, c, sym, kind, xf, tout, _SIZE,
                                _CLASS, offs_n, lst_n, ws, wcnt_n, ch)
        _walk(buf, B, _SIZE, _CLASS, offs_n, lst_n, ws, wcnt_n, ch)
        # (3) the dots into the rows, in block order (a chain of adds), next to the next
        # chunk's activation offsets (another chain)
        nn = ws[0]
        x0n = x0s2[nxt]
        for i in range(max(nch, nn)):
            if i < nch:
                acc += tout[i]
                col += 1
                if col == bpr:
                    out[row] = acc
                    col = 0
                    row += 1
                    if k0 + i + 1 < n_blocks:
                        acc = out[row]
            if i < nn:
                x0n[i] = xc * B
                xc += 1
                if xc == bpr:
                    xc = 0
        if status:
            if flush:
                out[row] = acc
            return status
        k0 += nch
        cur = nxt
    if n_blocks > 0 and col != 0:
        out[row] = acc
    return 0


@kernel
def _prepare_kernel(x, xf, xq, xd, xs, int8_mode, B):
    """xf = x; int8 mode: per B values (the block size), ggml's AVX2 quantize_row_q8_0
    arithmetic (kernels._q8_block) into xq and xd[b], and xs[b] = float32(the exact sum of
    the block's q). B = 32 is Q8_0 itself."""
    n = x.size
    for i in range(n):
        xf[i] = x[i]
    if not int8_mode:
        return
    for b in range(n // B):
        K._q8_block(x, b * B, B, xq, xd, b)
        s = np.int64(0)
        for j in range(b * B, b * B + B):
            s += np.int64(xq[j])
        xs[b] = np.float32(s)


# ---------------------------------------------------------------------------------------------
# Quantizer (numba)

@kernel(inline="always")
def _params(c, sym, lo, hi, cover):
    """The grid of width c (1..8 or 0) for non-outlier values in [lo, hi]: (d16 bits, m16 bits,
    finite). Asymmetric: m = fp16(lo), d = (hi - m)/(2^c - 1) rounded up to fp16; symmetric
    with `cover` (error bounds): the smaller |d| of the two orientations that cover [lo, hi],
    rounded up; symmetric otherwise: d = fp16(vmax / -2^(c-1)) as ggml's Q4_0 (the value of
    largest magnitude exact, the other end may clamp); c = 0: m = fp16 of the midrange
    (asymmetric) or 0."""
    zero = np.float32(0.0)
    if c == 0:
        if sym:
            return np.int64(0), np.int64(0), True
        hm0 = _f32_to_f16_bits((lo + hi) * np.float32(0.5))
        return np.int64(0), hm0, bool(np.isfinite(_f16(hm0)))
    qmax = (1 << c) - 1
    if sym and not cover:
        # least squares (target mode): ggml's Q4_0 grid, the largest |x| exactly on level 0
        vmax = hi if hi >= -lo else lo
        hd = _f32_to_f16_bits(vmax / np.float32(-(1 << (c - 1))))
        return hd, np.int64(0), bool(np.isfinite(_f16(hd)))
    if sym:
        z = 1 << (c - 1)
        pmax = max(hi, zero)
        nmax = max(-lo, zero)
        # d > 0: values (q - z)*d in [-z d, (z-1) d]; d < 0: in [-(z-1)|d|, z|d|]
        inf = np.float32(np.inf)
        da = max(nmax / np.float32(z), pmax / np.float32(z - 1) if z > 1 else
                 (inf if pmax > zero else zero))
        db = max(pmax / np.float32(z), nmax / np.float32(z - 1) if z > 1 else
                 (inf if nmax > zero else zero))
        dd = da if da <= db else -db
        hd = _f16_up(dd)
        return hd, np.int64(0), bool(np.isfinite(_f16(hd)))
    hm = _f32_to_f16_bits(lo)
    m = _f16(hm)
    hd = _f16_up((hi - m) / np.float32(qmax))
    return hd, hm, bool(np.isfinite(_f16(hd)) and np.isfinite(m))


@kernel(inline="always")
def _quant(v, c, sym, d, m, inv):
    """(q, value) of v on the grid (c >= 1): nearest level, clamped."""
    qmax = np.float32((1 << c) - 1)
    if sym:
        zf = np.float32(1 << (c - 1))
        r = np.floor(v * inv + np.float32(0.5)) + zf
        r = min(max(r, np.float32(0.0)), qmax)
        return r, (r - zf) * d
    r = np.floor((v - m) * inv + np.float32(0.5))
    r = min(max(r, np.float32(0.0)), qmax)
    return r, r * d + m


@kernel(inline="always")
def _errors(xv, v64, B, c, sym, d, m, inv, er, qq):
    """er[e] = (the grid value of xv[e]) - xv[e] in float64 and qq[e] = its quant (less z for
    S = 1) for the B elements, width c >= 1: no sums, so the loop vectorizes."""
    if sym:
        zf = np.float32(1 << (c - 1))
        for e in range(B):
            r, w = _quant(xv[e], c, 1, d, m, inv)
            er[e] = np.float64(w) - v64[e]
            qq[e] = np.float64(r - zf)
    else:
        for e in range(B):
            r, w = _quant(xv[e], c, 0, d, m, inv)
            er[e] = np.float64(w) - v64[e]
            qq[e] = np.float64(r)


@kernel(inline="always")
def _err1(v, out_e, fe, c, sym, d, m, inv):
    """Error (float64) of value v under a candidate: fe if it is an outlier."""
    if out_e:
        return fe
    if c == 0:
        return np.float64(m) - np.float64(v)
    _, w = _quant(v, c, sym, d, m, inv)
    return np.float64(w) - np.float64(v)


@kernel(inline="always")
def _ls_params(c, sym, s_w, s_q, s_qq, s_x, s_qx):
    """Least-squares grid for fixed quants (target mode's refinement): minimise
    sum w*(qq*d + m - x)^2 over the non-outliers (qq = q, or q - z with m = 0 for S = 1);
    (d16, m16 bits, usable), fp16 rounded to nearest."""
    if c == 0:
        return np.int64(0), np.int64(0), False
    if sym:
        if not s_qq > 0.0:
            return np.int64(0), np.int64(0), False
        hd = _f32_to_f16_bits(np.float32(s_qx / s_qq))
        return hd, np.int64(0), bool(np.isfinite(_f16(hd)))
    det = s_w * s_qq - s_q * s_q
    if not det > 0.0:
        return np.int64(0), np.int64(0), False
    hd = _f32_to_f16_bits(np.float32((s_w * s_qx - s_q * s_x) / det))
    hm = _f32_to_f16_bits(np.float32((s_qq * s_x - s_q * s_qx) / det))
    return hd, hm, bool(np.isfinite(_f16(hd)) and np.isfinite(_f16(hm)))


@kernel
def _solve(x, i0, B, c, sym, k, split, order_v, order_a, isout, q, cover):
    """Choose the outliers and grid of one candidate encoding of block x[i0:i0+B]; fills
    isout[:B] and q[:B]; returns (d16 bits, m16 bits, ok)."""
    for e in range(B):
        isout[e] = False
        q[e] = 0
    if c == RAW:
        return np.int64(0), np.int64(0), True
    if k > 0:
        if sym:
            for j in range(k):
                isout[order_a[j]] = True
        else:
            for j in range(split):
                isout[order_v[j]] = True
            for j in range(k - split):
                isout[order_v[B - 1 - j]] = True
    lo = np.float32(np.inf)
    hi = np.float32(-np.inf)
    for e in range(B):
        if not isout[e]:
            v = x[i0 + e]
            lo = min(lo, v)
            hi = max(hi, v)
    hd, hm, ok = _params(c, sym, lo, hi, cover)
    if c == 0 or not ok:
        return hd, hm, ok
    d = _f16(hd)
    m = _f16(hm)
    inv = np.float32(1.0) / d if d != np.float32(0.0) else np.float32(0.0)
    for e in range(B):
        r, _ = _quant(x[i0 + e], c, sym, d, m, inv)
        q[e] = np.int64(r)
    return hd, hm, ok


@kernel(inline="always")
def _cand_size(c, sym, k, B):
    if c == RAW:
        return 1 + 2 * B
    return 1 + (2 if c > 0 else 0) + (2 if sym == 0 else 0) + 3 * k + B * c // 8


@kernel(inline="always")
def _sort_idx(v, idx, n):
    """idx[:n] = argsort(v[:n]), stable (insertion sort: n <= 64, no allocation)."""
    for i in range(n):
        j = i
        t = v[i]
        while j > 0 and v[idx[j - 1]] > t:
            idx[j] = idx[j - 1]
            j -= 1
        idx[j] = i


@kernel(inline="always")
def _splits(x, i0, B, order_v, kmax, split):
    """For k = 0..kmax outliers of an asymmetric grid: how many come from the bottom (the
    split that leaves the smallest range)."""
    for k in range(kmax + 1):
        best = np.inf
        bi = 0
        for i in range(k + 1):
            r = np.float64(x[i0 + order_v[B - 1 - (k - i)]]) - np.float64(x[i0 + order_v[i]])
            if r < best:
                best = r
                bi = i
        split[k] = bi


@kernel
def _analyze(x, B, imp, cw, cs, ck, cidx, wlist, kmax, tol_abs, tol_rel, floor, bound_mode,
             choice, hull_c, hull_b, hull_e, hull_n):
    """Per block: bound mode -> choice[blk] = the chosen candidate; target mode -> the block's
    lower convex hull of (bytes, sse) in hull_* (hull_n points). One loop body with scalar
    helpers only (an array passed to a helper costs reference counting in the hot loop)."""
    rows, cols = x.shape
    bpr = cols // B
    nc = cw.size
    H = hull_c.shape[1]
    xv = np.empty(B, np.float32)
    av = np.empty(B, np.float32)
    fe = np.empty(B, np.float64)
    tol = np.empty(B, np.float64)
    isout = np.zeros(B, np.bool_)
    order_v = np.zeros(B, np.int64)
    order_a = np.zeros(B, np.int64)
    split = np.zeros(MAX_OUT + 1, np.int64)
    sizes = np.empty(nc, np.int64)
    sses = np.empty(nc, np.float64)
    fits = np.zeros(nc, np.bool_)
    nw = wlist.size
    wd = np.zeros(nw, np.float32)
    wm = np.zeros(nw, np.float32)
    winv = np.zeros(nw, np.float32)
    wok = np.zeros(nw, np.bool_)
    wacc = np.zeros(nw, np.float64)
    wacc2 = np.zeros(nw, np.float64)
    wd2 = np.zeros(nw, np.float32)
    wm2 = np.zeros(nw, np.float32)
    winv2 = np.zeros(nw, np.float32)
    wok2 = np.zeros(nw, np.bool_)
    ls = np.zeros((nw, 5), np.float64)
    we = np.zeros(B, np.float64)        # target mode: the weight of each element, 0 for an
    v64 = np.zeros(B, np.float64)       # outlier (adding its 0 term is exact, so the sums
    er = np.zeros(B, np.float64)        # need no branch); its value; its error and quant on
    qq = np.zeros(B, np.float64)        # the width at hand (a loop LLVM vectorizes)
    refit = np.zeros(nc, np.bool_)
    for ci in range(nc):
        sizes[ci] = _cand_size(cw[ci], cs[ci], ck[ci], B)
    by_size = np.argsort(sizes, kind="mergesort")
    xf = x.reshape(-1)
    for r in range(rows):
        for cb in range(bpr):
            blk = r * bpr + cb
            i0 = r * cols + cb * B
            io = cb * B
            raw_sse = 0.0
            raw_fit = True
            for e in range(B):
                v = xf[i0 + e]
                xv[e] = v
                av[e] = -np.abs(v)
                fe[e] = np.float64(_f16(_f32_to_f16_bits(v))) - np.float64(v)
                raw_sse += np.float64(imp[io + e]) * fe[e] * fe[e]
                if bound_mode:
                    tol[e] = max(tol_abs, tol_rel * max(np.abs(np.float64(v)), floor))
                    if np.abs(fe[e]) > tol[e]:
                        raw_fit = False
            for (vals, idx) in ((xv, order_v), (av, order_a)):   # stable insertion sorts
                for i in range(B):
                    j = i
                    t = vals[i]
                    while j > 0 and vals[idx[j - 1]] > t:
                        idx[j] = idx[j - 1]
                        j -= 1
                    idx[j] = i
            for k in range(kmax + 1):     # asymmetric: outliers from the bottom / the top
                best_r = np.inf
                for i in range(k + 1):
                    rr = (np.float64(xv[order_v[B - 1 - (k - i)]])
                          - np.float64(xv[order_v[i]]))
                    if rr < best_r:
                        best_r = rr
                        split[k] = i
            sses[nc - 1] = raw_sse
            fits[nc - 1] = raw_fit
            best_size = sizes[nc - 1] if raw_fit else 1 << 30
            for sym in (1, 0):
                for k in range(kmax + 1):
                    for e in range(B):
                        isout[e] = False
                    if sym:
                        for j in range(k):
                            isout[order_a[j]] = True
                    else:
                        for j in range(split[k]):
                            isout[order_v[j]] = True
                        for j in range(k - split[k]):
                            isout[order_v[B - 1 - j]] = True
                    lo = np.float32(np.inf)
                    hi = np.float32(-np.inf)
                    for e in range(B):
                        if not isout[e]:
                            lo = min(lo, xv[e])
                            hi = max(hi, xv[e])
                    if not bound_mode:
                        # every width's error and least-squares sums, then a refit of d (and
                        # m) for the quants found, kept if it lowers the error
                        for iw in range(nw):
                            hd, hm, ok = _params(wlist[iw], sym, lo, hi, False)
                            wok[iw] = ok
                            wd[iw] = _f16(hd)
                            wm[iw] = _f16(hm)
                            winv[iw] = (np.float32(1.0) / wd[iw] if wd[iw] != np.float32(0.0)
                                        else np.float32(0.0))
                            wacc[iw] = 0.0
                            wacc2[iw] = 0.0
                            ls[iw, :] = 0.0
                        o2 = 0.0
                        for e in range(B):
                            ie = np.float64(imp[io + e])
                            v64[e] = np.float64(xv[e])
                            we[e] = 0.0 if isout[e] else ie
                            if isout[e]:
                                o2 += ie * fe[e] * fe[e]
                        # width by width: the errors and quants in a loop LLVM vectorizes,
                        # then each sum over the elements in order (so the same float64 sums
                        # as element by element)
                        for iw in range(nw):
                            c = wlist[iw]
                            if c == 0:
                                acc = 0.0
                                for e in range(B):
                                    d0 = np.float64(wm[iw]) - v64[e]
                                    acc += we[e] * d0 * d0
                                wacc[iw] = acc
                                continue
                            _errors(xv, v64, B, c, sym, wd[iw], wm[iw], winv[iw], er, qq)
                            acc = s0 = s1 = s2 = s3 = s4 = 0.0
                            for e in range(B):
                                ie = we[e]
                                acc += ie * er[e] * er[e]
                                s0 += ie
                                s1 += ie * qq[e]
                                s2 += ie * qq[e] * qq[e]
                                s3 += ie * v64[e]
                                s4 += ie * qq[e] * v64[e]
                            wacc[iw] = acc
                            ls[iw, 0], ls[iw, 1], ls[iw, 2], ls[iw, 3], ls[iw, 4] = \
                                s0, s1, s2, s3, s4
                        any2 = False
                        for iw in range(nw):
                            hd2, hm2, ok2 = _ls_params(wlist[iw], sym, ls[iw, 0], ls[iw, 1],
                                                       ls[iw, 2], ls[iw, 3], ls[iw, 4])
                            wok2[iw] = ok2 and wok[iw]
                            any2 = any2 or wok2[iw]
                            wd2[iw] = _f16(hd2)
                            wm2[iw] = _f16(hm2)
                            winv2[iw] = (np.float32(1.0) / wd2[iw]
                                         if wd2[iw] != np.float32(0.0) else np.float32(0.0))
                        if any2:
                            for iw in range(nw):
                                if not wok2[iw]:
                                    continue
                                _errors(xv, v64, B, wlist[iw], sym, wd2[iw], wm2[iw],
                                        winv2[iw], er, qq)
                                acc = 0.0
                                for e in range(B):
                                    acc += we[e] * er[e] * er[e]
                                wacc2[iw] = acc
                        for iw in range(nw):
                            ci = cidx[iw, sym, k]
                            fits[ci] = False
                            refit[ci] = False
                            sses[ci] = np.inf
                            if wok[iw] and np.isfinite(wacc[iw]):
                                sses[ci] = wacc[iw] + o2
                            if wok2[iw] and np.isfinite(wacc2[iw]) and \
                                    wacc2[iw] + o2 < sses[ci]:
                                sses[ci] = wacc2[iw] + o2
                                refit[ci] = True
                        continue
                    for iw in range(nw):
                        c = wlist[iw]
                        ci = cidx[iw, sym, k]
                        sses[ci] = np.inf
                        fits[ci] = False
                        if bound_mode and sizes[ci] > best_size:
                            continue
                        hd, hm, ok = _params(c, sym, lo, hi, True)
                        if not ok:
                            continue
                        d = _f16(hd)
                        m = _f16(hm)
                        inv = np.float32(1.0) / d if d != np.float32(0.0) else np.float32(0.0)
                        s0 = 0.0
                        s1 = 0.0
                        fit = True
                        for e in range(0, B, 2):
                            e0 = _err1(xv[e], isout[e], fe[e], c, sym, d, m, inv)
                            e1 = _err1(xv[e + 1], isout[e + 1], fe[e + 1], c, sym, d, m, inv)
                            s0 += np.float64(imp[io + e]) * e0 * e0
                            s1 += np.float64(imp[io + e + 1]) * e1 * e1
                            if bound_mode:
                                if np.abs(e0) > tol[e] or np.abs(e1) > tol[e + 1]:
                                    fit = False
                                    break
                        sse = s0 + s1
                        if not np.isfinite(sse):
                            continue
                        sses[ci] = sse
                        fits[ci] = fit
                        if fit and sizes[ci] < best_size:
                            best_size = sizes[ci]
            if bound_mode:
                best = nc - 1                      # the raw fp16 candidate (last)
                best_sse = np.inf
                for ci in range(nc):
                    if fits[ci] and sizes[ci] == best_size and sses[ci] < best_sse:
                        best = ci
                        best_sse = sses[ci]
                choice[blk] = 2 * best
                continue
            # lower convex hull over (size, sse), sizes ascending, sse strictly decreasing
            n = 0
            for t in range(nc):
                ci = by_size[t]
                s = sses[ci]
                if not np.isfinite(s):
                    continue
                b = sizes[ci]
                if n > 0 and s >= hull_e[blk, n - 1]:
                    continue
                if n > 0 and b == hull_b[blk, n - 1]:
                    n -= 1                          # same size, smaller error
                while n >= 2:
                    b1, e1 = hull_b[blk, n - 1], hull_e[blk, n - 1]
                    b0, e0 = hull_b[blk, n - 2], hull_e[blk, n - 2]
                    # drop point n-1 if it lies on or above the segment (n-2) -> new point
                    if (e0 - e1) * (b - b1) <= (e1 - s) * (b1 - b0):
                        n -= 1
                    else:
                        break
                if n < H:
                    hull_c[blk, n] = 2 * ci + refit[ci]
                    hull_b[blk, n] = b
                    hull_e[blk, n] = s
                    n += 1
                else:
                    hull_c[blk, H - 1] = 2 * ci + refit[ci]
                    hull_b[blk, H - 1] = b
                    hull_e[blk, H - 1] = s
            hull_n[blk] = n


@kernel
def _fill(order, step_blk, step_j, step_bytes, level, budget):
    """Take hull steps in `order` (best error saved per byte first) while they fit the budget
    and each is the next step of its block; repeated until no step fits, so that every
    block's next step is larger than what is left. Returns the bytes left."""
    changed = True
    while changed:
        changed = False
        for t in range(order.size):
            s = order[t]
            blk = step_blk[s]
            if step_j[s] != level[blk] + 1:
                continue
            if step_bytes[s] <= budget:
                budget -= step_bytes[s]
                level[blk] += 1
                changed = True
    return budget


@kernel
def _emit(x, B, imp, choice, cw, cs, ck, kmax, out, offsets, table_bytes, cover):
    """Write the chosen encodings (choice = 2 * candidate + least-squares refit) and the row
    offsets; the same arithmetic as _analyze, so the bytes hold what was evaluated."""
    rows, cols = x.shape
    bpr = cols // B
    xf = x.reshape(-1)
    xv = np.empty(B, np.float32)
    av = np.empty(B, np.float32)
    isout = np.zeros(B, np.bool_)
    q = np.zeros(B, np.int64)
    split = np.zeros(MAX_OUT + 1, np.int64)
    order_v = np.zeros(B, np.int64)
    order_a = np.zeros(B, np.int64)
    o = table_bytes
    for r in range(rows):
        offsets[r] = o
        for cb in range(bpr):
            blk = r * bpr + cb
            i0 = r * cols + cb * B
            ci = choice[blk] >> 1
            c, sym, k = cw[ci], cs[ci], ck[ci]
            for e in range(B):
                xv[e] = xf[i0 + e]
                av[e] = -np.abs(xf[i0 + e])
            _sort_idx(xv, order_v, B)
            _sort_idx(av, order_a, B)
            _splits(xf, i0, B, order_v, kmax, split)
            hd, hm, _ = _solve(xf, i0, B, c, sym, k, split[k], order_v, order_a, isout, q,
                              cover)
            if choice[blk] & 1:              # the least-squares refit (target mode)
                io = cb * B
                s_w = s_q = s_qq = s_x = s_qx = 0.0
                for e in range(B):
                    if isout[e]:
                        continue
                    ie = np.float64(imp[io + e])
                    qq = np.float64(q[e] - (1 << (c - 1)) if sym else q[e])
                    v64 = np.float64(xf[i0 + e])
                    s_w += ie
                    s_q += ie * qq
                    s_qq += ie * qq * qq
                    s_x += ie * v64
                    s_qx += ie * qq * v64
                hd, hm, _ = _ls_params(c, sym, s_w, s_q, s_qq, s_x, s_qx)
                d2 = _f16(hd)
                m2 = _f16(hm)
                inv2 = np.float32(1.0) / d2 if d2 != np.float32(0.0) else np.float32(0.0)
                for e in range(B):
                    rq, _ = _quant(xf[i0 + e], c, sym, d2, m2, inv2)
                    q[e] = np.int64(rq)
            out[o] = c | (sym << 4) | (k << 5)
            p = o + 1
            if c == RAW:
                for e in range(B):
                    h = _f32_to_f16_bits(xf[i0 + e])
                    out[p + 2 * e] = h & 0xFF
                    out[p + 2 * e + 1] = h >> 8
                o = p + 2 * B
                continue
            if c > 0:
                out[p] = hd & 0xFF
                out[p + 1] = hd >> 8
                p += 2
            if sym == 0:
                out[p] = hm & 0xFF
                out[p + 1] = hm >> 8
                p += 2
            j = 0
            for e in range(B):
                if isout[e]:
                    h = _f32_to_f16_bits(xf[i0 + e])
                    out[p + j] = e
                    out[p + k + 2 * j] = h & 0xFF
                    out[p + k + 2 * j + 1] = h >> 8
                    j += 1
            p += 3 * k
            if c > 0:
                for g in range(B // G):
                    for e in range(G):
                        _put_q(out, p + 4 * c * g, c, e, q[G * g + e])
            o = p + B * c // 8
    offsets[rows] = o


# ---------------------------------------------------------------------------------------------
# Public API: quantize, dequantize, board ops

def _candidates(s: QXSettings):
    kmax = s.max_outliers
    cw, cs, ck = [], [], []
    for c in (0,) + tuple(s.widths):
        for sym in (1, 0):
            for k in range(kmax + 1):
                cw.append(c)
                cs.append(sym)
                ck.append(k)
    cw.append(RAW)
    cs.append(0)
    ck.append(0)
    wlist = np.array((0,) + tuple(s.widths), np.int64)
    cidx = np.zeros((wlist.size, 2, kmax + 1), np.int64)   # (width index, S, k) -> candidate
    for ci in range(len(cw) - 1):
        cidx[list(wlist).index(cw[ci]), cs[ci], ck[ci]] = ci
    return (np.array(cw, np.int64), np.array(cs, np.int64), np.array(ck, np.int64), cidx, wlist)


def _as_settings(settings) -> QXSettings:
    if settings is None:
        return QXSettings()
    if isinstance(settings, str):
        return parse_options(settings)
    return settings


def _by_rows(rows: int, cols: int, analyze) -> None:
    """analyze(r0, r1) over row ranges, on up to one thread per core: every block is
    analysed on its own and the kernel releases the GIL, so the split changes no byte of
    the result, only the time (the exhaustive search is QX quantize's cost)."""
    workers = min(os.cpu_count() or 1, _MAX_THREADS, max(1, rows * cols // _MIN_THREAD_WEIGHTS))
    if workers <= 1 or rows < 2:
        analyze(0, rows)
        return
    cuts = [rows * i // workers for i in range(workers + 1)]
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(analyze, cuts[:-1], cuts[1:]))


def quantize_rows(x, settings=None, importance=None) -> np.ndarray:
    """float32 (rows, cols) -> the QX record payload (uint8): row-offset table, then the rows.

    settings: QXSettings or an options string ("bpw=4.5", "err=0.01", "rel=0.05,bs=64", ...).
    importance: optional float32[cols] >= 0 weighting each column's squared error."""
    s = _as_settings(settings)
    B = s.block_size
    x = np.asarray(x)
    if x.ndim != 2 or x.dtype != np.float32:
        raise BadInput(f"QX quantize needs a 2-D float32 array, got {x.dtype} {x.shape}")
    rows, cols = x.shape
    if cols % B:
        raise BadInput(f"QX:bs={B} needs rows that are a multiple of {B} elements, got {cols}")
    x = np.ascontiguousarray(x)
    from .quants import NonFiniteValue, first_non_finite
    bad = first_non_finite(x)
    if bad >= 0:
        raise NonFiniteValue(bad, x.reshape(-1)[bad])
    if x.size and np.abs(x).max() > 65504.0:
        raise BadInput("QX stores fp16 scales and outliers: weights must be within +-65504")
    if importance is None:
        imp = np.ones(cols, np.float32)
    else:
        imp = np.ascontiguousarray(importance, dtype=np.float32).reshape(-1)
        if imp.size != cols or not np.all(np.isfinite(imp)) or np.any(imp < 0):
            raise BadInput(f"QX importance needs {cols} finite values >= 0")
    cw, cs, ck, cidx, wlist = _candidates(s)
    kmax = s.max_outliers
    bpr = cols // B
    n_blocks = rows * bpr
    table = 4 * (rows + 1)
    choice = np.zeros(n_blocks, np.int64)
    if s.bpw is None:
        floor = 0.0
        if s.rel is not None and x.size:
            floor = float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))
        hull = (np.zeros((1, 1), np.int16), np.zeros((1, 1), np.int16),
                np.zeros((1, 1), np.float32), np.zeros(1, np.int64))
        _by_rows(rows, cols, lambda r0, r1: _analyze(
            x[r0:r1], B, imp, cw, cs, ck, cidx, wlist, kmax, float(s.err or 0.0),
            float(s.rel or 0.0), floor, True, choice[r0 * bpr:r1 * bpr], *hull))
    elif n_blocks:
        H = 24
        hull_c = np.zeros((n_blocks, H), np.int16)     # compact: ~6 bytes a weight at B=32
        hull_b = np.zeros((n_blocks, H), np.int16)
        hull_e = np.zeros((n_blocks, H), np.float32)
        hull_n = np.zeros(n_blocks, np.int64)
        _by_rows(rows, cols, lambda r0, r1: _analyze(
            x[r0:r1], B, imp, cw, cs, ck, cidx, wlist, kmax, 0.0, 0.0, 0.0, False,
            *(a[r0 * bpr:r1 * bpr] for a in (choice, hull_c, hull_b, hull_e, hull_n))))
        budget = int(np.floor(s.bpw * rows * cols / 8.0)) - table - int(hull_b[:, 0].sum())
        j = np.arange(1, H)
        valid = j[None, :] < hull_n[:, None]
        db = (hull_b[:, 1:] - hull_b[:, :-1])[valid].astype(np.int64)
        order = np.argsort(-((hull_e[:, :-1] - hull_e[:, 1:])[valid] / db), kind="stable")
        step_blk = np.nonzero(valid)[0]
        step_j = np.broadcast_to(j[None, :], valid.shape)[valid]
        level = np.zeros(n_blocks, np.int64)
        if budget > 0:
            _fill(order, np.ascontiguousarray(step_blk), np.ascontiguousarray(step_j),
                  np.ascontiguousarray(db), level, budget)
        choice = hull_c[np.arange(n_blocks), level].astype(np.int64)
    sizes = np.array([block_bytes(c, sy, k, B) for c, sy, k in zip(cw, cs, ck)], np.int64)
    total = table + int(sizes[choice >> 1].sum())
    out = np.zeros(total, np.uint8)
    offsets = np.zeros(rows + 1, np.int64)
    _emit(x, B, imp, choice, cw, cs, ck, kmax, out, offsets, table, s.bpw is None)
    out[:table] = offsets.astype("<u4").view(np.uint8)
    return out


def row_offsets(payload: np.ndarray, n_rows: int) -> np.ndarray:
    """The row-offset table of a payload, checked (BadInput if inconsistent)."""
    table = 4 * (n_rows + 1)
    if payload.size < table:
        raise BadInput(f"QX payload of {payload.size} bytes is shorter than its row table "
                       f"({table})")
    off = payload[:table].view("<u4").astype(np.int64)
    if off[0] != table or off[-1] != payload.size or np.any(np.diff(off) < 0):
        raise BadInput("QX row-offset table is inconsistent "
                       f"(first {off[0]}, last {off[-1]}, payload {payload.size})")
    return off


def dequantize_payload(payload, shape, block_size: int = DEFAULT_BLOCK_SIZE) -> np.ndarray:
    """A QX record payload -> float32 of `shape` (rows = all dims but the last)."""
    B = block_size
    raw = np.ascontiguousarray(np.asarray(payload, np.uint8).reshape(-1))
    shape = tuple(int(s) for s in shape)
    cols = shape[-1] if shape else 1
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    if cols % B:
        raise BadInput(f"QX:bs={B} rows must be a multiple of {B} elements, got {cols}")
    off = row_offsets(raw, rows)
    out = np.empty(rows * cols, np.float32)
    bpr = cols // B
    ro = K._readonly(raw)
    for r in range(rows):
        row = ro[off[r]:off[r + 1]]
        n, used = _count_kernel(row, bpr, B)
        if n < 0:
            raise BadInput(f"QX row {r}: block {-1 - n} has a bad header")
        if n != bpr or used != row.size:
            raise BadInput(f"QX row {r}: {row.size} bytes hold {n} whole blocks "
                           f"({used} bytes), expected {bpr} blocks")
        _check_outliers(row, bpr, B, r)
        _dequantize_kernel(row, bpr, B, out, r * cols)
    return out.reshape(shape)


def _check_outliers(row, n_blocks, B, r):
    bad = _bad_outliers(row, n_blocks, B)
    if bad >= 0:
        raise BadInput(f"QX row {r}: block {bad} has outlier positions that are not strictly "
                       f"increasing below {B}")


@kernel
def _bad_outliers(buf, n_blocks, B):
    o = 0
    for b in range(n_blocks):
        c, sym, k, d, m, zq, po, qo, size = _block_params(buf, o, B)
        prev = -1
        for j in range(k):
            p = np.int64(buf[po + j])
            if p <= prev or p >= B:
                return b
            prev = p
        o += size
    return -1


def count_blocks(buf, max_blocks: int,
                 block_size: int = DEFAULT_BLOCK_SIZE) -> tuple[int, int]:
    """(whole blocks at the start of buf, their bytes), at most max_blocks (BadInput on a
    header no QX block has)."""
    b = K._readonly(np.ascontiguousarray(np.asarray(buf, np.uint8).reshape(-1)))
    n, used = _count_kernel(b, int(max_blocks), block_size)
    if n < 0:
        raise BadInput(f"QX block {-1 - n} (byte {used}) has a bad header 0x{int(b[used]):02x}")
    return int(n), int(used)


def prepare_activation(int8_mode, x, xf, xq, xd, xs,
                       block_size: int = DEFAULT_BLOCK_SIZE) -> None:
    """xf[:n] = x; int8 mode also, per block_size values b, xq and xd[b] quantized as ggml's
    Q8_0 is per 32 (for block_size 32 exactly kernels.prepare_activation's Q8_0) and
    xs[b] = float32(sum of the block's xq) (exact)."""
    B = block_size
    n = len(x)
    if n % B:
        raise BadInput(f"prepare_activation QX: needs a multiple of {B} values, got {n}")
    if len(xf) < n or (int8_mode and (len(xq) < n or len(xd) < n // B or len(xs) < n // B)):
        raise BadInput(f"prepare_activation QX: {n} values need xf/xq of {n} and xd/xs of "
                       f"{n // B}, got {len(xf)}, {len(xq)}, {len(xd)}, {len(xs)}")
    try:
        _prepare_kernel(K._readonly(x), xf, xq, xd, xs, bool(int8_mode), B)
    except TypeError:
        raise K._bad_arrays("prepare_activation", x=x, xf=xf, xq=xq, xd=xd, xs=xs) from None


def matvec_blocks(int8_mode, buf, n_blocks, first_block, blocks_per_row, xf, xq, xd, xs, out,
                  row_state=None, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
    """out[row] += the dot of each of the n_blocks whole QX blocks in buf (global blocks
    first_block ..., blocks_per_row a row) with the activation; row_state is not used (every
    block is added on its own, so any split of a matrix into runs gives the same bits).

    A block's dot t (float32) is: float mode, per 32-group in order, the fixed tree sum of
    grid value * xf (outliers included at their grid value); int8 mode (the activation
    quantized per block, prepare_activation), 0 + xd*(d*I + m*X) or 0 + xd*(d*(I - z*X)) with
    I, X the exact integer sums of q*xq and xq over the block's non-outliers. Then each
    outlier adds (val - grid value)*xf (float mode) or val*xf (int8 mode); out[row] += t.
    Raw fp16 blocks: tree sums of value*xf in both modes.
    """
    B = block_size
    if B not in (32, 64):
        raise BadInput(f"matvec QX: block size must be 32 or 64, got {B}")
    # block range and rows (block_bytes 0: the kernel checks each block against buf itself)
    K.check_run("QX", buf, 0, n_blocks, first_block, blocks_per_row, out)
    n_in = blocks_per_row * B
    if len(xf) < n_in or (int8_mode and (len(xq) < n_in or len(xd) < blocks_per_row
                                         or len(xs) < blocks_per_row)):
        raise BadInput(f"matvec QX: rows of {n_in} need xf/xq of {n_in} and xd/xs of "
                       f"{blocks_per_row}, got {len(xf)}, {len(xq)}, {len(xd)}, {len(xs)}")
    try:
        status = _matvec_kernel(bool(int8_mode), K._readonly(buf), n_blocks, first_block,
                                blocks_per_row, B, K._readonly(xf), K._readonly(xq),
                                K._readonly(xd), K._readonly(xs), out)
    except TypeError:
        raise K._bad_arrays("matvec", buf=buf, xf=xf, xq=xq, xd=xd, xs=xs, out=out) from None
    if status:
        raise BadInput(f"matvec QX: block {-1 - status} of the run has a bad header or does "
                       f"not fit in the {len(buf)}-byte buffer")


def dequantize_into(buf, out, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
    """Whole QX blocks in buf -> float32 out[:n_blocks * B] (BadInput if buf does not end on
    a block boundary)."""
    B = block_size
    b = K._readonly(np.ascontiguousarray(buf).reshape(-1))
    n, used = _count_kernel(b, b.size, B)
    if n < 0:
        raise BadInput(f"dequantize_into QX: block {-1 - n} has a bad header")
    if used != b.size:
        raise BadInput(f"dequantize_into QX: {b.size} bytes are not whole blocks "
                       f"({n} blocks, {used} bytes)")
    if len(out) < n * B:
        raise BadInput(f"dequantize_into QX: {n * B} values do not fit in out of {len(out)}")
    _dequantize_kernel(b, n, B, out, 0)


# ---------------------------------------------------------------------------------------------
# The type table entry

def make_type(settings: QXSettings | None = None):
    """The QX QuantType for these settings (same id and name for every variant)."""
    from .quants import BoardOps, QuantType
    s = settings or QXSettings()
    B = s.block_size
    ops = BoardOps(
        lambda i8, x, xf, xq, xd, xs: prepare_activation(i8, x, xf, xq, xd, xs, block_size=B),
        lambda i8, buf, nb, fb, bpr, xf, xq, xd, xs, out, rs=None: matvec_blocks(
            i8, buf, nb, fb, bpr, xf, xq, xd, xs, out, rs, block_size=B),
        lambda buf, out: dequantize_into(buf, out, block_size=B),
        lambda buf, mb: count_blocks(buf, mb, block_size=B))
    return QuantType(
        NAME, TYPE_ID, None, B, 0,
        lambda x2d: quantize_rows(x2d, s),
        lambda payload, shape: dequantize_payload(payload, shape, B),
        ops=ops, fallback="F16", params=(B, 0), max_block_bytes=max_block_bytes(B),
        configure=lambda options: make_type(parse_options(options, s)),
        weighted=lambda x2d, importance: quantize_rows(x2d, s, importance=importance))
