"""User-registered quant types: a Python file named with `--plugin FILE` registers new types.

The API (docs/plugins.md; a complete example: docs/examples/plugin_q3s.py):

    from formats.plugins import register_type
    register_type("Q3S", 200, block_size=32, block_bytes=14,
                  quantize=..., dequantize=..., dot=..., dot_int8=None, params=(0, 0))

  quantize(x float32[n]) -> uint8[n // block_size * block_bytes]    (n a multiple of block_size)
  dequantize(data uint8[k * block_bytes]) -> float32[k * block_size]
  dot(blocks uint8[nb, block_bytes], x float32[nb, block_size]) -> float32[nb]
      the dot product of every block with its slice of the input (dot_int8: the same, used in
      `--mode int8`; default dot)

Only `load_plugin` runs a plug-in's code, and only for a file the user named on the command
line: a stream carries a plug-in type's name, id, block geometry and params, never code, and a
reader meeting a type that is not loaded refuses it (formats/quants.py `stream_type`).
"""
from __future__ import annotations

import hashlib
import importlib.util
import re
import sys
import traceback
from pathlib import Path
from typing import Callable

import numpy as np

from . import quants
from .errors import BadInput

_NAME = re.compile(r"[A-Z][A-Z0-9_]{0,15}\Z")   # by_name upper-cases; the stream keeps 16 bytes
_loading: list[str] = []                       # the plug-in files being imported, innermost last
_loaded: dict[str, list[quants.QuantType]] = {}  # resolved path -> the types it registered


def load_plugin(path) -> list[quants.QuantType]:
    """Import the plug-in file `path` (the types it registers join the type table); returns its
    types. Loading the same file twice is loading it once. Any problem -- a missing file, a
    syntax error, an exception inside it, a type it registers that is refused -- is one BadInput
    line naming the file, and the file leaves no type behind."""
    shown = str(path)
    p = Path(path)
    if not p.exists():
        raise BadInput("no such plug-in file", path=shown)
    if not p.is_file():
        raise BadInput("the plug-in is not a file", path=shown)
    key = str(p.resolve())
    if key in _loaded:
        return _loaded[key]
    module_name = "rwkv_stream_plugin_" + hashlib.sha1(key.encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(module_name, p)
    if spec is None or spec.loader is None:
        raise BadInput("cannot be imported as a Python module", path=shown)
    module = importlib.util.module_from_spec(spec)
    before = len(quants.TYPES)
    sys.modules[module_name] = module
    _loading.append(shown)
    try:
        spec.loader.exec_module(module)
    except BaseException as e:      # noqa: BLE001 -- a plug-in may raise anything, even exit
        del quants.TYPES[before:]
        sys.modules.pop(module_name, None)
        if isinstance(e, KeyboardInterrupt):
            raise
        raise BadInput(_why(e, p), path=shown) from None
    finally:
        _loading.pop()
    types = quants.TYPES[before:]
    if not types:
        sys.modules.pop(module_name, None)
        raise BadInput("the plug-in registers no type (it must call "
                       "formats.plugins.register_type)", path=shown)
    _loaded[key] = types
    return types


def _why(e: BaseException, path: Path) -> str:
    """One line for an exception raised while importing the plug-in `path`."""
    if isinstance(e, BadInput):
        return e.message
    if isinstance(e, SyntaxError):
        return f"syntax error at line {e.lineno}: {e.msg}"
    line = None
    for frame in traceback.extract_tb(e.__traceback__):
        if Path(frame.filename) == path or frame.filename == str(path):
            line = frame.lineno             # the deepest line of the plug-in itself
    text = str(e).strip().splitlines()
    return (f"the plug-in raised {type(e).__name__}"
            + (f" at line {line}" if line else "") + (f": {text[0]}" if text else ""))


def register_type(name: str, id: int, block_size: int, block_bytes: int,
                  quantize: Callable, dequantize: Callable, dot: Callable,
                  dot_int8: Callable | None = None, params=(0, 0)) -> quants.QuantType:
    """Register a block type; call it from a plug-in file (see the module docstring).

    name: 1-16 characters, A-Z 0-9 _, starting with a letter, new; id: in quants.PLUGIN_IDS,
    new; block_size, block_bytes: 1..65535; params: two uint32 the stream's type table carries
    (type-specific, meaning nothing to the tool). Before registering, the functions are tried on
    a few random blocks (and an all-zero one): quantize must give block_bytes uint8 per block,
    dequantize block_size finite float32 per block, dot the dequantized blocks' dot products
    (to float32 rounding; dot_int8 within 1% of sum |w| * max |x|). Anything wrong: BadInput,
    one line."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise BadInput(f"plug-in type name {name!r} must be 1-16 characters A-Z, 0-9 or _, "
                       "starting with a letter")
    what = f"plug-in type {name}"
    for field, value in (("id", id), ("block_size", block_size), ("block_bytes", block_bytes)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise BadInput(f"{what}: {field} must be an integer, got {value!r}")
    id, block_size, block_bytes = int(id), int(block_size), int(block_bytes)
    if id not in quants.PLUGIN_IDS:
        raise BadInput(f"{what}: id {id} is outside the plug-in ids "
                       f"{quants.PLUGIN_IDS.start}..{quants.PLUGIN_IDS.stop - 1}")
    for field, value in (("block_size", block_size), ("block_bytes", block_bytes)):
        if not 1 <= value <= 0xFFFF:
            raise BadInput(f"{what}: {field} {value} is not in 1..65535")
    try:
        params = tuple(int(v) for v in params)
    except (TypeError, ValueError):
        raise BadInput(f"{what}: params must be two integers, got {params!r}") from None
    if len(params) != 2 or not all(0 <= v <= 0xFFFFFFFF for v in params):
        raise BadInput(f"{what}: params must be two integers in 0..2**32-1, got {params!r}")
    for field, fn in (("quantize", quantize), ("dequantize", dequantize), ("dot", dot),
                      ("dot_int8", dot_int8 if dot_int8 is not None else dot)):
        if not callable(fn):
            raise BadInput(f"{what}: {field} is not callable")
    for t in quants.TYPES:
        if t.name == name or t.id == id:
            by = f" (from {t.plugin})" if t.plugin else " (built in)"
            raise BadInput(f"{what} (id {id}) clashes with {t.name} (id {t.id}){by}")
    _self_check(what, block_size, block_bytes, quantize, dequantize, dot, dot_int8)
    plugin = _loading[-1] if _loading else sys._getframe(1).f_code.co_filename
    qtype = quants.QuantType(
        name, id, None, block_size, block_bytes,
        _checked_quantize(what, block_size, block_bytes, quantize),
        _checked_dequantize(what, block_size, block_bytes, dequantize),
        ops=_board_ops(what, block_size, block_bytes, dequantize, dot,
                       dot if dot_int8 is None else dot_int8),
        params=params, plugin=plugin)
    return quants.register(qtype)


# -- checks -----------------------------------------------------------------------------------
def _call(what, field, fn, *args):
    try:
        return fn(*args)
    except Exception as e:      # noqa: BLE001 -- the user's code: any failure is one line
        text = str(e).strip().splitlines()
        raise BadInput(f"{what}: {field} raised {type(e).__name__}"
                       + (f": {text[0]}" if text else "")) from None


def _array(what, field, value, dtype, size) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise BadInput(f"{what}: {field} returned {type(value).__name__}, not a numpy array")
    ok = value.dtype == dtype or (np.dtype(dtype).kind == "f" and value.dtype.kind == "f")
    if not ok or value.ndim != 1 or value.size != size:
        raise BadInput(f"{what}: {field} returned {value.dtype}{list(value.shape)}, expected "
                       f"{np.dtype(dtype)}[{size}]")
    return value.astype(dtype, copy=False)


def _self_check(what, bs, bb, quantize, dequantize, dot, dot_int8) -> None:
    rng = np.random.default_rng(20240607)
    x = rng.standard_normal((5, bs)).astype(np.float32)
    x[1] = 0                                  # an all-zero block (a scale of 0)
    x[2] *= 1000
    x[3] *= 1e-3
    x[4, :] = np.linspace(-1, 1, bs, dtype=np.float32)
    nb = len(x)
    q = _array(what, "quantize", _call(what, "quantize", quantize, x.reshape(-1)), np.uint8,
               nb * bb)
    w = _array(what, "dequantize", _call(what, "dequantize", dequantize, q.copy()), np.float32,
               nb * bs).reshape(nb, bs)
    if not np.all(np.isfinite(w)):
        raise BadInput(f"{what}: dequantize(quantize(x)) is not finite (an all-zero block?)")
    a = rng.standard_normal((nb, bs)).astype(np.float32)
    want = (w.astype(np.float64) * a).sum(axis=1)
    scale = (np.abs(w.astype(np.float64)) * np.abs(a)).sum(axis=1)
    amax = np.abs(w.astype(np.float64)).sum(axis=1) * np.abs(a).max(axis=1)
    for field, fn, tol in (("dot", dot, 1e-4 * scale + 1e-6),
                           ("dot_int8", dot_int8, 1e-2 * amax + 1e-6)):
        if fn is None:
            continue
        got = _call(what, field, fn, q.reshape(nb, bb).copy(), a.copy())
        got = _array(what, field, got, np.float32, nb)
        bad = np.flatnonzero(~(np.abs(got.astype(np.float64) - want) <= tol))
        if bad.size:
            b = int(bad[0])
            raise BadInput(f"{what}: {field} disagrees with dequantize on a test block "
                           f"({float(got[b])!r} != {float(want[b])!r}, block {b})")


def _checked_quantize(what, bs, bb, quantize):
    def run(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
        return _array(what, "quantize", _call(what, "quantize", quantize, x), np.uint8,
                      x.size // bs * bb)
    return run


def _checked_dequantize(what, bs, bb, dequantize):
    def run(data: np.ndarray) -> np.ndarray:
        data = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
        return _array(what, "dequantize", _call(what, "dequantize", dequantize, data),
                      np.float32, data.size // bb * bs)
    return run


# -- what the board runs ----------------------------------------------------------------------
def _board_ops(what, bs, bb, dequantize, dot, dot_int8) -> quants.BoardOps:
    """BoardOps (formats/quants.py) around the plug-in's functions, vectorized over a run of
    blocks. The activation is used as float32 in both modes (xq, xd, xs, row_state unused);
    out[row] += each block's dot, block by block in float32 (np.add.at adds in order), so the
    result does not depend on how the matrix is split into runs."""

    def prepare_activation(int8_mode, x, xf, xq, xd, xs):
        n = len(x)
        if n % bs:
            raise BadInput(f"prepare_activation {what}: needs a multiple of {bs} values, got {n}")
        if len(xf) < n:
            raise BadInput(f"prepare_activation {what}: xf holds {len(xf)} values, needs {n}")
        xf[:n] = x

    def matvec_blocks(int8_mode, buf, n_blocks, first_block, blocks_per_row, xf, xq, xd, xs,
                      out, row_state=None):
        if n_blocks < 0 or first_block < 0 or blocks_per_row < 1:
            raise BadInput(f"matvec {what}: bad block range (n_blocks={n_blocks}, "
                           f"first_block={first_block}, blocks_per_row={blocks_per_row})")
        if not n_blocks:
            return
        raw = buf if isinstance(buf, np.ndarray) else np.frombuffer(buf, np.uint8)
        if raw.size < n_blocks * bb:
            raise BadInput(f"matvec {what}: {n_blocks} blocks need {n_blocks * bb} bytes, the "
                           f"buffer holds {raw.size}")
        g = np.arange(first_block, first_block + n_blocks)
        rows = g // blocks_per_row
        if rows[-1] >= len(out):
            raise BadInput(f"matvec {what}: blocks {first_block}..{g[-1]} reach row "
                           f"{rows[-1]}, out has {len(out)} rows")
        n_in = blocks_per_row * bs
        if len(xf) < n_in:
            raise BadInput(f"matvec {what}: rows of {n_in} need xf of {n_in}, got {len(xf)}")
        blocks = raw[:n_blocks * bb].view(np.uint8).reshape(n_blocks, bb)
        xb = np.asarray(xf[:n_in], dtype=np.float32).reshape(blocks_per_row, bs)[
            g % blocks_per_row]
        fn, field = (dot_int8, "dot_int8") if int8_mode else (dot, "dot")
        got = _array(what, field, _call(what, field, fn, blocks, xb), np.float32, n_blocks)
        np.add.at(out, rows, got)

    def dequantize_into(buf, out):
        raw = buf if isinstance(buf, np.ndarray) else np.frombuffer(buf, np.uint8)
        nb, rem = divmod(raw.size, bb)
        if rem:
            raise BadInput(f"dequantize_into {what}: {raw.size} bytes are not whole "
                           f"{bb}-byte blocks")
        if len(out) < nb * bs:
            raise BadInput(f"dequantize_into {what}: {nb * bs} values do not fit in out of "
                           f"{len(out)}")
        out[:nb * bs] = _array(what, "dequantize",
                               _call(what, "dequantize", dequantize, raw.view(np.uint8).copy()),
                               np.float32, nb * bs)

    return quants.BoardOps(prepare_activation, matvec_blocks, dequantize_into)
